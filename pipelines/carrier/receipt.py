"""Where a delivered package enters a site, whichever carrier brought it (inbox service or media).

`receive` takes a package the carrier has written to a temporary file in the site's inbox folder,
and the partner the carrier authenticated (the TLS peer, or the signer of the media manifest).
Before anything is stored it checks: the size limit; the envelope (signature by a trusted,
unrevoked key of the sender, this site as recipient, not expired: `read_signed_header`); that the
sender is the authenticated partner; that the kind and package id are plain names; then, unless the
package is already here, everything opening would check (every content chunk, replay, sequence:
`verify_package`). The package is then renamed into `inbox/<kind>-<package_id>.sfp` under the
receipts lock, so the same package id delivered twice is stored once. A `package.received` audit
entry follows, then the asset event to the site's own Airflow (`events.notify`).

Any refusal removes the temporary file (nothing is left behind), writes a `package.refused` audit
entry and raises `Refused` with a status for the inbox service's answer and a one-line reason.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.carrier import events
from pipelines.carrier.outbox import file_name, package_id_of, package_kind
from pipelines.carrier.settings import carrier_settings
from pipelines.config import Carrier
from pipelines.fileio import read_json, update_json
from pipelines.trust import audit, keys, packages
from pipelines.trust.envelope import PackageRejected
from pipelines.workspace import SitePaths, UnsafeName

log = logging.getLogger("factory.carrier")
STORED, ALREADY = "stored", "already have"


class Refused(Exception):
    """The package is not taken; `status` is the HTTP status the inbox answers with."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Receipt:
    status: str  # STORED or ALREADY
    package_id: str
    kind: str
    sender: str
    file: str  # the name in inbox/
    event: str  # what happened to the asset event, in words

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def receipts_file(paths: SitePaths) -> Path:
    return paths.state_dir / "carrier" / "received.json"


def staging_file(paths: SitePaths) -> Path:
    """A fresh temporary name in the inbox folder for a carrier to write an incoming package to
    (hidden and not `.sfp`, so intake never sees it)."""
    paths.inbox.mkdir(parents=True, exist_ok=True)
    return paths.inbox / f".incoming-{os.getpid()}-{os.urandom(8).hex()}.tmp"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checked_header(paths: SitePaths, temp: Path, peer: str, settings: Carrier) -> dict[str, Any]:
    size = temp.stat().st_size
    if size > settings.max_package_bytes:
        raise Refused(413, f"package is {size} bytes, more than the {settings.max_package_bytes} "
                           f"{paths.site} accepts")
    try:
        header = packages.read_signed_header(paths, temp)
    except PackageRejected as error:
        raise Refused(422, error.reason) from None
    if header["sender"] != peer:
        raise Refused(403, f"package was sealed by {str(header['sender'])[:64]!r} but delivered by {peer}")
    try:
        package_id_of(header)
        package_kind(header)
    except UnsafeName as error:
        raise Refused(422, str(error)) from None
    return header


def _known(paths: SitePaths, package_id: str) -> dict[str, Any] | None:
    """A snapshot for skipping the full check of a package already here (re-checked under the lock)."""
    try:
        return read_json(receipts_file(paths)).get(package_id)
    except FileNotFoundError:
        return None


def receive(paths: SitePaths, temp: Path, *, peer: str, transport: str,
            settings: Carrier | None = None) -> Receipt:
    """Check and store the package in `temp` (a file in `paths.inbox`, consumed either way) that
    `transport` brought from the authenticated partner `peer`."""
    settings = settings or carrier_settings(paths.site)
    temp = Path(temp)
    header = None
    try:
        header = _checked_header(paths, temp, peer, settings)
        package_id, kind = package_id_of(header), package_kind(header)
        target = paths.inbox / file_name(kind, package_id)
        if _known(paths, package_id) is None:
            try:
                packages.verify_package(paths, temp, actor=f"carrier-{transport}:{peer}")
            except PackageRejected as error:
                raise Refused(422, error.reason) from None
        with update_json(receipts_file(paths), {}) as state:
            if package_id in state:
                temp.unlink(missing_ok=True)
                return Receipt(ALREADY, package_id, kind, peer, state[package_id]["file"], "not posted again")
            with temp.open("rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(temp, 0o600)
            os.rename(temp, target)
            _fsync_dir(paths.inbox)
            now = keys.now()
            # Receipts of expired packages are forgotten: such a package is refused as expired anyway.
            for stale in [pid for pid, entry in state.items() if keys.parse_time(entry["expires"]) <= now]:
                del state[stale]
            state[package_id] = {"file": target.name, "kind": kind, "sender": peer, "transport": transport,
                                 "received_at": keys.iso(now), "expires": header["expires"]}
    except Refused as refused:
        temp.unlink(missing_ok=True)
        details = {"reason": refused.reason, "status": refused.status, "peer": peer, "transport": transport}
        if header:
            details |= {k: header.get(k) for k in ("sender", "sequence", "content_type")}
        audit.append(paths, action="package.refused", actor=f"carrier-{transport}:{peer}",
                     object=str((header or {}).get("package_id", "unknown"))[:64], outcome="refused",
                     details=details)
        log.warning("%s refused a package from %s (%s): %s", paths.site, peer, transport, refused.reason)
        raise
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    audit.append(paths, action="package.received", actor=f"carrier-{transport}:{peer}", object=package_id,
                 outcome="success",
                 details={"sender": peer, "transport": transport, "kind": kind, "file": target.name,
                          "sequence": header["sequence"], "content_type": header["content_type"],
                          "content_digest": header["content_digest"], "content_size": header["content_size"]})
    extra = {"package_id": package_id, "sender": peer, "kind": kind, "file": target.name, "transport": transport}
    event = events.notify(paths, events.asset_uri(paths.site, kind), extra, settings)
    log.info("%s stored %s from %s (%s); asset event %s", paths.site, target.name, peer, transport, event)
    return Receipt(STORED, package_id, kind, peer, target.name, event)
