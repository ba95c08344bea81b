"""The sender's outbox: sealed packages waiting for a carrier, with one delivery record each.

A site writes what it sends only here (`outbox/<kind>-<package_id>.sfp`). `outbox/delivery.json`
holds a record per package, changed only under its lock (`pipelines.fileio.update_json`):

- `state`: `pending` (waiting for a carrier), `delivered` (`via` https or media) or `refused`
  (the recipient said no: `reason`, never retried on its own);
- `attempts`, `last_error` and `next_attempt_at`: a push that could not reach the recipient, or was
  not let in by it, leaves the package pending and backs off exponentially (conf `retry_base_seconds`
  doubling up to `retry_max_seconds`).

Delivered packages stay in the outbox as the sender's copy of what left.
"""

from __future__ import annotations

import os
import re
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pipelines.carrier.settings import CarrierError, carrier_settings
from pipelines.fileio import atomic_path, read_json, update_json
from pipelines.trust import audit, keys
from pipelines.workspace import SitePaths, UnsafeName, safe_name

PACKAGE_SUFFIX = ".sfp"
PENDING, DELIVERED, REFUSED = "pending", "delivered", "refused"
STATES = (PENDING, DELIVERED, REFUSED)
_PACKAGE_ID = re.compile(r"^[0-9a-f]{32}$")


def state_file(paths: SitePaths) -> Path:
    return paths.outbox / "delivery.json"


def package_kind(header: dict[str, Any]) -> str:
    """The kind a package is delivered as (`inbox/<kind>-<id>.sfp`, asset `factory://<site>/inbox/<kind>`):
    the `kind` of its metadata, else its content type. Must be a plain name."""
    metadata = header.get("metadata")
    kind = metadata.get("kind") if isinstance(metadata, dict) and metadata.get("kind") else header.get("content_type")
    return safe_name(kind, "package kind")


def package_id_of(header: dict[str, Any]) -> str:
    package_id = header.get("package_id")
    if not isinstance(package_id, str) or not _PACKAGE_ID.match(package_id):
        raise UnsafeName(f"package id {str(package_id)[:40]!r} is not 32 hex digits")
    return package_id


def file_name(kind: str, package_id: str) -> str:
    return f"{kind}-{package_id}{PACKAGE_SUFFIX}"


