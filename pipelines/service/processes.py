"""The record of what `factory up` started for one site (`<site home>/service/service.json`) and
whether it still runs. Each site's deployment has a record of its own; `factory down --site S`
reads only S's."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipelines.config import SITES
from pipelines.fileio import write_json
from pipelines.workspace import SitePaths


def state_file(home: Path | None, site: str) -> Path:
    return SitePaths.of(site, home).service_dir / "service.json"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of ours is not running
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks since boot): tells a live process from a reused pid."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def ours(process: dict[str, Any]) -> bool:
    """Is this recorded process still the one we started, and running?"""
    return alive(process["pid"]) and start_ticks(process["pid"]) == process.get("started")


def marked(pid: int, marker: str) -> bool:
    # Processes that set their title (setproctitle) may overwrite their environment; this finds the rest.
    try:
        return f"FACTORY_SERVICE_ID={marker}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def recorded_state(home: Path | None, site: str) -> dict[str, Any] | None:
    """The site's service record as written, running or not (None when there is none or it is unreadable)."""
    try:
        state = json.loads(state_file(home, site).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def read_state(home: Path | None, site: str) -> dict[str, Any] | None:
    """The running deployment's record of `site`, or None when nothing it started is alive."""
    state = recorded_state(home, site)
    if state and any(ours(process) for process in state.get("processes", [])):
        return state
    return None


def running_sites(home: Path | None) -> dict[str, dict[str, Any]]:
    """The sites whose deployment runs on this machine, with their records."""
    return {site: state for site in SITES if (state := read_state(home, site))}


def write_state(home: Path | None, site: str, state: dict[str, Any]) -> None:
    write_json(state_file(home, site), state)
