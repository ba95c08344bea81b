"""`factory transfer export/import`: packages on removable media for air-gapped partners.

Export copies the pending outbox packages into a folder and writes `manifest.dsse.json` last: a DSSE
envelope (securesystemslib, as key updates and provenance are) signed with the sender's site key,
whose payload lists every file with its SHA-256, size, recipient and package id, the sender and
the creation time. The packages are then marked delivered `via` media.

Import first checks the whole medium: the manifest's signature against the sender's trusted,
unrevoked key, then every listed file (present, same size, same digest; the packages for this site
are copied into the inbox folder while being hashed, so what is checked is what is ingested). One
missing or altered file refuses the whole medium, naming the file, and nothing is imported. Then
each package for this site goes through `receipt.receive`, exactly as a push would: envelope
checks, idempotent storage, audit, asset event. Importing the same medium again changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from pipelines.carrier import outbox
from pipelines.carrier.receipt import Refused, receive, staging_file
from pipelines.carrier.settings import CarrierError, carrier_settings
from pipelines.config import SITES
from pipelines.fileio import atomic_path, write_json
from pipelines.trust import audit, keys
from pipelines.workspace import SitePaths, UnsafeName, safe_name

MANIFEST = "manifest.dsse.json"
MANIFEST_TYPE = "application/vnd.factory.transfer-manifest.v1+json"
MAX_MANIFEST = 16 << 20
COPY_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class MediaRefused(CarrierError):
    """The medium is not imported at all; the message names the file or the check that failed."""


def _copy_hashing(source: Path, target_handle: Any | None) -> tuple[str, int]:
    """SHA-256 and size of `source`, copying it into `target_handle` on the way when given."""
    digest, size = hashlib.sha256(), 0
    with source.open("rb") as handle:
        while chunk := handle.read(COPY_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if target_handle is not None:
                target_handle.write(chunk)
    return digest.hexdigest(), size


# ---------------------------------------------------------------- export


def export_media(paths: SitePaths, to: Path, *, recipient: str | None = None) -> dict[str, Any]:
    """Write every pending outbox package (only those for `recipient` when given) and a signed
    manifest to the folder `to`; returns the manifest payload."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import CryptoSigner, SSlibKey

    to = Path(to)
    if (to / MANIFEST).exists():
        raise CarrierError(f"{to} already holds a transfer ({MANIFEST}); export to an empty folder")
    to.mkdir(parents=True, exist_ok=True)
    records = [r for r in outbox.pending(paths) if recipient is None or r["recipient"] == recipient]
    files = []
    for record in records:
        source = paths.outbox / record["file"]
        with atomic_path(to / record["file"], 0o644) as tmp, tmp.open("wb") as sink:
            digest, size = _copy_hashing(source, sink)
        files.append({"name": record["file"], "sha256": digest, "size": size, "recipient": record["recipient"],
                      "package_id": record["package_id"], "kind": record["kind"]})
    payload = {"type": "transfer-manifest", "sender": paths.site, "created": keys.iso(keys.now()), "files": files}
    private = keys.signing_key(paths)
    envelope = Envelope(_canonical(payload), MANIFEST_TYPE, {})
    envelope.sign(CryptoSigner(private, SSlibKey.from_crypto(private.public_key(),
                                                             keyid=keys.signing_key_id(paths))))
    write_json(to / MANIFEST, envelope.to_dict())
    for record in records:
        outbox.settle(paths, record["package_id"], outbox.DELIVERED, via="media")
    audit.append(paths, action="transfer.exported", actor=f"svc-{paths.site}", object=str(to)[:200],
                 outcome="success", details={"packages": [f["package_id"] for f in files],
                                             "recipients": sorted({f["recipient"] for f in files})})
    return payload


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------- import


