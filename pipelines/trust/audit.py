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

The local head cannot catch someone who controls the whole site home: truncate the log and put an
older head back, or delete both. So heads are also anchored *outside* the site: `signed_head` is the
site's current head as a small signed document that travels inside every package it sends; the
recipient checks it and keeps it (`witness`, `state_dir/witnessed-heads.json`), and `verify(paths,
witnessed)` checks that the log still holds every head its partners witnessed.

A process killed in the middle of an append can leave a torn last line (no end of line). `verify`
rejects it; the next `append` moves the torn bytes to `audit.log.torn` beside the log, cuts the log
back to its last complete entry and records what it cut as an `audit.recovered` entry.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from pipelines.config import SITES
from pipelines.fileio import update_json, write_json
from pipelines.trust import keys
from pipelines.workspace import SitePaths

SIEM_FIELDS = ("time", "site", "actor", "action", "object", "outcome")
HEAD_TYPE = "application/vnd.factory.audit-head.v1+json"
WITNESSED_TYPE = "application/vnd.factory.witnessed-heads.v1+json"
HEAD_FIELDS = ("type", "site", "seq", "hash", "time", "key_id", "sig")
MAX_CLOCK_SKEW = timedelta(minutes=5)  # how far in the future a partner's head may be dated
MAX_WITNESSED_FILE = 64 * 1024 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


class AuditError(RuntimeError):
    """The audit log is broken or cannot be written; the message names the first bad entry."""


class StaleHead(AuditError):
    """A partner's head is older than one already witnessed for that partner (nothing was stored).

    Not a fork: a package sent earlier may simply arrive later. The head is refused because it adds
    nothing that a later witnessed head does not already prove."""


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"duplicate key {key[:60]!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_strict(data: bytes | str) -> Any:
    """JSON that means one thing to every reader: a key given twice, NaN or Infinity is a ValueError.

    (`json.loads` keeps the last of two equal keys where other readers keep the first, so a line
    with two `outcome`s could verify as "allow" and be read as "deny".)"""
    return json.loads(data, object_pairs_hook=_unique_pairs, parse_constant=_no_constant)


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _genesis(site: str) -> str:
    return hashlib.sha256(f"factory-audit-genesis:{site}".encode()).hexdigest()


def _entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k not in ("hash", "sig")})).hexdigest()


def _head_path(paths: SitePaths) -> Path:
    return paths.state_dir / "audit.head.json"


def _witnessed_path(paths: SitePaths) -> Path:
    return paths.state_dir / "witnessed-heads.json"


def _torn_path(paths: SitePaths) -> Path:
    return paths.audit_log.with_name(paths.audit_log.name + ".torn")


def _head_message(site: str, seq: int, digest: str) -> bytes:
    return f"factory-audit-head:{site}:{seq}:{digest}".encode()


def _sign(paths: SitePaths, message: bytes) -> str:
    return base64.b64encode(keys.signing_key(paths).sign(message, ec.ECDSA(hashes.SHA256()))).decode()


def _check_sig(public: ec.EllipticCurvePublicKey, sig: Any, message: bytes) -> bool:
    if not isinstance(sig, str):
        return False
    try:
        public.verify(base64.b64decode(sig, validate=True), message, ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ValueError):
        return False


# ---------------------------------------------------------------- the end of the log


def _complete_end(fd: int) -> tuple[int, int]:
    """(offset just after the last end of line, file size): bytes in between are a torn line."""
    size = os.fstat(fd).st_size
    position = size
    while position > 0:
        step = min(65536, position)
        position -= step
        newline = os.pread(fd, step, position).rfind(b"\n")
        if newline >= 0:
            return position + newline + 1, size
    return 0, size


def _last_line(fd: int, end: int) -> bytes | None:
    """The last non-empty line of the first `end` bytes of the file behind `fd`, read backwards in blocks."""
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