def _move(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError:  # another file system: copy whole, then remove the source
        with atomic_path(target, 0o600) as tmp:
            shutil.copyfile(source, tmp)
        source.unlink()


def enqueue(paths: SitePaths, package: Path, header: dict[str, Any]) -> dict[str, Any]:
    """Put the sealed `package` (its `header` as `seal` returned it) into the outbox, pending.

    A package elsewhere is moved in; enqueueing the same package again changes nothing."""
    package = Path(package)
    if header.get("sender") != paths.site:
        raise CarrierError(f"{package} was sealed by {str(header.get('sender'))[:64]!r}, not {paths.site}")
    recipient = header.get("recipient")
    carrier_settings(recipient)  # a configured site, or WorkspaceError
    package_id, kind = package_id_of(header), package_kind(header)
    target = paths.outbox / file_name(kind, package_id)
    with update_json(state_file(paths), {}) as state:
        if package_id in state:
            return state[package_id]
        if package.resolve() != target.resolve():
            paths.outbox.mkdir(parents=True, exist_ok=True)
            _move(package, target)
        now = keys.iso(keys.now())
        record = state[package_id] = {
            "package_id": package_id, "file": target.name, "recipient": recipient, "kind": kind,
            "size": target.stat().st_size, "expires": header.get("expires"), "enqueued_at": now,
            "state": PENDING, "attempts": 0, "last_error": None, "next_attempt_at": now,
            "reason": None, "via": None, "delivered_at": None,
        }
    return record


def seal_to_outbox(paths: SitePaths, recipient: str, src: Path, **seal_options: Any) -> tuple[dict, dict]:
    """Seal `src` for `recipient` straight into the outbox and enqueue it: (header, delivery record).
    `seal_options` are those of `pipelines.trust.packages.seal` (purpose, content_type, metadata, ...)."""
    from pipelines.trust.packages import seal

    paths.outbox.mkdir(parents=True, exist_ok=True)
    staging = paths.outbox / f".sealing-{os.getpid()}-{os.urandom(4).hex()}{PACKAGE_SUFFIX}"
    try:
        header = seal(paths, recipient, Path(src), staging, **seal_options)
        return header, enqueue(paths, staging, header)
    finally:
        staging.unlink(missing_ok=True)


def list_packages(paths: SitePaths) -> list[dict[str, Any]]:
    """Every delivery record, oldest first."""
    try:
        state = read_json(state_file(paths))
    except FileNotFoundError:
        return []
    return sorted(state.values(), key=lambda record: (record["enqueued_at"], record["package_id"]))


def pending(paths: SitePaths, *, due_at: datetime | None = None) -> list[dict[str, Any]]:
    """Pending records, oldest first; with `due_at`, only those whose next attempt is due by then."""
    return [record for record in list_packages(paths) if record["state"] == PENDING
            and (due_at is None or keys.parse_time(record["next_attempt_at"]) <= due_at)]


def backoff(attempts: int, base: float, most: float) -> timedelta:
    """Wait after the `attempts`-th failed attempt: base, 2 base, 4 base, ... at most `most` seconds."""
    return timedelta(seconds=min(most, base * 2 ** max(0, min(attempts, 40) - 1)))


def mark(paths: SitePaths, package_id: str, state: str, *, reason: str | None = None, error: str | None = None,
         via: str | None = None) -> dict[str, Any]:
    """Change a package's delivery record and return it.

    - `delivered` (`via`: https or media) and `refused` (`reason`: the recipient's) are final;
      each counts as an attempt when `via` or `reason` came from a push.
    - `pending` with `error`: an attempt failed (unreachable, TLS refused, recipient busy); the
      package waits `backoff(attempts)` before the next one.
    - `pending` without `error`: queue a refused or failed package again, due now.

    A delivered package stays delivered, and a failed attempt changes only a pending record (two
    pushers may race; the recipient keeps one copy either way).
    """
    if state not in STATES:
        raise ValueError(f"unknown delivery state {state!r}; states are {', '.join(STATES)}")
    now = keys.now()
    with update_json(state_file(paths), {}) as records:
        record = records.get(package_id)
        if record is None:
            raise CarrierError(f"no package {str(package_id)[:40]} in the {paths.site} outbox")
        if (record["state"] == DELIVERED and state != PENDING) or (error is not None and record["state"] != PENDING):
            return dict(record)  # a concurrent push settled it first: keep that outcome
        if state == PENDING and error is not None:
            settings = carrier_settings(paths.site)
            record["attempts"] += 1
            record["last_error"] = error
            wait = backoff(record["attempts"], settings.retry_base_seconds, settings.retry_max_seconds)
            record["next_attempt_at"] = keys.iso(now + wait)
        elif state == PENDING:
            record.update(state=PENDING, reason=None, next_attempt_at=keys.iso(now))
        else:
            if via == "https" or state == REFUSED:
                record["attempts"] += 1
            record.update(state=state, reason=reason, via=via,
                          delivered_at=keys.iso(now) if state == DELIVERED else None)
        return dict(record)


def _audit_outcome(paths: SitePaths, record: dict[str, Any]) -> None:
    """One sender-side audit entry for a final delivery state."""
    if record["state"] == DELIVERED:
        audit.append(paths, action="package.delivered", actor=f"svc-{paths.site}", object=record["package_id"],
                     outcome="success", details={k: record[k] for k in ("recipient", "kind", "via", "attempts")})
    elif record["state"] == REFUSED:
        audit.append(paths, action="package.delivery_refused", actor=f"svc-{paths.site}",
                     object=record["package_id"], outcome="refused",
                     details={k: record[k] for k in ("recipient", "kind", "reason", "attempts")})


def settle(paths: SitePaths, package_id: str, state: str, **changes: Any) -> dict[str, Any]:
    """`mark`, then audit a final state at the sender."""
    record = mark(paths, package_id, state, **changes)
    _audit_outcome(paths, record)
    return record
