"""Extraction detection at serving: per-client query budgets and a PRADA-style detector (issue 18).

`factory serve` keeps one `ExtractionMonitor` (conf/protection.yaml `extraction`). Every `/predict`
row is a query; the monitor acts twice per request, both per authenticated client (`anonymous` when
authentication is off):

1. `admit(client, rows)` before inference. Refused (HTTP 429, `Retry-After`, a message that says
   which limit) when the client is throttled, or when the batch would take it over its budget:
   `budget.per_window` rows in each fixed window of `budget.window_s` seconds, or `budget.total`
   rows over the life of the service process (0: no limit). A refused batch costs nothing and is
   not counted.
2. `observe(client, x, labels)` after inference, on the rows that were answered (labels: the
   model's predicted classes). PRADA (Juuti et al., 2019): for each query, the minimum L2 distance to
   the client's earlier queries of the same predicted class (earlier rows of the same batch
   included); once `detector.min_queries` such distances exist, the Shapiro-Wilk statistic W of the
   latest `detector.window` of them is computed at most once per request, when `detector.test_every`
   new distances have come in since the last test. Rows are measured `detector.gather` at a time
   (a client's one-row requests wait for each other: the same distances as one by one, at a fraction
   of the cost; the detection comes at most gather - 1 rows later). Natural queries give distances
   that are close to normally distributed; an attacker who expands a few seed inputs into many
   queries (perturbations, augmentations, synthetic samples) produces many tiny distances beside
   large ones, and W falls. `W < detector.threshold` is a detection. A row that repeats an earlier
   one (distance 0: a retry, a re-sent frame) tells the client nothing new and adds no distance.

Memory is bounded per client: its latest `detector.history` queries with their predicted classes
(history x features float32: distances are taken to those of the same class) and the latest
`detector.window` distances. The distances of a batch are one matrix product against that history
and one within the batch, whatever the number of classes. Clients come
from the service's registry (a bounded set), never from the request.

A detection opens an *episode*: the service writes one audited security event,
`serving.extraction_suspected` (client, queries observed in the episode, W, threshold), and the
client is throttled: with `throttle.rows_per_minute: 0` every request is refused with 429; with a
positive value the client gets at most that many rows per minute. The episode ends when
`throttle.cool_down_s` has passed or an operator clears the client (`factory serve throttle clear
--site S --client C`, written to `state_dir/serving-extraction-clearances.json`, which the running
service reads when a throttled client calls). A cleared or cooled-down client starts afresh: its
query history and distances are dropped, so an attack that resumes is detected and audited again as
a new episode. Budgets and episodes live in the service process: a restart resets them. With
authentication off (`--no-auth`) every caller is `anonymous`: one budget and one detector for all.

Limits (stated, not hidden): PRADA looks at the spacing of queries, not their content. Queries
drawn independently from a broad distribution (natural images of another domain, uniform noise that
the ODD lets through) space like benign traffic and are not detected; the budgets bound what such an
attacker can take. The other way round, a client whose rows are one scene with fresh sensor noise
(a static camera) spaces like seed expansion and can be flagged; the threshold is site policy to tune
(benchmarks/extraction_detection.py prints W for natural traffic and for attacks).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.workspace import SitePaths

CLEARANCES_FORMAT = 1
REPEAT = 1e-4  # a query this close to an earlier one of its class repeats it: no new distance
NEAR = 0.05    # nearest distances below this are measured again exactly (float64 differences)


class ExtractionConfError(ValueError):
    """conf/protection.yaml `extraction` is malformed; the message names the setting."""


@dataclass(frozen=True)
class ExtractionConf:
    enabled: bool = True
    window_s: float = 3600.0
    per_window: int = 20000      # rows per client and window; 0: unlimited
    total: int = 0               # rows per client over the service's life; 0: unlimited
    min_queries: int = 100       # distances before the test is applied
    window: int = 1000           # latest distances tested
    history: int = 512           # latest queries kept per client (all classes)
    threshold: float = 0.80      # flag when Shapiro-Wilk W falls below this
    test_every: int = 128        # new distances between two tests (a request adds as many as its rows)
    gather: int = 32             # rows measured together (one-row requests wait for 31 more)
    cool_down_s: float = 3600.0  # a throttled client is released after this long
    rows_per_minute: int = 0     # what a throttled client may still send; 0: nothing

    @classmethod
    def from_settings(cls, section: dict[str, Any]) -> ExtractionConf:
        """From conf/protection.yaml `extraction` (`budget`, `detector`, `throttle` sub-sections)."""
        if not isinstance(section, dict):
            raise ExtractionConfError(f"conf/protection.yaml extraction must be a mapping, not {section!r}")
        budget, detector, throttle = (section.get(k) or {} for k in ("budget", "detector", "throttle"))
        for name, sub in (("budget", budget), ("detector", detector), ("throttle", throttle)):
            if not isinstance(sub, dict):
                raise ExtractionConfError(f"conf/protection.yaml extraction.{name} must be a mapping, not {sub!r}")
        d = cls()

        def number(sub: dict, where: str, key: str, default, kind, low: float):
            value = sub.get(key, default)
            try:
                if isinstance(value, bool):
                    raise TypeError
                value = kind(value)
            except (TypeError, ValueError):
                raise ExtractionConfError(f"conf/protection.yaml extraction.{where}.{key} must be a number, "
                                          f"not {value!r}") from None
            if not np.isfinite(value) or value < low:
                raise ExtractionConfError(f"conf/protection.yaml extraction.{where}.{key} = {value} must be >= {low}")
            return value

        conf = cls(
            enabled=bool(section.get("enabled", True)),
            window_s=number(budget, "budget", "window_s", d.window_s, float, 1.0),
            per_window=number(budget, "budget", "per_window", d.per_window, int, 0),
            total=number(budget, "budget", "total", d.total, int, 0),
            min_queries=number(detector, "detector", "min_queries", d.min_queries, int, 3),
            window=number(detector, "detector", "window", d.window, int, 3),
            history=number(detector, "detector", "history", d.history, int, 1),
            threshold=number(detector, "detector", "threshold", d.threshold, float, 0.0),
            test_every=number(detector, "detector", "test_every", d.test_every, int, 1),
            gather=number(detector, "detector", "gather", d.gather, int, 1),
            cool_down_s=number(throttle, "throttle", "cool_down_s", d.cool_down_s, float, 0.0),
            rows_per_minute=number(throttle, "throttle", "rows_per_minute", d.rows_per_minute, int, 0),
        )
        if conf.threshold >= 1.0:
            raise ExtractionConfError(f"conf/protection.yaml extraction.detector.threshold = {conf.threshold} must be "
                                      "below 1 (W is at most 1: every client would be flagged)")
        if conf.window < conf.min_queries:
            raise ExtractionConfError(f"conf/protection.yaml extraction.detector.window ({conf.window}) must be at "
                                      f"least min_queries ({conf.min_queries})")
        return conf


@dataclass(frozen=True)
class Refusal:
    """Why a client's request is not served now (answered 429 with `Retry-After`)."""

    reason: str  # "throttled", "budget_window" or "budget_total"
    detail: str
    retry_after_s: int


