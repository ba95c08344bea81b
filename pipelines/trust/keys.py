"""Site keys, the trust store and key rotation/revocation.

Each site holds key *generations*; a generation is an ECDSA P-256 signing key, an X25519 key and
an ML-KEM-768 key (the last two together form the hybrid HPKE key packages are sealed to).
Private keys live in `keys_dir/gen-NNNN/*.pem`, PKCS#8 encrypted with the site's key passphrase
(`site_secret`): `FACTORY_KEY_PASSPHRASE_<SITE>`, else the file named by
`FACTORY_KEY_PASSPHRASE_FILE` (outside FACTORY_HOME), else `FACTORY_KEY_PASSPHRASE`, else a random
secret generated once into `secret_file` (0600) beside the keys. The generated secret is the
embedded default: it keeps a single leaked key file useless, not a copied keys folder.
`keys_dir/keyring.json` lists the public half of every generation and which one is current.

The trust store (`trust_dir/<site>.json`) holds the public keys of the other sites, bootstrapped by
`exchange_trust` (the embedded stand-in for a key ceremony) and afterwards changed only by signed
key-update documents (`accept_key_update`) and local revocations (`trust_dir/revoked.json`).
A site name from anywhere else (a package header, a document) is only ever looked up among the
configured partners (`peer`), never joined into a path. Old generations are kept: a partner's
rotated-out key still verifies messages for `rotation_grace_hours` after this site accepted the
rotation (its own clock), then never again; own old keys keep verifying this site's audit log.

Key ids are the first 16 hex digits of SHA-256 over the public key (DER SubjectPublicKeyInfo for
ECDSA; the raw X25519 and ML-KEM public keys for the KEM pair).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.config import SITES, conf_dir, read_yaml
from pipelines.fileio import file_lock, read_json, write_atomic, write_json
from pipelines.workspace import SitePaths

KEY_UPDATE_TYPE = "application/vnd.factory.key-update.v1+json"
_KINDS = ("signing", "x25519", "mlkem")


class TrustError(RuntimeError):
    """A key is missing, unknown, revoked or unusable; the message names the key and the reason."""


class KeysMissing(TrustError):
    """The site has no keys yet."""


def now() -> datetime:
    return datetime.now(UTC)


class TrustSettings(BaseModel):
    """Limits a recipient applies to what partners send (`conf/trust.yaml`; every key optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rotation_grace_hours: float = Field(default=24, ge=0)
    max_package_lifetime_days: float = Field(default=30, gt=0)
    max_clock_skew_seconds: float = Field(default=300, ge=0)
    max_sequence_jump: int = Field(default=1000, ge=1)

    @property
    def rotation_grace(self) -> timedelta:
        return timedelta(hours=self.rotation_grace_hours)

    @property
    def max_package_lifetime(self) -> timedelta:
        return timedelta(days=self.max_package_lifetime_days)

    @property
    def max_clock_skew(self) -> timedelta:
        return timedelta(seconds=self.max_clock_skew_seconds)


_SETTINGS: dict[tuple[str, int], TrustSettings] = {}


def settings() -> TrustSettings:
    """The trust limits of `conf/trust.yaml` (defaults when the file is absent), re-read when it changes."""
    path = conf_dir() / "trust.yaml"
    try:
        stamp = (str(path), path.stat().st_mtime_ns)
    except FileNotFoundError:
        return TrustSettings()
    if stamp not in _SETTINGS:
        try:
            _SETTINGS[stamp] = TrustSettings(**read_yaml("trust.yaml"))
        except (ValidationError, TypeError) as error:
            raise TrustError(f"{path} is not valid: {error}") from None
    return _SETTINGS[stamp]


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _short(digest: bytes) -> str:
    return digest.hex()[:16]


def signing_key_id_of(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)
    return _short(hashlib.sha256(der).digest())


def kem_key_id_of(x_pub: x25519.X25519PublicKey, m_pub: mlkem.MLKEM768PublicKey) -> str:
    return _short(hashlib.sha256(x_pub.public_bytes_raw() + m_pub.public_bytes_raw()).digest())


# ---------------------------------------------------------------- secret and private key files


PASSPHRASE_FILE_ENV = "FACTORY_KEY_PASSPHRASE_FILE"
PASSPHRASE_ENV = "FACTORY_KEY_PASSPHRASE"


def site_passphrase_env(paths: SitePaths) -> str:
    return f"{PASSPHRASE_ENV}_{paths.site.upper()}"


def read_passphrase_file(paths: SitePaths, file: Path) -> bytes:
    """The passphrase in `file`, which must lie outside FACTORY_HOME (a copied site folder must not
    carry it) and hold a non-empty first line."""
    file = Path(file).expanduser()
    if file.resolve().is_relative_to(paths.home):
        raise TrustError(f"the key passphrase file {file} is inside FACTORY_HOME ({paths.home}); "
                         "keep it outside (a mounted secret, a file only the service user can read)")
    try:
        value = file.read_bytes().splitlines()[0].strip() if file.stat().st_size else b""
    except OSError as error:
        raise TrustError(f"cannot read the key passphrase file {file}: {error.strerror}") from None
    if not value:
        raise TrustError(f"the key passphrase file {file} is empty")
    return value


def configured_passphrases(paths: SitePaths) -> list[tuple[str, bytes]]:
    """Every key passphrase the environment offers for this site, in priority order, as (source, value)."""
    found = []
    if value := os.environ.get(site_passphrase_env(paths)):
        found.append((site_passphrase_env(paths), value.encode()))
    if file := os.environ.get(PASSPHRASE_FILE_ENV):
        found.append((f"{PASSPHRASE_FILE_ENV}={file}", read_passphrase_file(paths, Path(file))))
    if value := os.environ.get(PASSPHRASE_ENV):
        found.append((PASSPHRASE_ENV, value.encode()))
    return found


def _passphrases(paths: SitePaths) -> list[bytes]:
    """Every passphrase this site has: the configured ones, then the secret generated beside the keys."""
    found = [value for _, value in configured_passphrases(paths)]
    if paths.secret_file.exists():
        found.append(paths.secret_file.read_bytes().strip())
    return found


def site_secret(paths: SitePaths) -> bytes:
    """The passphrase of this site's private keys.

    Of the passphrases the site has (`configured_passphrases`, then the generated secret), the one
    that decrypts its current signing key (so a site keeps working while `change_passphrase` moves it
    from one to another); the first when there is only one. With neither keys nor a configured
    passphrase, a secret is generated once beside the keys; a site that has keys never gets a new
    one (it fails loudly instead of making a secret that decrypts nothing)."""
    found = _passphrases(paths)
    if not found:
        if keyring_path(paths).exists():
            raise TrustError(
                f"site {paths.site!r} has keys but no passphrase: set {site_passphrase_env(paths)}, "
                f"{PASSPHRASE_FILE_ENV} or {PASSPHRASE_ENV} (or restore {paths.secret_file})"
            )
        paths.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with file_lock(paths.keys_dir / ".lock-secret"):
            if not paths.secret_file.exists():
                write_atomic(paths.secret_file, secrets.token_hex(32).encode() + b"\n", mode=0o600)
        return paths.secret_file.read_bytes().strip()
    if len(found) > 1 and keyring_path(paths).exists():
        current = _gen_dir(paths, keyring(paths)["current"]) / "signing.pem"
        for value in found:
            if _decrypts(current, value):
                return value
    return found[0]


def _gen_dir(paths: SitePaths, generation: int) -> Path:
    return paths.keys_dir / f"gen-{generation:04d}"


_CACHE: dict[tuple[str, int], tuple[Any, bytes]] = {}  # (file, mtime) -> (private key, its passphrase)


def _decrypts(path: Path, secret: bytes) -> bool:
    try:
        _load_private(path, secret)
        return True
    except (TrustError, OSError):
        return False


def _load_private(path: Path, secret: bytes) -> Any:
    stamp = (str(path), path.stat().st_mtime_ns)
    cached = _CACHE.get(stamp)
    if cached is not None and cached[1] == secret:
        return cached[0]
    try:
        key = ser.load_pem_private_key(path.read_bytes(), secret)
    except (ValueError, TypeError) as error:
        raise TrustError(
            f"cannot decrypt {path}: wrong key passphrase ({PASSPHRASE_ENV}_<SITE>, {PASSPHRASE_FILE_ENV}, "
            f"{PASSPHRASE_ENV} or {path.parent.parent}/secret)?"
        ) from error
    _CACHE[stamp] = (key, secret)
    return key


def ensure_generation(paths: SitePaths, generation: int, secret: bytes) -> dict[str, Any]:
    """Create whichever key files of a generation are missing (never replaces one) and describe it."""
    folder = _gen_dir(paths, generation)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    makers = {
        "signing": lambda: ec.generate_private_key(ec.SECP256R1()),
        "x25519": x25519.X25519PrivateKey.generate,
        "mlkem": mlkem.MLKEM768PrivateKey.generate,
    }
    keys = {}
    for kind in _KINDS:
        path = folder / f"{kind}.pem"
        if not path.exists():
            pem = makers[kind]().private_bytes(
                ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.BestAvailableEncryption(secret)
            )
            write_atomic(path, pem, mode=0o600)
        keys[kind] = _load_private(path, secret)
    sign_pub, x_pub, m_pub = (keys[kind].public_key() for kind in _KINDS)
    return {
        "site": paths.site,
        "generation": generation,
        "created": iso(now()),
        "signing_key_id": signing_key_id_of(sign_pub),
        "kem_key_id": kem_key_id_of(x_pub, m_pub),
        "signing_public": sign_pub.public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo).decode(),
        "x25519_public": base64.b64encode(x_pub.public_bytes_raw()).decode(),
        "mlkem_public": base64.b64encode(m_pub.public_bytes_raw()).decode(),
        "superseded_at": None,
    }


