"""TLS identities bound to site keys, and partners pinned by key (mutual TLS 1.3, Python `ssl`).

A site's TLS certificate (`keys/tls-cert.pem`) carries the site's current ECDSA P-256 signing key
and is signed by it: the TLS identity is the site identity, and it follows key rotation. Its issuer
is named "<site> site key", not the certificate itself, so that a verifier can anchor it to a key
it already holds: for every partner key it accepts, a site makes a *pin certificate* in memory
(subject "<partner> site key", the partner's public key, signed by the site's own key) and gives
OpenSSL those pins as its only trust anchors (partial-chain verification, no CA, no host names).

A peer therefore completes the handshake only when its certificate is signed by a current,
unrevoked signing key of a configured partner in this site's trust store, and the handshake's
CertificateVerify proves it holds that key's private half. After the handshake `peer_site` checks
once more, against the trust store as it is at that moment, that the certificate's public key *is*
such a key, and names the partner. Contexts are rebuilt whenever the own key, the certificate or
the set of accepted partner keys changes (a revocation takes effect on the next connection).
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pipelines.config import SITES
from pipelines.fileio import file_lock, write_atomic
from pipelines.trust import keys
from pipelines.workspace import SitePaths

CERT_FILE = "tls-cert.pem"
CERT_LIFETIME = timedelta(days=90)
RENEW_BEFORE = timedelta(days=30)
log = logging.getLogger("factory.carrier")
_PIN_LIFETIME = timedelta(days=3650)  # pins live in memory only; the trust store decides what they pin


class PeerRefused(RuntimeError):
    """The peer's certificate is not a current, unrevoked key of the expected partner."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Sovereign AI Factory"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _spki(public: Any) -> bytes:
    return public.public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)


def partners(paths: SitePaths) -> list[str]:
    return [site for site in SITES if site != paths.site]


def certificate_file(paths: SitePaths) -> Path:
    return paths.keys_dir / CERT_FILE


_FALLBACK: list[Path] = []  # a private folder of this process, for a read-only keys folder


def _fallback_file(paths: SitePaths) -> Path:
    if not _FALLBACK:
        _FALLBACK.append(Path(tempfile.mkdtemp(prefix="factory-tls-")))  # 0700
    return _FALLBACK[0] / f"{paths.site}-{CERT_FILE}"