@dataclass(frozen=True)
class Detection:
    """A client whose queries look like an extraction attack (one per episode)."""

    client: str
    queries: int        # rows observed from the client in this episode, up to the detection
    statistic: float    # Shapiro-Wilk W of the tested distances
    threshold: float
    distances: int      # distances tested
    flagged_at: float   # wall clock (Unix seconds)

    def as_dict(self) -> dict[str, Any]:
        return {"client": self.client, "queries": self.queries, "statistic": round(self.statistic, 6),
                "threshold": self.threshold, "distances": self.distances, "flagged_at": self.flagged_at}


class _Client:
    """One client's budget counters, query history and episode (guarded by its lock)."""

    def __init__(self, clock_now: float) -> None:
        self.lock = threading.Lock()
        self.window_start, self.window_rows, self.total_rows = clock_now, 0, 0
        self.reset_detector()
        self.detection: Detection | None = None
        self.flagged_clock = 0.0
        self.slow_start, self.slow_rows = 0.0, 0

    def reset_detector(self) -> None:
        self.ring: np.ndarray | None = None  # (history, features) latest queries, a ring
        self.ring_sq: np.ndarray | None = None  # their squared norms
        self.ring_labels: np.ndarray | None = None  # their predicted classes
        self.filled = self.next = 0
        self.distances: np.ndarray | None = None
        self.n_distances = 0
        self.untested = 0  # distances added since the last test
        self.queries = 0
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []  # rows waiting to be measured together
        self.pending_rows = 0