def _local_head(paths: SitePaths) -> dict[str, Any] | None:
    """The head file as written by `append` (its signature is checked by `verify`, not here)."""
    try:
        head = loads_strict(_head_path(paths).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        head = None
    if not (isinstance(head, dict) and type(head.get("seq")) is int and isinstance(head.get("hash"), str)):
        raise AuditError(f"{_head_path(paths)} is not a valid signed head; run `factory audit verify`")
    return head


def _last_entry(paths: SitePaths, fd: int, end: int) -> tuple[int, str]:
    """(seq, hash) of the last complete entry, checked against the local head: a log that no longer
    reaches its head was cut, and appending would hide that."""
    last = _last_line(fd, end)
    if last is None:
        seq, digest = 0, _genesis(paths.site)
    else:
        try:
            previous = loads_strict(last)
            seq, digest = previous["seq"], previous["hash"]
            if type(seq) is not int or not isinstance(digest, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise AuditError(
                f"cannot use {paths.audit_log}: its last entry is unreadable; run `factory audit verify`"
            ) from None
    head = _local_head(paths)
    if head is not None and (head["seq"] > seq or (head["seq"] == seq and head["hash"] != digest)):
        raise AuditError(
            f"cannot use {paths.audit_log}: it ends at seq {seq} but the signed head records seq {head['seq']} "
            "(the log was cut or replaced); run `factory audit verify`"
        )
    return seq, digest


def _move_torn_tail(paths: SitePaths, fd: int, end: int, size: int) -> dict[str, Any]:
    """Keep the torn bytes in audit.log.torn, then cut the log back to its last complete line."""
    torn = os.pread(fd, size - end, end)
    digest = hashlib.sha256(torn).hexdigest()
    record = {"time": keys.iso(keys.now()), "offset": end, "length": len(torn), "sha256": digest,
              "data_b64": base64.b64encode(torn).decode()}
    keep = os.open(_torn_path(paths), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(keep, _canonical(record) + b"\n")
        os.fsync(keep)
    finally:
        os.close(keep)
    os.ftruncate(fd, end)
    os.fsync(fd)
    return {"cut_at_byte": end, "cut_bytes": len(torn), "cut_sha256": digest, "moved_to": _torn_path(paths).name}


def _write_entry(paths: SitePaths, fd: int, seq: int, prev: str, fields: dict[str, Any]) -> dict[str, Any]:
    entry = {"seq": seq, "time": keys.iso(keys.now()), "site": paths.site, **fields, "prev": prev,
             "key_id": keys.signing_key_id(paths)}
    entry = json.loads(_canonical(entry))  # what verify will see (tuples -> lists, objects -> str)
    entry["hash"] = _entry_hash(entry)
    entry["sig"] = _sign(paths, entry["hash"].encode())
    os.write(fd, _canonical(entry) + b"\n")
    os.fsync(fd)
    head = {"seq": seq, "hash": entry["hash"], "key_id": entry["key_id"],
            "sig": _sign(paths, _head_message(paths.site, seq, entry["hash"]))}
    write_json(_head_path(paths), head)
    return entry


def append(
    paths: SitePaths, *, action: str, actor: str, object: str, outcome: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Append one signed, chained entry and return it. Safe with concurrent writers.

    A torn last line left by a killed writer is moved aside first and recorded as `audit.recovered`."""
    keys.keyring(paths)  # raises KeysMissing with a clear message before anything is written
    paths.audit_log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.audit_log, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        end, size = _complete_end(fd)
        seq, prev = _last_entry(paths, fd, end)
        if size > end:
            cut = _move_torn_tail(paths, fd, end, size)
            recovered = _write_entry(paths, fd, seq + 1, prev, {
                "actor": f"svc-{paths.site}", "action": "audit.recovered", "object": paths.audit_log.name,
                "outcome": "recovered", "details": cut | {"after_seq": seq}})
            seq, prev = recovered["seq"], recovered["hash"]
        return _write_entry(paths, fd, seq + 1, prev, {
            "actor": actor, "action": action, "object": object, "outcome": outcome, "details": details or {}})
    finally:
        os.close(fd)  # releases the flock


def entries(paths: SitePaths) -> Iterator[dict[str, Any]]:
    """The log's entries in order (unverified; call `verify` first when it matters)."""
    if not paths.audit_log.exists():
        return
    with paths.audit_log.open("rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield loads_strict(line)
                except ValueError as error:
                    raise AuditError(f"{paths.audit_log}: line {line_no} is not a valid audit entry ({error})") from None


# ---------------------------------------------------------------- heads anchored at partners


def _head_body(head: dict[str, Any]) -> bytes:
    return _canonical({k: head[k] for k in HEAD_FIELDS if k != "sig"})


def signed_head(paths: SitePaths) -> dict[str, Any]:
    """The site's current head (last complete entry) as a signed document for a package's metadata.

    Fields: `type` (HEAD_TYPE), `site`, `seq` (0 for an empty log), `hash` (that entry's hash; the
    genesis value for seq 0), `time` (when this document was signed, UTC ISO), `key_id` and `sig`
    (base64 ECDSA P-256/SHA-256 over the canonical JSON of the other six fields)."""
    keys.keyring(paths)
    try:
        fd = os.open(paths.audit_log, os.O_RDONLY)
    except FileNotFoundError:
        fd = None
    try:
        if fd is None:
            seq, digest = _last_entry_of_missing_log(paths)
        else:
            fcntl.flock(fd, fcntl.LOCK_SH)
            seq, digest = _last_entry(paths, fd, _complete_end(fd)[0])
    finally:
        if fd is not None:
            os.close(fd)
    head = {"type": HEAD_TYPE, "site": paths.site, "seq": seq, "hash": digest, "time": keys.iso(keys.now()),
            "key_id": keys.signing_key_id(paths)}
    head["sig"] = _sign(paths, _head_body(head))
    return head


def _last_entry_of_missing_log(paths: SitePaths) -> tuple[int, str]:
    head = _local_head(paths)
    if head is not None and head["seq"] > 0:
        raise AuditError(f"{paths.audit_log} is missing but the signed head records seq {head['seq']}; "
                         "run `factory audit verify`")
    return 0, _genesis(paths.site)


def _head_problem(head: Any, *, extra: Iterable[str] = ()) -> str | None:
    """What is wrong with the shape of a head document (None when it is well formed)."""
    if not isinstance(head, dict):
        return "a signed head must be a JSON object"
    unknown = set(head) - set(HEAD_FIELDS) - set(extra)
    missing = set(HEAD_FIELDS) - set(head)
    if unknown or missing:
        return f"fields {sorted(missing)} missing, {sorted(str(k)[:40] for k in unknown)[:5]} unexpected"
    if head["type"] != HEAD_TYPE:
        return f"type {str(head['type'])[:80]!r} is not {HEAD_TYPE}"
    if not isinstance(head["site"], str):
        return "site is not a string"
    if type(head["seq"]) is not int or head["seq"] < 0:
        return "seq is not a non-negative integer"
    if not isinstance(head["hash"], str) or not _HEX64.match(head["hash"]):
        return "hash is not 64 hex digits"
    if not isinstance(head["key_id"], str) or not _KEY_ID.match(head["key_id"]):
        return "key_id is not 16 hex digits"
    if not isinstance(head["sig"], str) or len(head["sig"]) > 200:
        return "sig is not a short base64 string"
    try:
        signed_at = keys.parse_time(head["time"]) if isinstance(head["time"], str) else None
    except ValueError:
        signed_at = None
    if signed_at is None or signed_at.tzinfo is None:
        return "time is not an ISO time with a zone"
    return None


def _refuse(paths: SitePaths, head: Any, reason: str) -> AuditError:
    claimed = head.get("site") if isinstance(head, dict) else None
    append(paths, action="audit.head_refused", actor=f"svc-{paths.site}", object=str(claimed)[:64],
           outcome="refused", details={"reason": reason})
    return AuditError(f"partner audit head refused: {reason}")


def witness(paths: SitePaths, head: dict[str, Any]) -> None:
    """Check a partner's signed head (taken from a verified package) and keep it.

    Refused (AuditError, an `audit.head_refused` entry, nothing stored): a malformed document, a
    `site` that is not one of the configured sites or is this site, a key the partner is not trusted
    with, a bad signature, a time in the future. A head whose seq was already witnessed with another
    hash is a fork: an `audit.fork_witnessed` entry and AuditError. A head older than the newest one
    witnessed for that partner raises StaleHead and is not stored. The same head twice is a no-op."""
    problem = _head_problem(head)
    if problem is None:
        partner = head["site"]
        if partner == paths.site:
            problem = f"the head is of {paths.site} itself, which is not a partner"
        elif partner not in SITES:  # checked before the name reaches the trust store
            problem = f"site {partner[:64]!r} is not a configured partner ({', '.join(SITES)})"
    if problem is None:
        signed_at = keys.parse_time(head["time"])
        if signed_at > keys.now() + MAX_CLOCK_SKEW:
            problem = f"the head is dated {head['time']}, in the future"
    if problem is None:
        try:
            public = keys.check_signing_key(paths, partner, head["key_id"], signed_at=signed_at)
        except keys.TrustError as error:
            problem = str(error)
        else:
            if not _check_sig(public, head["sig"], _head_body(head)):
                problem = f"the signature of the {partner} head (seq {head['seq']}) does not verify"
    if problem is not None:
        raise _refuse(paths, head, problem)
    head = {k: head[k] for k in HEAD_FIELDS}
    with update_json(_witnessed_path(paths), {}) as state:
        stored = state.get(partner, [])
        for known in stored:
            if known["seq"] == head["seq"] and known["hash"] != head["hash"]:
                append(paths, action="audit.fork_witnessed", actor=f"svc-{paths.site}", object=partner,
                       outcome="fork", details={"seq": head["seq"], "witnessed": known, "received": head})
                raise AuditError(
                    f"{partner} forked its audit log: seq {head['seq']} was witnessed with hash "
                    f"{known['hash'][:16]}… at {known['time']} and now arrives with hash {head['hash'][:16]}…"
                )
        if any(known["seq"] == head["seq"] for known in stored):
            return
        newest = max((known["seq"] for known in stored), default=-1)
        if head["seq"] < newest:
            raise StaleHead(f"the {partner} head at seq {head['seq']} is older than the one witnessed "
                            f"at seq {newest}; not stored")
        state[partner] = [*stored, head]


def witnessed_heads(paths: SitePaths, of: str) -> list[dict[str, Any]]:
    """The heads of site `of` that `paths.site` witnessed, oldest first, each with `witnessed_by`
    (unverified here: pass them to `verify`, which checks every signature)."""
    if of not in SITES:
        raise AuditError(f"unknown site {of[:64]!r}")
    try:
        state = loads_strict(_witnessed_path(paths).read_bytes())
    except FileNotFoundError:
        return []
    except ValueError as error:
        raise AuditError(f"{_witnessed_path(paths)} is not valid JSON ({error})") from None
    heads = state.get(of, []) if isinstance(state, dict) else None
    if not isinstance(heads, list):
        raise AuditError(f"{_witnessed_path(paths)} does not hold a list of heads for {of}")
    return [head | {"witnessed_by": paths.site} if isinstance(head, dict) else head for head in heads]


def export_witnessed(paths: SitePaths, of: str, out: Path) -> int:
    """Write what `paths.site` witnessed of `of` to `out` (for `verify` on another machine); returns the count."""
    if of == paths.site:
        raise AuditError(f"{paths.site} does not witness its own log")
    heads = witnessed_heads(paths, of)
    write_json(out, {"type": WITNESSED_TYPE, "witness": paths.site, "site": of, "heads": heads})
    return len(heads)


def load_witnessed(file: Path, site: str) -> list[dict[str, Any]]:
    """The heads of `site` in a file written by `export_witnessed`, each marked with who witnessed it."""
    file = Path(file)
    if file.stat().st_size > MAX_WITNESSED_FILE:
        raise AuditError(f"{file} is larger than {MAX_WITNESSED_FILE} bytes")
    try:
        document = loads_strict(file.read_bytes())
    except ValueError as error:
        raise AuditError(f"{file} is not valid JSON ({error})") from None
    if not isinstance(document, dict) or document.get("type") != WITNESSED_TYPE:
        raise AuditError(f"{file} is not a witnessed-heads export ({WITNESSED_TYPE})")
    if document.get("site") != site:
        raise AuditError(f"{file} holds heads of {str(document.get('site'))[:64]!r}, not of {site}")
    witness_name, heads = document.get("witness"), document.get("heads")
    if not isinstance(witness_name, str) or not isinstance(heads, list):
        raise AuditError(f"{file} has no witness name or no list of heads")
    return [head | {"witnessed_by": witness_name[:64]} if isinstance(head, dict) else head for head in heads]


# ---------------------------------------------------------------- verify


def _public_keys(paths: SitePaths) -> dict[str, ec.EllipticCurvePublicKey]:
    return {r["signing_key_id"]: keys.check_signing_key(paths, paths.site, r["signing_key_id"])
            for r in keys.records(paths, paths.site)}


def _anchors(paths: SitePaths, witnessed: list[dict[str, Any]], public: dict[str, ec.EllipticCurvePublicKey]
             ) -> dict[int, list[tuple[str, str]]]:
    """seq -> [(hash, who witnessed it)] for every witnessed head, each checked to be signed by this site."""
    anchors: dict[int, list[tuple[str, str]]] = {}
    for number, head in enumerate(witnessed, start=1):
        problem = _head_problem(head, extra=("witnessed_by",))
        if problem is not None:
            raise AuditError(f"witnessed head #{number} is not a valid signed head: {problem}")
        who = str(head.get("witnessed_by", "a partner"))[:64]
        if head["site"] != paths.site:
            raise AuditError(f"witnessed head #{number} (from {who}) is of site {head['site'][:64]!r}, "
                             f"not {paths.site}")
        key = public.get(head["key_id"])
        if key is None or not _check_sig(key, head["sig"], _head_body(head)):
            raise AuditError(f"witnessed head #{number} (from {who}, seq {head['seq']}) has no valid signature "
                             f"by a {paths.site} key")
        anchors.setdefault(head["seq"], []).append((head["hash"], who))
    return anchors


def _lines_until(handle: IO[bytes], size: int) -> Iterator[bytes]:
    """The file's lines up to byte `size` (what was there when verify took its snapshot)."""
    position = 0
    for line in handle:
        line = line[: size - position]
        if line:
            yield line
        position += len(line)
        if position >= size:
            return


def verify(paths: SitePaths, witnessed: list[dict[str, Any]] | None = None) -> None:
    """Check chain, signatures, the local head and the heads partners witnessed (`witnessed`: head
    documents of this site, as `witness` stored them; an extra `witnessed_by` names the witness in
    errors). Raise AuditError naming the first bad entry. A site with keys must have a log."""
    public = _public_keys(paths)  # KeysMissing when the site has no keys
    anchors = _anchors(paths, witnessed or [], public)
    log, head_file = paths.audit_log, _head_path(paths)
    for hash_, who in anchors.get(0, []):
        if hash_ != _genesis(paths.site):
            raise AuditError(f"the seq 0 head witnessed by {who} does not start the {paths.site} chain")
    head, seq = None, 0
    try:
        handle = log.open("rb")
    except FileNotFoundError:
        handle = None
    try:
        if handle is not None:  # a consistent snapshot: appends hold an exclusive lock on the log
            fcntl.flock(handle, fcntl.LOCK_SH)
            size = os.fstat(handle.fileno()).st_size
            head = _checked_local_head(paths, public)
            fcntl.flock(handle, fcntl.LOCK_UN)
            seq = _verify_lines(paths, _lines_until(handle, size), public, head, anchors)
        else:
            head = _checked_local_head(paths, public)
    finally:
        if handle is not None:
            handle.close()
    if head is not None and seq < head["seq"]:
        raise AuditError(
            f"{log} is truncated: it ends at seq {seq} but the signed head records seq {head['seq']} "
            f"(entry seq {seq + 1} is the first missing)"
        )
    beyond = [(s, who) for s, witnessed_here in anchors.items() if s > seq for _, who in witnessed_here]
    if beyond:
        s, who = max(beyond)
        raise AuditError(
            f"{log} is truncated or was replaced: it ends at seq {seq} but {who} witnessed seq {s} "
            f"(entry seq {seq + 1} is the first missing)"
        )
    if seq == 0:
        raise AuditError(f"{log} is missing or empty but site {paths.site} has keys (log and head removed?)")
    if head is None:
        raise AuditError(f"{log}: the signed head {head_file} is missing (log or head was removed)")


def _checked_local_head(paths: SitePaths, public: dict[str, ec.EllipticCurvePublicKey]) -> dict[str, Any] | None:
    head_file = _head_path(paths)
    try:
        head = _local_head(paths)
    except AuditError:
        raise AuditError(f"{head_file}: the signed head does not verify") from None
    if head is not None:
        key = public.get(head.get("key_id"))
        if key is None or not _check_sig(key, head.get("sig"), _head_message(paths.site, head["seq"], head["hash"])):
            raise AuditError(f"{head_file}: the signed head does not verify")
    return head


def _verify_lines(paths: SitePaths, lines: Iterable[bytes], public: dict[str, ec.EllipticCurvePublicKey],
                  head: dict[str, Any] | None, anchors: dict[int, list[tuple[str, str]]]) -> int:
    """Check each line in order; return the last seq."""
    log = paths.audit_log
    prev, seq = _genesis(paths.site), 0
    for line_no, line in enumerate(lines, start=1):
        where = f"{log}: line {line_no}"
        if not line.endswith(b"\n"):
            raise AuditError(f"{where} is not a valid audit entry (torn: it has no end of line, a write was cut "
                             "short; the next append moves it aside and records the recovery)")
        try:
            entry = loads_strict(line)
            claimed = entry["seq"]
        except _DuplicateKey as error:
            raise AuditError(f"{where} is not a valid audit entry: {error} (edited)") from None
        except (ValueError, KeyError, TypeError):
            raise AuditError(f"{where} is not a valid audit entry (edited or truncated)") from None
        if type(claimed) is not int:
            raise AuditError(f"{where} is not a valid audit entry (seq is not an integer)")
        if claimed != seq + 1:
            problem = "missing or reordered" if claimed > seq + 1 else "inserted, duplicated or reordered"
            raise AuditError(f"{where}: expected entry seq {seq + 1}, found seq {claimed} (entry {problem})")
        if entry.get("site") != paths.site:
            raise AuditError(f"{where} (seq {claimed}) belongs to site {str(entry.get('site'))[:64]!r}")
        if entry.get("hash") != _entry_hash(entry):
            raise AuditError(f"{where} (seq {claimed}) was modified: its hash does not match its content")
        if entry.get("prev") != prev:
            raise AuditError(f"{where} (seq {claimed}) does not chain to the previous entry")
        key = public.get(entry.get("key_id"))
        if key is None or not _check_sig(key, entry.get("sig"), entry["hash"].encode()):
            raise AuditError(f"{where} (seq {claimed}) has no valid signature by a {paths.site} key")
        if head is not None and claimed == head["seq"] and entry["hash"] != head["hash"]:
            raise AuditError(f"{where} (seq {claimed}) differs from the entry recorded in the signed head")
        for hash_, who in anchors.get(claimed, []):
            if entry["hash"] != hash_:
                raise AuditError(f"{where} (seq {claimed}) differs from the head {who} witnessed "
                                 f"(hash {hash_[:16]}…): the log was rewritten at or before seq {claimed}")
        prev, seq = entry["hash"], claimed
    return seq


def siem_record(entry: dict[str, Any]) -> dict[str, Any]:
    """One entry as a SIEM event: the common fields first, then chain position and details."""
    record = {field: entry[field] for field in SIEM_FIELDS}
    record.update({"seq": entry["seq"], "hash": entry["hash"], "details": entry["details"]})
    return record