def _current_certificate(path: Path, public: ec.EllipticCurvePublicKey) -> bool:
    """True when `path` holds a certificate of `public` that is not close to expiring."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    return (_spki(cert.public_key()) == _spki(public)
            and cert.not_valid_after_utc - datetime.now(UTC) > RENEW_BEFORE)


def _new_certificate(paths: SitePaths, private: ec.EllipticCurvePrivateKey) -> bytes:
    public = private.public_key()
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{paths.site} inbox"))
        .issuer_name(_name(f"{paths.site} site key"))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=False, crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
            f"factory://{paths.site}")]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(private, hashes.SHA256())
    )
    return cert.public_bytes(ser.Encoding.PEM)


def ensure_certificate(paths: SitePaths) -> Path:
    """The site's TLS certificate for its current signing key, (re)made when missing, for another
    key (after a rotation) or within RENEW_BEFORE of expiring. Kept in the keys folder (0700, the
    file 0600); where that folder is read-only (a mounted Secret), in a private folder of this process."""
    private = keys.signing_key(paths)
    public = private.public_key()
    for path in (certificate_file(paths), _fallback_file(paths)):
        if _current_certificate(path, public):
            return path
    path = certificate_file(paths)
    try:
        with file_lock(paths.keys_dir / ".lock-tls"):
            if not _current_certificate(path, public):
                write_atomic(path, _new_certificate(paths, private), mode=0o600)
        return path
    except OSError as error:
        path = _fallback_file(paths)
        log.info("%s: cannot write %s (%s); the TLS certificate goes to %s", paths.site,
                 certificate_file(paths), error.strerror or error, path)
        write_atomic(path, _new_certificate(paths, private), mode=0o600)
        return path


def accepted_keys(paths: SitePaths, site: str) -> list[dict[str, Any]]:
    """The key records of partner `site` this site accepts for TLS now: current (not rotated out)
    and not revoked. `site` must be a configured partner."""
    if site not in partners(paths):
        raise PeerRefused(f"{str(site)[:64]!r} is not a configured partner of {paths.site}")
    gone = keys.revoked(paths)
    return [record for record in keys.records(paths, site)
            if record.get("superseded_at") is None and record["signing_key_id"] not in gone]


def _pin(paths: SitePaths, site: str, record: dict[str, Any], signer: ec.EllipticCurvePrivateKey) -> bytes:
    public = ser.load_pem_public_key(record["signing_public"].encode())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{site} site key"))
        .issuer_name(_name(f"{paths.site} trust store"))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + _PIN_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(signer, hashes.SHA256())
    )
    return cert.public_bytes(ser.Encoding.PEM)


_CONTEXTS: dict[tuple, ssl.SSLContext] = {}
_CONTEXTS_LOCK = threading.Lock()


def _context(paths: SitePaths, side: str, pinned: list[str]) -> ssl.SSLContext:
    cert_file = ensure_certificate(paths)
    anchors = [(site, record) for site in pinned for record in accepted_keys(paths, site)]
    stamp = (str(paths.root), side, tuple(pinned), cert_file.stat().st_mtime_ns, keys.signing_key_id(paths),
             tuple(record["signing_key_id"] for _, record in anchors))
    with _CONTEXTS_LOCK:
        if stamp in _CONTEXTS:
            return _CONTEXTS[stamp]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if side == "server" else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False  # the peer is pinned by key, not by name
        context.verify_mode = ssl.CERT_REQUIRED
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        context.load_cert_chain(cert_file, keys.signing_key_file(paths), password=keys.site_secret(paths))
        if anchors:
            signer = keys.signing_key(paths)
            context.load_verify_locations(
                cadata="".join(_pin(paths, site, record, signer).decode() for site, record in anchors))
        for old in [k for k in _CONTEXTS if k[:3] == stamp[:3]]:
            del _CONTEXTS[old]
        _CONTEXTS[stamp] = context
        return context


def server_context(paths: SitePaths) -> ssl.SSLContext:
    """The inbox service's context: its own certificate, every configured partner's accepted keys pinned."""
    return _context(paths, "server", partners(paths))


def client_context(paths: SitePaths, recipient: str) -> ssl.SSLContext:
    """The pushing side's context: its own certificate as client certificate, only `recipient` pinned."""
    return _context(paths, "client", [recipient])


def key_id_of_certificate(certificate_der: bytes) -> str:
    try:
        public = x509.load_der_x509_certificate(certificate_der).public_key()
        return hashlib.sha256(_spki(public)).hexdigest()[:16]
    except ValueError:
        return "unreadable"


def peer_site(paths: SitePaths, certificate_der: bytes | None, expected: str | None = None) -> str:
    """The partner whose current, unrevoked signing key is the public key of the peer's certificate
    (only `expected` is considered when given). PeerRefused otherwise."""
    if not certificate_der:
        raise PeerRefused("the peer presented no certificate")
    try:
        spki = _spki(x509.load_der_x509_certificate(certificate_der).public_key())
    except ValueError:
        raise PeerRefused("the peer certificate cannot be read") from None
    for site in [expected] if expected else partners(paths):
        for record in accepted_keys(paths, site):
            if _spki(ser.load_pem_public_key(record["signing_public"].encode())) == spki:
                return site
    whom = expected or "any configured partner"
    raise PeerRefused(f"the peer certificate (key {key_id_of_certificate(certificate_der)}) is not a current, "
                      f"unrevoked signing key of {whom} in the trust store of {paths.site}")
