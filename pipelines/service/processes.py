"""The record of what `factory up` started (`FACTORY_HOME/service.json`) and whether it still runs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipelines.fileio import write_json
from pipelines.workspace import factory_home


def state_file(home: Path | None = None) -> Path:
    return (home or factory_home()) / "service.json"


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


def read_state(home: Path | None = None) -> dict[str, Any] | None:
    """The running service's record, or None when nothing it started is alive."""
    path = state_file(home)
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if any(ours(process) for process in state.get("processes", [])):
        return state
    return None


def write_state(home: Path, state: dict[str, Any]) -> None:
    write_json(state_file(home), state)