def keyring_path(paths: SitePaths) -> Path:
    return paths.keys_dir / "keyring.json"


def ensure_site_keys(paths: SitePaths) -> None:
    """Create the site's secret and first key generation if missing. Idempotent; completes a half run."""
    paths.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(paths.keys_dir, 0o700)
    secret = site_secret(paths)
    with file_lock(paths.keys_dir / ".lock"):
        if keyring_path(paths).exists():
            ring = read_json(keyring_path(paths))
            for kind in _KINDS:  # fails loudly if the secret changed or a file vanished
                _load_private(_gen_dir(paths, ring["current"]) / f"{kind}.pem", secret)
            return
        record = ensure_generation(paths, 1, secret)
        write_json(keyring_path(paths), {"site": paths.site, "current": 1, "generations": [record]})


def keyring(paths: SitePaths) -> dict[str, Any]:
    try:
        return read_json(keyring_path(paths))
    except FileNotFoundError:
        raise KeysMissing(
            f"site {paths.site!r} has no keys under {paths.keys_dir}; run `factory init` (ensure_site_keys) first"
        ) from None


def current_record(paths: SitePaths) -> dict[str, Any]:
    ring = keyring(paths)
    return next(r for r in ring["generations"] if r["generation"] == ring["current"])


def signing_key(paths: SitePaths) -> ec.EllipticCurvePrivateKey:
    """The site's current private ECDSA P-256 key."""
    ring = keyring(paths)
    return _load_private(_gen_dir(paths, ring["current"]) / "signing.pem", site_secret(paths))


