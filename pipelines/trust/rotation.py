"""Key lifecycle at a site: rotation, acceptance of a partner's key update, revocation, and a change
of the passphrase that encrypts the private keys.

Apart from `pipelines.trust.keys` (key material and the trust store) because each
operation is recorded in the audit log, which itself signs with the site's keys.
"""

from __future__ import annotations

import binascii
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec

from pipelines.config import SITES
from pipelines.fileio import file_lock, read_json, write_atomic, write_json
from pipelines.trust import audit
from pipelines.trust.keys import (
    KEY_UPDATE_TYPE,
    TrustError,
    check_signing_key,
    configured_passphrases,
    current_record,
    ensure_generation,
    iso,
    kem_key_id_of,
    kem_public_keys,
    keyring,
    keyring_path,
    now,
    parse_time,
    peer,
    records,
    revoked,
    revoked_path,
    settings,
    signing_key,
    signing_key_id,
    signing_key_id_of,
    site_secret,
    trust_path,
    trusted_record,
)
from pipelines.workspace import SitePaths

MAX_KEY_UPDATE = 1 << 20


def _dsse_signer(paths: SitePaths):
    from securesystemslib.signer import CryptoSigner, SSlibKey

    private = signing_key(paths)
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key(), keyid=signing_key_id(paths)))


def rotate_keys(paths: SitePaths, out_dir: Path | None = None) -> list[Path]:
    """Make a new key generation current and write one key-update document per trusted site,
    signed with the old signing key. Returns the documents (deliver each to its site)."""
    from securesystemslib.dsse import Envelope

    out_dir = out_dir or paths.state_dir / "outbox"
    secret = site_secret(paths)
    with file_lock(paths.keys_dir / ".lock"):
        ring = keyring(paths)
        old = current_record(paths)
        signer = _dsse_signer(paths)
        generation = max(r["generation"] for r in ring["generations"]) + 1
        new = ensure_generation(paths, generation, secret)
        rotated_at = iso(now())
        for record in ring["generations"]:
            if record["superseded_at"] is None:
                record["superseded_at"] = rotated_at
        ring["generations"].append(new)
        ring["current"] = generation
        written = []
        for other in SITES:
            if other == paths.site or not trust_path(paths, other).exists():
                continue
            payload = {
                "type": "key-update", "site": paths.site, "recipient": other, "created": rotated_at,
                "previous_signing_key_id": old["signing_key_id"], "record": new,
            }
            envelope = Envelope(json.dumps(payload, sort_keys=True).encode(), KEY_UPDATE_TYPE, {})
            envelope.sign(signer)
            target = out_dir / f"key-update-{paths.site}-gen{generation}-for-{other}.json"
            write_json(target, envelope.to_dict())
            written.append(target)
        write_json(keyring_path(paths), ring)
    audit.append(
        paths, action="keys.rotated", actor=f"svc-{paths.site}", object=new["signing_key_id"], outcome="success",
        details={"generation": generation, "previous": old["signing_key_id"], "kem_key_id": new["kem_key_id"]},
    )
    return written


def _checked_record(record: Any, site: str) -> dict[str, Any]:
    """The key record of a key-update document, its ids recomputed from the keys it carries (a partner
    cannot claim another key's id, which would let it shadow or dodge a revocation)."""
    fields = {"site", "generation", "created", "signing_key_id", "kem_key_id", "signing_public", "x25519_public",
              "mlkem_public", "superseded_at"}
    if not isinstance(record, dict) or set(record) != fields:
        raise TrustError("key update record does not have the fields of a key generation")
    if record["site"] != site or type(record["generation"]) is not int or record["superseded_at"] is not None:
        raise TrustError(f"key update record is not a current generation of {site!r}")
    try:
        parse_time(record["created"])
        public = ser.load_pem_public_key(record["signing_public"].encode())
        x_pub, m_pub = kem_public_keys(record)
    except (ValueError, TypeError, AttributeError, binascii.Error) as error:
        raise TrustError(f"key update record holds an unusable key: {error}") from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise TrustError("key update record's signing key is not ECDSA P-256")
    if record["signing_key_id"] != signing_key_id_of(public) or record["kem_key_id"] != kem_key_id_of(x_pub, m_pub):
        raise TrustError("key update record's key ids do not match its keys")
    return record


