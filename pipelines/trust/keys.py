"""Site keys, the trust store and key rotation/revocation.

Each site holds key *generations*; a generation is an ECDSA P-256 signing key, an X25519 key and
an ML-KEM-768 key (the last two together form the hybrid HPKE key packages are sealed to).
Private keys live in `keys_dir/gen-NNNN/*.pem`, PKCS#8 encrypted with the site secret
(`FACTORY_SECRET_<SITE>` when set, else a random secret generated once into `secret_file`, 0600).
`keys_dir/keyring.json` lists the public half of every generation and which one is current.

The trust store (`trust_dir/<site>.json`) holds the public keys of the other sites, bootstrapped by
`exchange_trust` (the embedded stand-in for a key ceremony) and afterwards changed only by signed
key-update documents (`accept_key_update`) and local revocations (`trust_dir/revoked.json`).
Old generations are kept: packages sealed before a rotation still open until they expire.

Key ids are the first 16 hex digits of SHA-256 over the public key (DER SubjectPublicKeyInfo for
ECDSA; the raw X25519 and ML-KEM public keys for the KEM pair).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519

from pipelines.config import SITES
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


def site_secret(paths: SitePaths) -> bytes:
    """The passphrase that encrypts this site's private keys (env var, else the generated file)."""
    env = os.environ.get(f"FACTORY_SECRET_{paths.site.upper()}")
    if env:
        return env.encode()
    if paths.secret_file.exists():
        return paths.secret_file.read_bytes().strip()
    paths.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with file_lock(paths.keys_dir / ".lock-secret"):
        if not paths.secret_file.exists():
            write_atomic(paths.secret_file, secrets.token_hex(32).encode() + b"\n", mode=0o600)
    return paths.secret_file.read_bytes().strip()


def _gen_dir(paths: SitePaths, generation: int) -> Path:
    return paths.keys_dir / f"gen-{generation:04d}"


_CACHE: dict[tuple[str, int], Any] = {}


def _load_private(path: Path, secret: bytes) -> Any:
    stamp = (str(path), path.stat().st_mtime_ns)
    if stamp not in _CACHE:
        try:
            _CACHE[stamp] = ser.load_pem_private_key(path.read_bytes(), secret)
        except (ValueError, TypeError) as error:
            raise TrustError(
                f"cannot decrypt {path}: wrong site secret (FACTORY_SECRET_* or {path.parent.parent}/secret)?"
            ) from error
    return _CACHE[stamp]


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


def trust_path(paths: SitePaths, site: str) -> Path:
    return paths.trust_dir / f"{site}.json"


def revoked_path(paths: SitePaths) -> Path:
    return paths.trust_dir / "revoked.json"


def revoked(paths: SitePaths) -> dict[str, dict[str, Any]]:
    """Revoked key ids at this site -> revocation entry."""
    try:
        return {entry["key_id"]: entry for entry in read_json(revoked_path(paths))["revoked"]}
    except FileNotFoundError:
        return {}


def records(paths: SitePaths, site: str) -> list[dict[str, Any]]:
    """Every known key generation of `site` as seen from `paths.site` (own keyring or trust store)."""
    if site == paths.site:
        return keyring(paths)["generations"]
    try:
        return read_json(trust_path(paths, site))["keys"]
    except FileNotFoundError:
        return []


def trusted_record(paths: SitePaths, site: str) -> dict[str, Any]:
    """The current key generation of `site` (raises TrustError when the site is not trusted)."""
    current = [r for r in records(paths, site) if r["superseded_at"] is None]
    if not current:
        raise TrustError(f"site {site!r} is not in the trust store of {paths.site!r}")
    return max(current, key=lambda r: r["generation"])


def public_signing_key(paths: SitePaths, site: str, key_id: str | None = None) -> ec.EllipticCurvePublicKey:
    """The public signing key of `site` (current, or the generation with `key_id`), not revoked."""
    if key_id is None:
        key_id = trusted_record(paths, site)["signing_key_id"]
    return check_signing_key(paths, site, key_id)


def check_signing_key(
    paths: SitePaths, site: str, key_id: str, signed_at: datetime | None = None
) -> ec.EllipticCurvePublicKey:
    """Return the key `key_id` of `site` if `paths.site` trusts it for something signed at `signed_at`.

    A superseded (rotated-out) key stays valid for what it signed before the rotation.
    """
    known = records(paths, site)
    if not known:
        raise TrustError(f"unknown sender {site!r}: not in the trust store of {paths.site!r}")
    record = next((r for r in known if r["signing_key_id"] == key_id), None)
    if record is None:
        raise TrustError(f"unknown signing key {key_id} for {site!r} in the trust store of {paths.site!r}")
    if key_id in revoked(paths):
        raise TrustError(f"signing key {key_id} of {site!r} is revoked at {paths.site!r}")
    superseded = record.get("superseded_at")
    if superseded and signed_at is not None and signed_at > parse_time(superseded):
        raise TrustError(f"signing key {key_id} of {site!r} was rotated out at {superseded}")
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