def signing_key_file(paths: SitePaths) -> Path:
    """The encrypted PEM file of the current signing key (its passphrase is `site_secret`)."""
    return _gen_dir(paths, keyring(paths)["current"]) / "signing.pem"


def signing_key_id(paths: SitePaths) -> str:
    return current_record(paths)["signing_key_id"]


def kem_private_keys(paths: SitePaths, kem_key_id: str) -> tuple[x25519.X25519PrivateKey, mlkem.MLKEM768PrivateKey]:
    """The X25519 and ML-KEM-768 private keys of whichever own generation has `kem_key_id`."""
    for record in keyring(paths)["generations"]:
        if record["kem_key_id"] == kem_key_id:
            folder, secret = _gen_dir(paths, record["generation"]), site_secret(paths)
            return _load_private(folder / "x25519.pem", secret), _load_private(folder / "mlkem.pem", secret)
    raise TrustError(f"site {paths.site!r} holds no private key with id {kem_key_id}")


def kem_public_keys(record: dict[str, Any]) -> tuple[x25519.X25519PublicKey, mlkem.MLKEM768PublicKey]:
    return (
        x25519.X25519PublicKey.from_public_bytes(base64.b64decode(record["x25519_public"])),
        mlkem.MLKEM768PublicKey.from_public_bytes(base64.b64decode(record["mlkem_public"])),
    )