def accept_key_update(paths: SitePaths, document: Path) -> dict[str, Any]:
    """Take a key-update document from a trusted site: checks it is for this site, signed by the
    sender's current (non-revoked) key and newer than what is known. Returns the new key record.

    The superseded key keeps verifying packages for the rotation grace (conf/trust.yaml), counted
    from now on this site's clock (`superseded_accepted_at`), whatever the document claims."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError
    from securesystemslib.signer import SSlibKey

    document = Path(document)
    try:
        if document.stat().st_size > MAX_KEY_UPDATE:
            raise ValueError(f"larger than {MAX_KEY_UPDATE} bytes")
        envelope = Envelope.from_dict(audit.loads_strict(document.read_bytes()))
        payload = audit.loads_strict(envelope.payload)
        site, record, previous = payload["site"], payload["record"], payload["previous_signing_key_id"]
        created = parse_time(payload["created"])
        if created.tzinfo is None:
            raise ValueError("its time has no zone")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, binascii.Error) as error:
        raise TrustError(f"{document} is not a key-update document: {str(error)[:200]}") from None
    if envelope.payload_type != KEY_UPDATE_TYPE or payload.get("type") != "key-update":
        raise TrustError(f"{document} is not a key-update document")
    if payload.get("recipient") != paths.site:
        raise TrustError(f"key update was issued for {str(payload.get('recipient'))[:64]!r}, not {paths.site!r}")
    site = peer(paths, site)  # before the name selects a trust-store file
    current = trusted_record(paths, site)
    if previous != current["signing_key_id"]:
        raise TrustError(f"key update is signed by {str(previous)[:32]}, not the current key "
                         f"{current['signing_key_id']} of {site!r}")
    public = check_signing_key(paths, site, previous)
    try:
        envelope.verify([SSlibKey.from_crypto(public, keyid=previous)], 1)
    except VerificationError:
        raise TrustError(f"key update signature does not verify with {site!r} key {previous}") from None
    record = _checked_record(record, site)
    if record["generation"] <= current["generation"]:
        raise TrustError(f"key update for {site!r} is not newer than generation {current['generation']}")
    accepted = now()
    with file_lock(paths.trust_dir / ".lock"):
        store = read_json(trust_path(paths, site))
        for known in store["keys"]:
            if known["superseded_at"] is None:
                known["superseded_at"] = iso(min(created, accepted))
                known["superseded_accepted_at"] = iso(accepted)
        store["keys"].append(dict(record, superseded_at=None))
        write_json(trust_path(paths, site), store)
    audit.append(
        paths, action="keys.accepted", actor=f"svc-{paths.site}", object=record["signing_key_id"], outcome="success",
        details={"site": site, "generation": record["generation"], "previous": previous,
                 "previous_usable_for_hours": settings().rotation_grace_hours},
    )
    return record


def revoke_key(paths: SitePaths, key_id: str, reason: str = "") -> dict[str, Any]:
    """Revoke a key id (own or trusted) at this site: anything signed with it is rejected from now on."""
    owner = None
    for site in SITES:
        if any(key_id in (r["signing_key_id"], r["kem_key_id"]) for r in records(paths, site)):
            owner = site
    if owner is None:
        raise TrustError(f"no key with id {key_id} at {paths.site!r}; see `factory keys list --site {paths.site}`")
    entry = {"key_id": key_id, "site": owner, "revoked_at": iso(now()), "reason": reason}
    paths.trust_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(paths.trust_dir / ".lock"):
        current = list(revoked(paths).values())
        if key_id not in {e["key_id"] for e in current}:
            write_json(revoked_path(paths), {"revoked": current + [entry]})
    audit.append(paths, action="keys.revoked", actor=f"svc-{paths.site}", object=key_id, outcome="success",
                 details={"site": owner, "reason": reason})
    return entry




def change_passphrase(paths: SitePaths, new: bytes, source: str) -> int:
    """Re-encrypt every private key of the site with `new` (from `source`, named in the audit entry).

    The old passphrase is whichever the site has now (the generated secret beside the keys or a
    configured one) that decrypts a key; files already under `new` are left alone, so a run that
    was interrupted completes when run again. The generated secret file is removed at the end: from
    then on the site needs `new` from the environment. Returns how many key files were rewritten."""
    if not new:
        raise TrustError("the new key passphrase is empty")
    keyring(paths)
    candidates = [value for _, value in configured_passphrases(paths)]
    if paths.secret_file.exists():
        candidates.append(paths.secret_file.read_bytes().strip())
    files = sorted(paths.keys_dir.glob("gen-*/*.pem"))
    pending: list[tuple[Path, Any]] = []
    for file in files:
        pem = file.read_bytes()
        try:
            ser.load_pem_private_key(pem, new)
            continue
        except (ValueError, TypeError):
            pass
        for candidate in candidates:
            try:
                pending.append((file, ser.load_pem_private_key(pem, candidate)))
                break
            except (ValueError, TypeError):
                continue
        else:
            raise TrustError(f"no passphrase the site has decrypts {file}; nothing was changed")
    audit.append(paths, action="keys.passphrase_changed", actor=f"svc-{paths.site}", object=paths.site,
                 outcome="success", details={"source": source, "files": len(pending)})
    for file, key in pending:
        write_atomic(file, key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                             ser.BestAvailableEncryption(new)), mode=0o600)
    if paths.secret_file.exists() and paths.secret_file.read_bytes().strip() != new:
        paths.secret_file.unlink()
    return len(pending)
