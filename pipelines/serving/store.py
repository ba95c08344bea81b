"""A bounded, rotating store of recent inference inputs, kept at the site for drift detection.

Rows are float32 feature vectors (as wide as the served model's spec) appended to numbered raw
segment files (`segment-00000001.f32` under `state_dir/inference-inputs/<n>-features/`: models of
different input widths never share segments). A segment holds at most
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

from pipelines.data.spec import DIGITS
from pipelines.workspace import SitePaths

_SEGMENT = re.compile(r"^segment-(\d{8})\.f32$")


def store_dir(paths: SitePaths, n_features: int = DIGITS.n_features) -> Path:
    return paths.state_dir / "inference-inputs" / f"{int(n_features)}-features"


class InputStore:
    """Append-only, size-bounded store of inference inputs; safe across threads of one writer process."""

    def __init__(self, root: Path, *, n_features: int = DIGITS.n_features, max_samples: int = 20000,
                 segment_samples: int = 2000) -> None:
        if segment_samples <= 0 or max_samples < segment_samples:
            raise ValueError(
                f"store needs 0 < segment_samples <= max_samples, got {segment_samples} and {max_samples}"
            )
        if n_features < 1:
            raise ValueError(f"store rows need at least one feature, got {n_features}")
        self.root = Path(root)
        self.n_features = int(n_features)
        self._row_bytes = self.n_features * 4
        self.max_samples = max_samples
        self.segment_samples = segment_samples
        self._lock = threading.Lock()
        self._index: list[list] | None = None  # [number, path, rows] per segment, oldest first

    @classmethod
    def for_site(cls, paths: SitePaths, conf: dict | None = None, *, n_features: int = DIGITS.n_features) -> InputStore:
        """The site's store of rows of `n_features` (the served model's width; default: the digits demo)."""
        conf = conf or {}
        return cls(store_dir(paths, n_features), n_features=n_features,
                   **{k: int(v) for k, v in conf.items() if k in ("max_samples", "segment_samples")})

    def _segments(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in os.scandir(self.root):
            match = _SEGMENT.match(entry.name)
            if match:
                found.append((int(match.group(1)), Path(entry.path)))
        return sorted(found)

    def _rows(self, path: Path) -> int:
        try:
            return path.stat().st_size // self._row_bytes
        except FileNotFoundError:
            return 0

    def append(self, x: np.ndarray) -> None:
        """Store a validated batch (n, n_features); rotates segments and drops the oldest beyond the bound."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"store expects rows of {self.n_features} features, got shape {x.shape}")
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
            width = self.n_features
            rows = raw[: (raw.size // width) * width].reshape(-1, width)
            parts.append(rows)
            have += len(rows)
            if have >= window:
                break
        if not parts:
            return np.empty((0, self.n_features), dtype=np.float32)
        return np.vstack(parts[::-1])[-window:]

    def clear(self) -> None:
        with self._lock:
            for _, path in self._segments():
                path.unlink(missing_ok=True)
            self._index = None
