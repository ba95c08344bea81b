"""Key lifecycle at a site: rotation, acceptance of a partner's key update, revocation.

Apart from `pipelines.trust.keys` (key material and the trust store) because each
operation is recorded in the audit log, which itself signs with the site's keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.config import SITES
from pipelines.fileio import file_lock, read_json, write_json
from pipelines.trust import audit
from pipelines.trust.keys import (
    KEY_UPDATE_TYPE,
    TrustError,
    check_signing_key,
    current_record,
    ensure_generation,
    iso,
    keyring,
    keyring_path,
    now,
    records,
    revoked,
    revoked_path,
    signing_key,
    signing_key_id,
    site_secret,
    trust_path,
    trusted_record,
)
from pipelines.workspace import SitePaths


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


def accept_key_update(paths: SitePaths, document: Path) -> dict[str, Any]:
    """Take a key-update document from a trusted site: checks it is for this site, signed by the
    sender's current (non-revoked) key and newer than what is known. Returns the new key record."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError
    from securesystemslib.signer import SSlibKey

    try:
        envelope = Envelope.from_dict(read_json(document))
        payload = json.loads(envelope.payload)
        site, record = payload["site"], payload["record"]
    except (ValueError, KeyError, TypeError) as error:
        raise TrustError(f"{document} is not a key-update document: {error}") from None
    if envelope.payload_type != KEY_UPDATE_TYPE or payload.get("type") != "key-update":
        raise TrustError(f"{document} is not a key-update document")
    if payload.get("recipient") != paths.site:
        raise TrustError(f"key update was issued for {payload.get('recipient')!r}, not {paths.site!r}")
    previous = payload["previous_signing_key_id"]
    current = trusted_record(paths, site)
    if previous != current["signing_key_id"]:
        raise TrustError(f"key update is signed by {previous}, not the current key {current['signing_key_id']} of {site!r}")
    public = check_signing_key(paths, site, previous)
    try:
        envelope.verify([SSlibKey.from_crypto(public, keyid=previous)], 1)
    except VerificationError:
        raise TrustError(f"key update signature does not verify with {site!r} key {previous}") from None
    if record.get("site") != site or record["generation"] <= current["generation"]:
        raise TrustError(f"key update for {site!r} is not newer than generation {current['generation']}")
    with file_lock(paths.trust_dir / ".lock"):
        store = read_json(trust_path(paths, site))
        for known in store["keys"]:
            if known["superseded_at"] is None:
                known["superseded_at"] = payload["created"]
        store["keys"].append(dict(record, superseded_at=None))
        write_json(trust_path(paths, site), store)
    audit.append(
        paths, action="keys.accepted", actor=f"svc-{paths.site}", object=record["signing_key_id"], outcome="success",
        details={"site": site, "generation": record["generation"], "previous": previous},
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


