"""A bounded, rotating store of recent inference inputs, kept at the site for drift detection.

Rows are float32 feature vectors (schema.N_FEATURES wide) appended to numbered raw segment files
(`segment-00000001.f32` under `state_dir/inference-inputs/`). A segment holds at most
`segment_samples` rows; whenever the total exceeds `max_samples` the oldest segments are deleted,
so the store never holds more than `max_samples` rows. Appends are one O_APPEND write each, so a reader in another
process (the drift check) sees whole rows and ignores a torn last row. Nothing here leaves the site.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import numpy as np

from pipelines.data.schema import N_FEATURES
from pipelines.workspace import SitePaths

_SEGMENT = re.compile(r"^segment-(\d{8})\.f32$")
_ROW_BYTES = N_FEATURES * 4


def store_dir(paths: SitePaths) -> Path:
    return paths.state_dir / "inference-inputs"


class InputStore:
    """Append-only, size-bounded store of inference inputs; safe across threads of one writer process."""

    def __init__(self, root: Path, *, max_samples: int = 20000, segment_samples: int = 2000) -> None:
        if segment_samples <= 0 or max_samples < segment_samples:
            raise ValueError(
                f"store needs 0 < segment_samples <= max_samples, got {segment_samples} and {max_samples}"
            )
        self.root = Path(root)
        self.max_samples = max_samples
        self.segment_samples = segment_samples
        self._lock = threading.Lock()
        self._index: list[list] | None = None  # [number, path, rows] per segment, oldest first

    @classmethod
    def for_site(cls, paths: SitePaths, conf: dict | None = None) -> InputStore:
        conf = conf or {}
        return cls(store_dir(paths), **{k: int(v) for k, v in conf.items() if k in ("max_samples", "segment_samples")})

    def _segments(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in os.scandir(self.root):
            match = _SEGMENT.match(entry.name)
            if match:
                found.append((int(match.group(1)), Path(entry.path)))
        return sorted(found)

    @staticmethod
    def _rows(path: Path) -> int:
        try:
            return path.stat().st_size // _ROW_BYTES
        except FileNotFoundError:
            return 0

    def append(self, x: np.ndarray) -> None:
        """Store a validated batch (n, N_FEATURES); rotates segments and drops the oldest beyond the bound."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != N_FEATURES:
            raise ValueError(f"store expects rows of {N_FEATURES} features, got shape {x.shape}")
        with self._lock:
            if self._index is None or (self._index and not self._index[-1][1].exists()):
                # scanned once (this process is the store's only writer), again if cleared meanwhile
                self.root.mkdir(parents=True, exist_ok=True)
                self._index = [[n, p, self._rows(p)] for n, p in self._segments()]
            index = self._index
            offset = 0
            while offset < len(x):
                if not index or index[-1][2] >= self.segment_samples:
                    number = index[-1][0] + 1 if index else 1
                    index.append([number, self.root / f"segment-{number:08d}.f32", 0])
                _, path, rows = index[-1]
                chunk = x[offset : offset + self.segment_samples - rows]
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, chunk.tobytes())
                finally:
                    os.close(fd)
                index[-1][2] += len(chunk)
                offset += len(chunk)
            total = sum(entry[2] for entry in index)
            while len(index) > 1 and total > self.max_samples:
                _, oldest, rows = index.pop(0)
                total -= rows
                oldest.unlink(missing_ok=True)

    def count(self) -> int:
        return sum(self._rows(p) for _, p in self._segments())

    def recent(self, window: int) -> np.ndarray:
        """The newest `window` rows (fewer when the store holds fewer), oldest first."""
        parts: list[np.ndarray] = []
        have = 0
        for _, path in reversed(self._segments()):
            try:
                raw = np.fromfile(path, dtype=np.float32)
            except FileNotFoundError:  # rotated away by the writer meanwhile
                continue
            rows = raw[: (raw.size // N_FEATURES) * N_FEATURES].reshape(-1, N_FEATURES)
            parts.append(rows)
            have += len(rows)
            if have >= window:
                break
        if not parts:
            return np.empty((0, N_FEATURES), dtype=np.float32)
        return np.vstack(parts[::-1])[-window:]

    def clear(self) -> None:
        with self._lock:
            for _, path in self._segments():
                path.unlink(missing_ok=True)
            self._index = None
