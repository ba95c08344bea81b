"""File helpers for every layer: atomic writes, JSON state, inter-process locks and file digests.

One way to do each: a file is written whole or not at all (temp file in the same folder,
fsync, `os.replace`), and state that several processes update (`state/*.json`) is changed
only under its lock with `update_json`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path`, on error it is removed.

    For writers that want a file name (pandas, torch, tar): `with atomic_path(p) as tmp: df.to_parquet(tmp)`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, mode)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` whole or not at all."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path, data: Any, mode: int = 0o644) -> Path:
    """Write `data` as indented, key-sorted JSON, atomically; return `path`."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode(), mode)
    return Path(path)


def read_json(path: Path) -> Any:
    with Path(path).open("rb") as handle:
        return json.load(handle)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (flock) on `path`, shared by every process on this host."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def update_json(path: Path, default: Any = None, mode: int = 0o644) -> Iterator[Any]:
    """Read-modify-write a JSON state file under its lock (`.<name>.lock` beside it).

    `with update_json(p, {}) as state: state[k] = v` — the change is written atomically when
    the block ends without error; on error the file is left as it was.
    """
    path = Path(path)
    with file_lock(path.with_name(f".{path.name}.lock")):
        state = read_json(path) if path.exists() else ({} if default is None else default)
        yield state
        write_json(path, state, mode)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in blocks (bounded memory)."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def sha256_bytes(data: bytes) -> str:
    """`sha256:<hex>` of in-memory bytes (the form dataset and report digests take)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digests(directory: Path, exclude: set[str]) -> dict[str, str]:
    """sha256 of every file below `directory` (relative path -> hex), leaving out the names in `exclude`."""
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name not in exclude}