def _public(record: dict[str, Any]) -> ec.EllipticCurvePublicKey:
    return ser.load_pem_public_key(record["signing_public"].encode())


# ---------------------------------------------------------------- trust store


def peer(paths: SitePaths, site: Any) -> str:
    """`site` if it is one of this site's configured partners (never this site itself), else TrustError.

    Every name that came from outside (a header's sender, a model's signer, a key-update document)
    passes here before it selects anything; the answer is a name from `pipelines.config.SITES`."""
    for known in SITES:
        if known != paths.site and site == known:
            return known
    if isinstance(site, str) and site == paths.site:
        raise TrustError(f"{paths.site!r} is this site itself, not a partner")
    shown = repr(site[:64]) if isinstance(site, str) else f"of type {type(site).__name__}"
    partners = ", ".join(s for s in SITES if s != paths.site)
    raise TrustError(f"site {shown} is not a configured partner of {paths.site!r} ({partners})")


def _known(paths: SitePaths, site: Any) -> str:
    """This site or a configured partner (own keys answer for this site's own signatures)."""
    if isinstance(site, str) and site == paths.site:
        return paths.site
    return peer(paths, site)


def trust_path(paths: SitePaths, site: str) -> Path:
    """The trust-store file of partner `site` (looked up among the configured partners)."""
    files = {other: paths.trust_dir / f"{other}.json" for other in SITES if other != paths.site}
    return files[peer(paths, site)]


def revoked_path(paths: SitePaths) -> Path:
    return paths.trust_dir / "revoked.json"


def revoked(paths: SitePaths) -> dict[str, dict[str, Any]]:
    """Revoked key ids at this site -> revocation entry."""
    try:
        return {entry["key_id"]: entry for entry in read_json(revoked_path(paths))["revoked"]}
    except FileNotFoundError:
        return {}


def records(paths: SitePaths, site: str) -> list[dict[str, Any]]:
    """Every known key generation of `site` (this site: its keyring; a partner: the trust store)."""
    if _known(paths, site) == paths.site:
        return keyring(paths)["generations"]
    try:
        return read_json(trust_path(paths, site))["keys"]
    except FileNotFoundError:
        return []


def trusted_record(paths: SitePaths, site: str) -> dict[str, Any]:
    """The current key generation of partner `site` (raises TrustError when the site is not trusted)."""
    current = [r for r in records(paths, peer(paths, site)) if r["superseded_at"] is None]
    if not current:
        raise TrustError(f"site {site!r} is not in the trust store of {paths.site!r}")
    return max(current, key=lambda r: r["generation"])


