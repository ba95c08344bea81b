"""The site's tamper-evident audit log: hash-chained JSON lines, every entry signed.

Each line carries `seq`, `prev` (the previous entry's hash), `hash` (SHA-256 over the entry's
canonical JSON without `hash`/`sig`) and `sig` (ECDSA P-256 by the site's signing key, `key_id`).
Why every entry and not periodic checkpoints: an entry is then verifiable the moment it is written,
so there is no unsigned tail an intruder could rewrite between checkpoints; at ~0.1 ms per signature
the cost is negligible next to the fsync each entry gets anyway.

A chain alone cannot show that its last entries were cut off, so each append also rewrites a
signed *head* (`state_dir/audit.head.json`: last seq and hash). `verify` checks the chain, every
signature and that the log still reaches the head. Writers from several processes serialise on an
flock of the log file; each entry is one O_APPEND write followed by fsync.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from pipelines.fileio import read_json, write_json
from pipelines.trust import keys
from pipelines.workspace import SitePaths

SIEM_FIELDS = ("time", "site", "actor", "action", "object", "outcome")


class AuditError(RuntimeError):
    """The audit log is broken or cannot be written; the message names the first bad entry."""


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _genesis(site: str) -> str:
    return hashlib.sha256(f"factory-audit-genesis:{site}".encode()).hexdigest()


def _entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k not in ("hash", "sig")})).hexdigest()


def _head_path(paths: SitePaths) -> Path:
    return paths.state_dir / "audit.head.json"


def _head_message(site: str, seq: int, digest: str) -> bytes:
    return f"factory-audit-head:{site}:{seq}:{digest}".encode()


def _sign(paths: SitePaths, message: bytes) -> str:
    return base64.b64encode(keys.signing_key(paths).sign(message, ec.ECDSA(hashes.SHA256()))).decode()


def _last_line(fd: int) -> bytes | None:
    """The last non-empty line of the file behind `fd`, read backwards in blocks."""
    end = os.fstat(fd).st_size
    tail = b""
    position = end
    while position > 0:
        step = min(65536, position)
        position -= step
        tail = os.pread(fd, step, position) + tail
        stripped = tail.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1]
    stripped = tail.rstrip(b"\n")
    return stripped or None


def append(
    paths: SitePaths, *, action: str, actor: str, object: str, outcome: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Append one signed, chained entry and return it. Safe with concurrent writers."""
    keys.keyring(paths)  # raises KeysMissing with a clear message before anything is written
    paths.audit_log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.audit_log, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        last = _last_line(fd)
        if last is None:
            seq, prev = 1, _genesis(paths.site)
        else:
            try:
                previous = json.loads(last)
                seq, prev = previous["seq"] + 1, previous["hash"]
            except (ValueError, KeyError, TypeError):
                raise AuditError(
                    f"cannot append to {paths.audit_log}: its last entry is unreadable; run `factory audit verify`"
                ) from None
        entry = {
            "seq": seq, "time": keys.iso(keys.now()), "site": paths.site, "actor": actor, "action": action,
            "object": object, "outcome": outcome, "details": details or {}, "prev": prev,
            "key_id": keys.signing_key_id(paths),
        }
        entry = json.loads(_canonical(entry))  # what verify will see (tuples -> lists, objects -> str)
        entry["hash"] = _entry_hash(entry)
        entry["sig"] = _sign(paths, entry["hash"].encode())
        os.write(fd, _canonical(entry) + b"\n")
        os.fsync(fd)
        head = {"seq": seq, "hash": entry["hash"], "key_id": entry["key_id"],
                "sig": _sign(paths, _head_message(paths.site, seq, entry["hash"]))}
        write_json(_head_path(paths), head)
        return entry
    finally:
        os.close(fd)  # releases the flock


def entries(paths: SitePaths) -> Iterator[dict[str, Any]]:
    """The log's entries in order (unverified; call `verify` first when it matters)."""
    if not paths.audit_log.exists():
        return
    with paths.audit_log.open("rb") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _public_keys(paths: SitePaths) -> dict[str, ec.EllipticCurvePublicKey]:
    return {r["signing_key_id"]: keys.check_signing_key(paths, paths.site, r["signing_key_id"])
            for r in keys.records(paths, paths.site)}


def _check_sig(public: ec.EllipticCurvePublicKey, sig: str, message: bytes) -> bool:
    try:
        public.verify(base64.b64decode(sig), message, ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ValueError):
        return False


def verify(paths: SitePaths) -> None:
    """Check chain, signatures and head; raise AuditError naming the first bad entry."""
    public = _public_keys(paths)
    log, head_file = paths.audit_log, _head_path(paths)
    head = None
    if head_file.exists():
        head = read_json(head_file)
        key = public.get(head.get("key_id"))
        message = _head_message(paths.site, head.get("seq", 0), head.get("hash", ""))
        if key is None or not _check_sig(key, head.get("sig", ""), message):
            raise AuditError(f"{head_file}: the signed head does not verify")
    prev, seq = _genesis(paths.site), 0
    if log.exists():
        with log.open("rb") as handle:
            for line_no, line in enumerate(handle, start=1):
                where = f"{log}: line {line_no}"
                try:
                    entry = json.loads(line)
                    claimed = entry["seq"]
                except (ValueError, KeyError, TypeError):
                    raise AuditError(f"{where} is not a valid audit entry (edited or truncated)") from None
                if claimed != seq + 1:
                    problem = "missing or reordered" if claimed > seq + 1 else "inserted, duplicated or reordered"
                    raise AuditError(f"{where}: expected entry seq {seq + 1}, found seq {claimed} (entry {problem})")
                if entry.get("site") != paths.site:
                    raise AuditError(f"{where} (seq {claimed}) belongs to site {entry.get('site')!r}")
                if entry.get("hash") != _entry_hash(entry):
                    raise AuditError(f"{where} (seq {claimed}) was modified: its hash does not match its content")
                if entry.get("prev") != prev:
                    raise AuditError(f"{where} (seq {claimed}) does not chain to the previous entry")
                key = public.get(entry.get("key_id"))
                if key is None or not _check_sig(key, entry.get("sig", ""), entry["hash"].encode()):
                    raise AuditError(f"{where} (seq {claimed}) has no valid signature by a {paths.site} key")
                if head is not None and claimed == head["seq"] and entry["hash"] != head["hash"]:
                    raise AuditError(f"{where} (seq {claimed}) differs from the entry recorded in the signed head")
                prev, seq = entry["hash"], claimed
    if head is None:
        if seq:
            raise AuditError(f"{log}: the signed head {head_file} is missing (log or head was removed)")
    elif seq < head["seq"]:
        raise AuditError(
            f"{log} is truncated: it ends at seq {seq} but the signed head records seq {head['seq']} "
            f"(entry seq {seq + 1} is the first missing)"
        )


def siem_record(entry: dict[str, Any]) -> dict[str, Any]:
    """One entry as a SIEM event: the common fields first, then chain position and details."""
    record = {field: entry[field] for field in SIEM_FIELDS}
    record.update({"seq": entry["seq"], "hash": entry["hash"], "details": entry["details"]})
    return record
