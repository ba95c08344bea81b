"""`factory outbox`, `factory inbox` and `factory transfer`. Errors: exit 1 and one line on stderr."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from pipelines.config import SITES
from pipelines.workspace import SitePaths, WorkspaceError

SITE = click.Choice(SITES)


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipelines.carrier.settings import CarrierError
        from pipelines.trust.keys import TrustError

        try:
            return fn(*args, **kwargs)
        except (CarrierError, TrustError, WorkspaceError, OSError) as error:
            click.echo(f"error: {error}".replace("\n", " "), err=True)
            sys.exit(1)

    return wrapper


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)


def _stop_on_term(stop: Callable[[], None]) -> None:
    signal.signal(signal.SIGTERM, lambda *_: stop())


# ---------------------------------------------------------------- outbox


@click.group()
def outbox() -> None:
    """Packages this site sends: delivery state, pushing to partners' inboxes."""


_COLUMNS = ("package_id", "recipient", "kind", "state", "via", "attempts", "next_attempt_at", "last_error", "reason")


@outbox.command("list")
@click.option("--site", type=SITE, required=True)
@click.option("--json", "as_json", is_flag=True, help="print the delivery records as JSON")
@_guarded
def list_command(site: str, as_json: bool) -> None:
    """Show what is pending, delivered and refused."""
    from pipelines.carrier.outbox import list_packages

    records = list_packages(SitePaths.of(site))
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    if not records:
        click.echo(f"the {site} outbox is empty")
        return
    for record in records:
        line = f"{record['package_id'][:12]}  {record['kind']:<22} -> {record['recipient']:<12} {record['state']}"
        if record["state"] == "delivered":
            line += f" via {record['via']} at {record['delivered_at']}"
        elif record["state"] == "refused":
            line += f": {record['reason']}"
        elif record["attempts"]:
            line += (f" ({record['attempts']} attempts, next at {record['next_attempt_at']}; "
                     f"last error: {record['last_error']})")
        click.echo(line)


@outbox.command("push")
@click.option("--site", type=SITE, required=True)
@click.option("--once", is_flag=True,
              help="one pass over every pending package (backoff or not), then exit; exit 1 if any is left")
@click.option("--interval", type=click.FloatRange(min=0.5), default=10.0, show_default=True,
              help="seconds between passes when running continuously")
@_guarded
def push_command(site: str, once: bool, interval: float) -> None:
    """Send pending packages to their recipients' inbox services (mutual TLS)."""
    from pipelines.carrier.push import push_loop, push_pending

    paths = SitePaths.of(site)

    def report(records: list[dict]) -> None:
        for record in records:
            detail = record.get("last_error") if record["state"] == "pending" else record.get("reason") or record["via"]
            click.echo(f"{record['package_id'][:12]} -> {record['recipient']}: {record['state']}"
                       + (f" ({detail})" if detail else ""))

    if once:
        records = push_pending(paths, due_only=False)
        report(records)
        if not records:
            click.echo(f"nothing pending in the {site} outbox")
        sys.exit(1 if any(r["state"] != "delivered" for r in records) else 0)
    _logging()
    stop = threading.Event()
    _stop_on_term(stop.set)
    click.echo(f"pushing the {site} outbox every {interval:g} s (Ctrl-C stops)", err=True)
    try:
        push_loop(paths, interval, stop, report)
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------- inbox


@click.group()
def inbox() -> None:
    """This site's inbox service: partners push sealed packages to it over mutual TLS."""


@inbox.command("serve")
@click.option("--site", type=SITE, required=True)
@click.option("--host", default=None, help="listen address (default: conf carrier.listen_host)")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="default: conf carrier.listen_port")
@_guarded
def serve_command(site: str, host: str | None, port: int | None) -> None:
    """Run the inbox service until interrupted."""
    from pipelines.carrier.inbox_service import serve

    _logging()
    paths = SitePaths.of(site)

    def ready(server: Any) -> None:
        _stop_on_term(lambda: threading.Thread(target=server.shutdown, daemon=True).start())
        click.echo(f"{site} inbox listening on {server.url} (mutual TLS; inbox {paths.inbox})", err=True)

    try:
        serve(paths, host, port, ready=ready)
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------- transfer (media)


@click.group()
def transfer() -> None:
    """Packages on removable media, for air-gapped partners."""


@transfer.command("export")
@click.option("--site", type=SITE, required=True, help="the sending site")
@click.option("--to", "folder", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--recipient", type=SITE, default=None, help="only the packages for this site")
@_guarded
def export_command(site: str, folder: Path, recipient: str | None) -> None:
    """Write the pending outbox packages and a signed manifest to FOLDER."""
    from pipelines.carrier.media import export_media

    payload = export_media(SitePaths.of(site), folder, recipient=recipient)
    for entry in payload["files"]:
        click.echo(f"{entry['name']} -> {entry['recipient']} ({entry['size']} bytes)")
    click.echo(f"{len(payload['files'])} package(s) and the signed manifest written to {folder}")


@transfer.command("import")
@click.option("--site", type=SITE, required=True, help="the receiving site")
@click.option("--from", "folder", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True)
@_guarded
def import_command(site: str, folder: Path) -> None:
    """Check a transfer medium whole, then take in its packages for SITE."""
    from pipelines.carrier.media import MediaRefused, import_media

    try:
        result = import_media(SitePaths.of(site), folder)
    except MediaRefused as refused:
        click.echo(f"refused: {refused}", err=True)
        sys.exit(1)
    for row in result["files"]:
        click.echo(f"{row['file']}: {row['status']}" + (f" ({row['reason']})" if row.get("reason") else ""))
    sys.exit(1 if any(row["status"] == "refused" for row in result["files"]) else 0)