def public_signing_key(paths: SitePaths, site: str, key_id: str | None = None) -> ec.EllipticCurvePublicKey:
    """The public signing key of `site` (current, or the generation with `key_id`), not revoked."""
    if key_id is None:
        key_id = (current_record(paths) if _known(paths, site) == paths.site
                  else trusted_record(paths, site))["signing_key_id"]
    return check_signing_key(paths, site, key_id)


def retired_at(paths: SitePaths, site: str, record: dict[str, Any]) -> datetime | None:
    """When a superseded key of `site` stops verifying fresh messages at this site (None: current key).

    Decided from this site's own record: when it accepted the rotation (`superseded_accepted_at`,
    its clock) or, for keys it got already superseded at the trust exchange, `superseded_at`; plus
    the configured grace."""
    if not record.get("superseded_at"):
        return None
    since = record.get("superseded_accepted_at") or record["superseded_at"]
    return parse_time(since) + settings().rotation_grace


def check_signing_key(
    paths: SitePaths, site: str, key_id: str, signed_at: datetime | None = None
) -> ec.EllipticCurvePublicKey:
    """Return the key `key_id` of `site` (this site or a partner) if `paths.site` trusts it.

    With `signed_at` (a fresh message: a package, a partner's audit head) a superseded key must also
    have signed before its rotation, as the message claims, and the rotation must be recent by this
    site's record (`retired_at`): a stolen old key cannot sign anything acceptable after that, whatever
    time it writes into the message. Without `signed_at` (this site's own audit log) old keys count.
    """
    site = _known(paths, site)
    known = records(paths, site)
    if not known:
        raise TrustError(f"unknown sender {site!r}: not in the trust store of {paths.site!r}")
    record = next((r for r in known if r["signing_key_id"] == key_id), None)
    if record is None:
        shown = key_id[:32] if isinstance(key_id, str) else type(key_id).__name__
        raise TrustError(f"unknown signing key {shown} for {site!r} in the trust store of {paths.site!r}")
    if key_id in revoked(paths):
        raise TrustError(f"signing key {key_id} of {site!r} is revoked at {paths.site!r}")
    superseded = record.get("superseded_at")
    if superseded and signed_at is not None:
        if signed_at > parse_time(superseded):
            raise TrustError(f"signing key {key_id} of {site!r} was rotated out at {superseded}")
        retired = retired_at(paths, site, record)
        if now() > retired:
            raise TrustError(f"signing key {key_id} of {site!r} was rotated out at {superseded} and retired at "
                             f"{iso(retired)} (grace after {paths.site} accepted the rotation)")
    return _public(record)


def exchange_trust(home: Path) -> None:
    """Give every site with keys the public keys of every other site (first contact only) and a
    revocation list. Idempotent: a site already trusted is left alone, so accepted rotations and
    revocations are never undone."""
    have = {site: SitePaths.of(site, home) for site in SITES}
    have = {site: p for site, p in have.items() if keyring_path(p).exists()}
    for site, paths in have.items():
        paths.trust_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(paths.trust_dir / ".lock"):
            if not revoked_path(paths).exists():
                write_json(revoked_path(paths), {"revoked": []})
            for other, other_paths in have.items():
                if other != site and not trust_path(paths, other).exists():
                    write_json(trust_path(paths, other), {"site": other, "keys": keyring(other_paths)["generations"]})


def list_keys(paths: SitePaths) -> list[dict[str, Any]]:
    """One row per known key generation (own and trusted), with its status."""
    gone = revoked(paths)
    rows = []
    for site in SITES:
        for r in records(paths, site):
            status = "revoked" if r["signing_key_id"] in gone else ("superseded" if r["superseded_at"] else "current")
            rows.append({
                "site": site, "own": site == paths.site, "generation": r["generation"], "status": status,
                "signing_key_id": r["signing_key_id"], "kem_key_id": r["kem_key_id"], "created": r["created"],
            })
    return rows
