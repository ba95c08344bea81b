"""Aggregation rules, selectable by name: how the coordinator turns the round's updates into one.

- `fedavg`: the sample-weighted mean (McMahan et al. 2017, "Communication-Efficient Learning of
  Deep Networks from Decentralized Data").
- `fedprox`: the same server step (Li et al. 2020); FedProx differs in the participants' loss
  (the proximal term, `LocalConfig.mu`).
- `median`: the coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates").
- `trimmed_mean`: per coordinate, the mean after dropping the floor(beta n) largest and smallest
  values (Yin et al. 2018).
- `krum` / `multi_krum`: the update (or the mean of the m updates) with the smallest sum of squared
  distances to its n - f - 2 nearest others, tolerating f Byzantine participants when n >= 2f + 3
  (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent").

The robust rules weigh every participant alike (a sample count is the participant's own claim) and
need each update in the clear: they cannot run over secure aggregation, which reveals only the sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

RULES = ("fedavg", "fedprox", "median", "trimmed_mean", "krum", "multi_krum")
SUM_RULES = ("fedavg", "fedprox")  # rules that need only the (weighted) sum: secure aggregation fits


class AggregationError(ValueError):
    """The updates cannot be aggregated by the rule: too few participants for it, or bad updates."""


def _stack(updates: Sequence[np.ndarray]) -> np.ndarray:
    if not updates:
        raise AggregationError("no updates to aggregate")
    sizes = {np.asarray(u).shape for u in updates}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise AggregationError(f"updates must be vectors of one length; got shapes {sorted(sizes)}")
    stacked = np.stack([np.asarray(u, dtype=np.float64) for u in updates])
    bad = [i for i in range(len(stacked)) if not np.all(np.isfinite(stacked[i]))]
    if bad:
        raise AggregationError(f"updates {bad} hold values that are not finite")
    return stacked


def fedavg(updates: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """The weighted mean of the updates (weights: the participants' sample counts; None: equal)."""
    stacked = _stack(updates)
    w = np.ones(len(stacked)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(stacked),) or np.any(w < 0) or not w.sum() > 0:
        raise AggregationError(f"need one non-negative weight per update with a positive total; got {list(w)}")
    return (w @ stacked / w.sum()).astype(np.float32)


def median(updates: Sequence[np.ndarray], *, f: int = 0) -> np.ndarray:
    """The coordinate-wise median; with f given, refuses fewer than 2f + 1 updates."""
    stacked = _stack(updates)
    if f < 0 or len(stacked) < 2 * f + 1:
        raise AggregationError(f"median with f={f} Byzantine participants needs at least {2 * f + 1} "
                               f"participants; the round has {len(stacked)}")
    return np.median(stacked, axis=0).astype(np.float32)


def trimmed_mean(updates: Sequence[np.ndarray], *, beta: float = 0.1) -> np.ndarray:
    """The coordinate-wise beta-trimmed mean: floor(beta n) values cut from each side."""
    stacked = _stack(updates)
    n = len(stacked)
    if not 0 < beta < 0.5:
        raise AggregationError(f"trimmed_mean needs 0 < beta < 0.5, not {beta}")
    k = int(np.floor(beta * n))
    if k < 1:
        raise AggregationError(f"trimmed_mean with beta={beta} trims no participant of {n}: need at least "
                               f"{int(np.ceil(1 / beta))} participants, or beta >= {1 / n:.3f}")
    ordered = np.sort(stacked, axis=0)
    return ordered[k : n - k].mean(axis=0).astype(np.float32)


def krum_scores(updates: Sequence[np.ndarray], *, f: int) -> np.ndarray:
    """Each update's Krum score: the sum of squared distances to its n - f - 2 nearest others."""
    stacked = _stack(updates)
    n = len(stacked)
    if f < 0 or n < 2 * f + 3:
        raise AggregationError(f"krum with f={f} Byzantine participants needs at least {2 * f + 3} "
                               f"participants (n >= 2f + 3); the round has {n}")
    squares = (stacked**2).sum(axis=1)
    distances = np.maximum(squares[:, None] + squares[None, :] - 2 * stacked @ stacked.T, 0.0)
    nearest = n - f - 2
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(distances[i], i)
        scores[i] = np.sort(others)[:nearest].sum()
    return scores


def krum(updates: Sequence[np.ndarray], *, f: int = 1) -> np.ndarray:
    """The update with the lowest Krum score."""
    scores = krum_scores(updates, f=f)
    return np.asarray(updates[int(np.argmin(scores))], dtype=np.float32)


def multi_krum(updates: Sequence[np.ndarray], *, f: int = 1, m: int | None = None) -> np.ndarray:
    """The mean of the m updates with the lowest Krum scores (default m = n - f)."""
    scores = krum_scores(updates, f=f)
    n = len(scores)
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise AggregationError(f"multi_krum selects m of the n={n} updates; m={m} is not in 1..{n}")
    chosen = np.argsort(scores, kind="stable")[:m]
    return _stack([updates[i] for i in chosen]).mean(axis=0).astype(np.float32)


def selected_by_krum(updates: Sequence[np.ndarray], *, f: int, m: int = 1) -> list[int]:
    """Indices of the m updates Krum keeps (for the round's record)."""
    return [int(i) for i in np.argsort(krum_scores(updates, f=f), kind="stable")[:m]]


def aggregate(rule: str, updates: Sequence[np.ndarray], weights: Sequence[float] | None = None, *,
              f: int = 1, beta: float = 0.1, m: int | None = None) -> np.ndarray:
    """Aggregate `updates` by the rule named `rule` (one of RULES). `weights` (sample counts) count
    for fedavg/fedprox only; `f` is the Byzantine participants krum/multi_krum (and median) tolerate,
    `beta` the share trimmed_mean cuts from each side, `m` how many updates multi_krum averages."""
    rules: dict[str, Callable[[], np.ndarray]] = {
        "fedavg": lambda: fedavg(updates, weights),
        "fedprox": lambda: fedavg(updates, weights),
        "median": lambda: median(updates, f=0),
        "trimmed_mean": lambda: trimmed_mean(updates, beta=beta),
        "krum": lambda: krum(updates, f=f),
        "multi_krum": lambda: multi_krum(updates, f=f, m=m),
    }
    if rule not in rules:
        raise AggregationError(f"unknown aggregation rule {rule!r}; known: {', '.join(RULES)}")
    return rules[rule]()