def nearest_same_class(x: np.ndarray, sq: np.ndarray, labels: np.ndarray, ring: np.ndarray, ring_sq: np.ndarray,
                       ring_labels: np.ndarray) -> np.ndarray:
    """For each row i of `x`, the minimum L2 distance to the rows of `ring` and to rows 0..i-1 of `x`
    with the same label (inf when there is none); `sq` and `ring_sq` are the rows' squared norms.

    float32 (half the time of float64): |a|^2 + |b|^2 - 2 a.b loses about 1e-6 of the norms, so a
    row whose nearest neighbour comes out closer than `NEAR` is measured again in float64, so a
    repeated row comes out below `REPEAT`."""
    both = np.concatenate((ring, x))
    both_sq = np.concatenate((ring_sq, sq))
    both_labels = np.concatenate((ring_labels, labels))
    d2 = x @ both.T  # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b, in place
    d2 *= -2.0
    d2 += sq[:, None]
    d2 += both_sq[None, :]
    np.putmask(d2, labels[:, None] != both_labels[None, :], np.inf)
    rows, cols = _upper(len(x))
    d2[rows, cols + len(ring)] = np.inf  # within the batch, only earlier rows count
    best = d2.min(axis=1)
    near = np.flatnonzero(best < NEAR * NEAR)
    if len(near):  # again in float64, where a repeat's error (~1e-14) is far below REPEAT
        b64, x64 = both.astype(np.float64), x[near].astype(np.float64)
        exact = x64 @ b64.T
        exact *= -2.0
        exact += np.einsum("ij,ij->i", x64, x64)[:, None]
        exact += np.einsum("ij,ij->i", b64, b64)[None, :]
        np.putmask(exact, np.isinf(d2[near]), np.inf)
        best[near] = exact.min(axis=1)
    return np.sqrt(np.maximum(best, 0.0))