def _manifest(paths: SitePaths, folder: Path) -> dict[str, Any]:
    """The verified manifest payload of the medium in `folder`."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError
    from securesystemslib.signer import SSlibKey

    file = folder / MANIFEST
    try:
        if file.stat().st_size > MAX_MANIFEST:
            raise MediaRefused(f"{file} is larger than {MAX_MANIFEST} bytes")
        envelope = Envelope.from_dict(audit.loads_strict(file.read_bytes()))
        payload = audit.loads_strict(envelope.payload)
        sender, created = payload["sender"], keys.parse_time(payload["created"])
        key_id = envelope.signatures and next(iter(envelope.signatures.values())).keyid
    except FileNotFoundError:
        raise MediaRefused(f"{folder} holds no {MANIFEST}: not a factory transfer") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise MediaRefused(f"{MANIFEST} is not a signed transfer manifest: {str(error)[:200]}") from None
    if envelope.payload_type != MANIFEST_TYPE or payload.get("type") != "transfer-manifest":
        raise MediaRefused(f"{MANIFEST} is not a transfer manifest")
    if sender not in SITES or sender == paths.site:  # before the name selects anything in the trust store
        raise MediaRefused(f"{MANIFEST} names sender {str(sender)[:64]!r}, not a configured partner of "
                           f"{paths.site}")
    if not isinstance(key_id, str):
        raise MediaRefused(f"{MANIFEST} carries no signature")
    try:
        public = keys.check_signing_key(paths, sender, key_id, signed_at=created)
        envelope.verify([SSlibKey.from_crypto(public, keyid=key_id)], 1)
    except keys.TrustError as error:
        raise MediaRefused(f"{MANIFEST} signature is not trusted: {error}") from None
    except VerificationError:
        raise MediaRefused(f"{MANIFEST} signature does not verify with {sender}'s key {key_id} "
                           "(altered manifest)") from None
    return payload


def _entries(payload: dict[str, Any], max_bytes: int) -> list[dict[str, Any]]:
    files = payload.get("files")
    if not isinstance(files, list):
        raise MediaRefused(f"{MANIFEST} lists no files")
    names = set()
    for number, entry in enumerate(files, start=1):
        try:
            name = safe_name(entry["name"], "file name")
            if not name.endswith(outbox.PACKAGE_SUFFIX) or name in names:
                raise UnsafeName(f"file name {name!r} is not a package name or is listed twice")
            if not isinstance(entry["sha256"], str) or not _SHA256.match(entry["sha256"]):
                raise ValueError("sha256 is not 64 hex digits")
            if type(entry["size"]) is not int or not 0 <= entry["size"] <= max_bytes:
                raise ValueError(f"size is not an integer up to {max_bytes}")
            entry["recipient"]  # noqa: B018 (required)
        except (UnsafeName, ValueError, KeyError, TypeError) as error:
            raise MediaRefused(f"{MANIFEST} entry {number} is not valid: {str(error)[:200]}") from None
        names.add(name)
    return files


def _discard(staged: dict[str, Path]) -> None:
    for temp in staged.values():
        temp.unlink(missing_ok=True)


def import_media(paths: SitePaths, folder: Path) -> dict[str, Any]:
    """Check the medium in `folder` whole, then ingest its packages for this site; returns what
    happened to each listed file. MediaRefused (and nothing imported) when the medium fails a check."""
    folder = Path(folder)
    settings = carrier_settings(paths.site)
    try:
        payload = _manifest(paths, folder)
        entries = _entries(payload, settings.max_package_bytes)
    except MediaRefused as refused:
        audit.append(paths, action="transfer.refused", actor=f"svc-{paths.site}", object=str(folder)[:200],
                     outcome="refused", details={"reason": str(refused)})
        raise
    sender = payload["sender"]
    staged: dict[str, Path] = {}
    try:
        for entry in entries:
            source = folder / entry["name"]
            if not source.is_file():
                raise MediaRefused(f"{entry['name']} is listed in the manifest but missing from {folder}")
            if source.stat().st_size != entry["size"]:
                raise MediaRefused(f"{entry['name']} was altered: {source.stat().st_size} bytes, "
                                   f"the manifest says {entry['size']}")
            if entry["recipient"] == paths.site:
                staged[entry["name"]] = staging_file(paths)
                with staged[entry["name"]].open("xb") as sink:
                    digest, size = _copy_hashing(source, sink)
            else:
                digest, size = _copy_hashing(source, None)
            if digest != entry["sha256"] or size != entry["size"]:
                raise MediaRefused(f"{entry['name']} was altered: its SHA-256 is not the one in the manifest")
    except MediaRefused as refused:
        _discard(staged)
        audit.append(paths, action="transfer.refused", actor=f"svc-{paths.site}", object=str(folder)[:200],
                     outcome="refused", details={"reason": str(refused), "sender": sender})
        raise
    except BaseException:
        _discard(staged)
        raise
    results = []
    for entry in entries:
        row = {"file": entry["name"], "recipient": entry["recipient"]}
        if entry["name"] not in staged:
            results.append(row | {"status": f"not for {paths.site}"})
            continue
        try:
            receipt = receive(paths, staged.pop(entry["name"]), peer=sender, transport="media", settings=settings)
            results.append(row | receipt.to_dict())
        except Refused as refused:
            results.append(row | {"status": "refused", "reason": refused.reason})
        except BaseException:
            _discard(staged)
            raise
    audit.append(paths, action="transfer.imported", actor=f"svc-{paths.site}", object=str(folder)[:200],
                 outcome="success", details={"sender": sender, "created": payload["created"],
                                             "results": [{k: r.get(k) for k in ("file", "status")} for r in results]})
    return {"sender": sender, "created": payload["created"], "files": results}


def hand_over(sender: SitePaths, recipient: SitePaths) -> dict[str, Any] | None:
    """The embedded carrier of `factory run --embedded` and tests, where one process plays every
    site: the sender's pending packages for `recipient` go through a medium (a temp folder) with
    every check of `transfer export/import`. None when nothing is pending."""
    if not any(r["recipient"] == recipient.site for r in outbox.pending(sender)):
        return None
    with tempfile.TemporaryDirectory(prefix="factory-medium-") as medium:
        export_media(sender, Path(medium) / "medium", recipient=recipient.site)
        return import_media(recipient, Path(medium) / "medium")