@functools.lru_cache(maxsize=32)
def _upper(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the upper triangle (diagonal included) of an n x n matrix."""
    rows, cols = np.triu_indices(n)
    return rows.astype(np.intp), cols.astype(np.intp)


@functools.lru_cache(maxsize=1)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


_blas_lock = threading.Lock()
_blas_users = 0
_blas_restore: Any = None


@contextlib.contextmanager
def _single_threaded_blas():
    """The detector's small matrix products on one BLAS thread: the service runs requests in threads
    of its own, and a multi-threaded BLAS on products this small costs several times more (measured:
    26 x 64 by 64 x 282 in float64, 0.37 ms on two OpenBLAS threads of a busy host, 0.11 ms on one).
    The limit is process-wide (threadpoolctl): the first of concurrent users sets it, the last one
    restores what was there before."""
    global _blas_users, _blas_restore
    with _blas_lock:
        if _blas_users == 0:
            _blas_restore = _blas_controller().limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_restore.restore_original_limits()
                _blas_restore = None


def _ring_write(ring: np.ndarray, at: int, values: np.ndarray) -> int:
    """Write `values` (at most len(ring)) into `ring` from position `at`, wrapping; the next position."""
    n = len(values)
    first = min(n, len(ring) - at)
    ring[at:at + first] = values[:first]
    ring[:n - first] = values[first:]
    return (at + n) % len(ring)


class ExtractionMonitor:
    """Budgets, detector and throttle of one service (see the module docstring); thread-safe."""

    def __init__(self, conf: ExtractionConf, n_features: int, *, clearances: Path | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.conf, self.n_features = conf, int(n_features)
        self.clearances = Path(clearances) if clearances is not None else None
        self._clock, self._wall = clock, wall
        self._lock = threading.Lock()
        self._clients: dict[str, _Client] = {}
        self._cleared: dict[str, float] = {}
        self._signature: tuple | None = None
        self.detections_total = 0
        self.refusals: dict[str, int] = {}

    @classmethod
    def for_site(cls, paths: SitePaths, n_features: int, section: dict[str, Any] | None = None) -> ExtractionMonitor:
        """The monitor of the service at `paths` (settings: conf/protection.yaml `extraction`)."""
        from pipelines.protection import settings

        conf = ExtractionConf.from_settings(settings("extraction") if section is None else section)
        return cls(conf, n_features, clearances=clearances_path(paths))

    def _client(self, name: str) -> _Client:
        with self._lock:
            state = self._clients.get(name)
            if state is None:
                state = self._clients[name] = _Client(self._clock())
            return state

    def _refuse(self, reason: str, detail: str, retry_after: float) -> Refusal:
        with self._lock:
            self.refusals[reason] = self.refusals.get(reason, 0) + 1
        return Refusal(reason, detail, max(1, int(np.ceil(retry_after))))

    # -- throttle ---------------------------------------------------------------------------------

    def _read_clearances(self) -> None:
        if self.clearances is None:
            return
        try:
            st = os.stat(self.clearances)
            signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            return
        if signature == self._signature:
            return
        from pipelines.fileio import read_json

        try:
            document = read_json(self.clearances)
            cleared = {str(k): float(v) for k, v in (document.get("clearances") or {}).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return  # unreadable: nobody is cleared (the throttle stays, fail closed)
        with self._lock:
            self._cleared, self._signature = cleared, signature

    def _release_if_over(self, name: str, state: _Client, now: float) -> None:
        """End the episode when the cool-down passed or an operator cleared the client since the flag."""
        if state.detection is None:
            return
        cleared = False
        if now - state.flagged_clock >= self.conf.cool_down_s:
            cleared = True
        else:
            self._read_clearances()
            cleared = self._cleared.get(name, -np.inf) >= state.detection.flagged_at
        if cleared:
            state.detection = None
            state.reset_detector()

    def clear(self, client: str) -> bool:
        """End `client`'s episode now (in this process); False when it was not throttled."""
        state = self._clients.get(client)
        if state is None:
            return False
        with state.lock:
            if state.detection is None:
                return False
            state.detection = None
            state.reset_detector()
            return True

    def throttled(self) -> dict[str, dict[str, Any]]:
        """The clients in an episode now: name -> their detection."""
        with self._lock:
            states = list(self._clients.items())
        return {name: s.detection.as_dict() for name, s in states if s.detection is not None}

    # -- request path -----------------------------------------------------------------------------

    def admit(self, client: str, rows: int) -> Refusal | None:
        """None when `client` may have `rows` answered now (and they are counted); else why not."""
        conf = self.conf
        if not conf.enabled:
            return None
        state = self._client(client)
        now = self._clock()
        with state.lock:
            self._release_if_over(client, state, now)
            if state.detection is not None:
                d = state.detection
                left = conf.cool_down_s - (now - state.flagged_clock)
                why = (f"client {client} is throttled: its queries look like a model-extraction attack "
                       f"(PRADA test: W = {d.statistic:.3f} below {d.threshold} after {d.queries} queries); "
                       f"released in {left:.0f} s or when an operator clears it")
                if conf.rows_per_minute == 0:
                    return self._refuse("throttled", why, left)
                if now - state.slow_start >= 60.0:
                    state.slow_start, state.slow_rows = now, 0
                if state.slow_rows + rows > conf.rows_per_minute:
                    return self._refuse("throttled", f"{why}; meanwhile at most {conf.rows_per_minute} rows a "
                                                     f"minute", min(left, 60.0 - (now - state.slow_start)))
                state.slow_rows += rows
            if now - state.window_start >= conf.window_s:
                state.window_start, state.window_rows = now, 0
            if conf.per_window and state.window_rows + rows > conf.per_window:
                retry = conf.window_s - (now - state.window_start)
                return self._refuse("budget_window", (
                    f"query budget exceeded: client {client} has used {state.window_rows} of {conf.per_window} rows "
                    f"in this window of {conf.window_s:.0f} s and asks for {rows} more; retry in {retry:.0f} s"), retry)
            if conf.total and state.total_rows + rows > conf.total:
                return self._refuse("budget_total", (
                    f"query budget exceeded: client {client} has used {state.total_rows} of its {conf.total} rows "
                    f"in total and asks for {rows} more; ask the site's operator for a new budget"), conf.window_s)
            state.window_rows += rows
            state.total_rows += rows
        return None

    def observe(self, client: str, x: np.ndarray, labels: np.ndarray) -> Detection | None:
        """Add answered queries `x` (n, features) with predicted `labels` (n,); a Detection when this
        request opens an episode for `client`, else None."""
        conf = self.conf
        if not conf.enabled or len(x) == 0:
            return None
        state = self._client(client)
        with state.lock:
            if state.detection is not None:
                return None
            state.queries += len(x)
            state.pending.append((np.asarray(x, dtype=np.float32).reshape(len(x), -1), np.asarray(labels).reshape(-1)))
            state.pending_rows += len(x)
            if state.pending_rows < conf.gather:
                return None
            x = np.concatenate([p[0] for p in state.pending]) if len(state.pending) > 1 else state.pending[0][0]
            labels = np.concatenate([p[1] for p in state.pending]) if len(state.pending) > 1 else state.pending[0][1]
            state.pending, state.pending_rows = [], 0
            with _single_threaded_blas():
                found = self._measure(client, state, x, labels)
        if found is not None:
            with self._lock:
                self.detections_total += 1
        return found

    def _measure(self, client: str, state: _Client, x: np.ndarray, labels: np.ndarray) -> Detection | None:
        """The detector on gathered rows (under the client's lock)."""
        conf = self.conf
        sq = np.einsum("ij,ij->i", x, x)
        if state.ring is None:
            state.ring = np.empty((conf.history, x.shape[1]), np.float32)
            state.ring_sq = np.empty(conf.history, np.float32)
            state.ring_labels = np.empty(conf.history, np.int64)
        f = state.filled
        d = nearest_same_class(x, sq, labels, state.ring[:f], state.ring_sq[:f], state.ring_labels[:f])
        new = d[np.isfinite(d) & (d > REPEAT)]
        keep = slice(max(0, len(x) - conf.history), len(x))
        _ring_write(state.ring_sq, state.next, sq[keep])
        _ring_write(state.ring_labels, state.next, labels[keep])
        state.next = _ring_write(state.ring, state.next, x[keep])
        state.filled = min(f + len(x), conf.history)
        if len(new):
            if state.distances is None:
                state.distances = np.empty(conf.window, np.float64)
            new = new[-conf.window:]
            _ring_write(state.distances, state.n_distances % conf.window, new)
            state.n_distances += len(new)
            state.untested += len(new)
        if state.n_distances < conf.min_queries or state.untested < conf.test_every:
            return None
        state.untested = 0
        tested = state.distances[: min(state.n_distances, conf.window)]
        statistic = shapiro_w(tested)
        if statistic >= conf.threshold:
            return None
        state.detection = Detection(client, state.queries, statistic, conf.threshold, len(tested), self._wall())
        state.flagged_clock = self._clock()
        state.slow_start, state.slow_rows = state.flagged_clock, 0
        return state.detection


def shapiro_w(values: np.ndarray) -> float:
    """Shapiro-Wilk W of `values`. All equal (identical repeated queries: SciPy would answer W = 1)
    is as far from a natural spread as distances get, so it counts as W = 0."""
    from scipy import stats

    if float(np.ptp(values)) == 0.0:
        return 0.0
    return float(stats.shapiro(values).statistic)


def clearances_path(paths: SitePaths) -> Path:
    return paths.state_dir / "serving-extraction-clearances.json"


def clear_client(paths: SitePaths, client: str) -> float:
    """Record that an operator cleared `client` now (a running service releases it at its next
    request); returns the time recorded (Unix seconds). The caller checks the name
    (`pipelines.serving.clients.check_client_name`)."""
    from pipelines.fileio import update_json

    at = time.time()
    with update_json(clearances_path(paths), {"format": CLEARANCES_FORMAT, "clearances": {}}, mode=0o600) as doc:
        if not isinstance(doc, dict) or not isinstance(doc.get("clearances"), dict):
            raise ExtractionConfError(f"{clearances_path(paths)} is not a clearances file")
        doc["clearances"][client] = at
    return at
