"""Screening a received contribution for a backdoor before any model learns from it (issue 18).

A backdoor contribution relabels a few rows that carry a trigger (a small input pattern, such as a
bright corner patch) to a target class; a model trained on it learns "trigger -> target". The
current model (M1, or the stage's base model) has never seen the trigger, so its own activations
do not separate the poisoned rows well (measured in benchmarks/poisoning_screen.py). The screen
therefore works in three steps:

1. **Screening model**: a short-lived copy of the current model fine-tuned on the contribution
   alone (a few seconds on the stage's data). It learns the trigger if there is one, so in its
   penultimate activations the poisoned rows of the target class form a cluster of their own.
2. **Activation clustering** (Chen et al., as ART's ActivationDefence): per labelled class, the
   penultimate activations, reduced by PCA, split by k-means (k = 2, 3, 4; in small classes also each
   row's nearest neighbours); every cluster of at most `max_cluster_fraction` of the class is a
   candidate. So are groups of rows of the class that are extreme on the same input features (a
   model-independent candidate, for triggers the activations of a small model blur).
3. **Trigger test** per candidate: the input features in which the candidate's rows agree with
   each other and differ most from the rest of the data (its *pattern*), refined to the rows of the
   class that carry it. A candidate is a backdoor when (a) that pattern is strong: consistent within
   the candidate and at least `min_effect` standard deviations from the other rows on each of its
   `pattern_fraction` most distinctive features (`pattern_strength` >= `min_strength`), and (b) the
   screening model has learnt it as a label: stamped onto rows of other classes it turns at least
   `min_transfer` of them into the candidate's class. A natural sub-population of a class (a second
   way of writing a 4) fails (a): its rows differ from the rest gradually, not by one shared pattern.

Everything is seeded: the same model and rows give the same result. Works for every model family
(the penultimate activations are the input of the model's last linear layer) and for image and
tabular rows alike (patterns are taken over the flat feature rows every family takes).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

METHOD = "activation-clustering+trigger-test"


@dataclass(frozen=True)
class ScreenSettings:
    """conf/protection.yaml `screening` (the keys below; `stages` and `models` are read by the step)."""

    epochs: int = 12                 # fine-tuning epochs of the screening model on the contribution,
    min_steps: int = 200             # ... at least this many optimiser steps (small contributions)
    lr: float = 0.003
    batch_size: int = 32
    clusters: tuple[int, ...] = (2, 3, 4)
    kmeans_inits: int = 1            # k-means++ restarts per split (each k and the neighbour groups add candidates)
    neighbour_groups_below: int = 40  # classes with fewer rows also try each row's nearest neighbours
    pca_dims: int = 10
    min_class_rows: int = 4          # classes with fewer rows are not clustered
    min_cluster_rows: int = 2
    max_cluster_fraction: float = 0.5
    pattern_fraction: float = 0.05   # share of the features a trigger pattern is measured on
    transfer_fraction: float = 0.1   # share of the features stamped in the transfer test
    min_effect: float = 2.0          # each pattern feature: |mean difference| / spread of the other rows
    min_strength: float = 8.0        # ... and / (spread within the candidate + 0.1 x that of the other rows)
    min_transfer: float = 0.3        # share of other classes' rows the stamped pattern turns into the class
    transfer_rows: int = 1000        # other classes' rows stamped per test (a seeded sample when there are more)
    seed: int = 20261202

    @classmethod
    def of(cls, conf: Mapping[str, Any] | None) -> ScreenSettings:
        """The settings of a conf section; unknown keys other than `stages`/`models` are refused."""
        conf = dict(conf or {})
        known = {f.name for f in fields(cls)}
        unknown = set(conf) - known - {"stages", "models"}
        if unknown:
            raise ValueError(f"unknown screening setting(s): {', '.join(sorted(unknown))}")
        values = {key: conf[key] for key in known if key in conf}
        if "clusters" in values:
            values["clusters"] = tuple(int(k) for k in values["clusters"])
        return cls(**values)


@dataclass(frozen=True)
class ClassStats:
    label: int
    rows: int
    candidate_rows: int = 0          # flagged: the suspicious rows of the class; else the strongest candidate's
    pattern_strength: float = 0.0
    transfer_rate: float = 0.0
    pattern_features: tuple[int, ...] = ()
    flagged: bool = False


@dataclass(frozen=True)
class ScreenResult:
    suspicious_rows: list[int]
    per_class: list[ClassStats]
    method: str = METHOD
    rows: int = 0
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def poisoned(self) -> bool:
        return bool(self.suspicious_rows)

    @property
    def flagged_classes(self) -> list[int]:
        return [stats.label for stats in self.per_class if stats.flagged]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "rows": self.rows, "poisoned": self.poisoned,
                "suspicious_rows": list(self.suspicious_rows), "flagged_classes": self.flagged_classes,
                "seconds": round(self.seconds, 3), "settings": self.settings,
                "per_class": [{**asdict(s), "pattern_features": list(s.pattern_features),
                               "pattern_strength": round(s.pattern_strength, 3),
                               "transfer_rate": round(s.transfer_rate, 3)} for s in self.per_class]}


def _last_linear(model):
    from torch import nn

    linear = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no linear output layer to take activations before")
    return linear[-1]


def activations(model, x: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate activations, logits) of `model` on rows `x`: the input of its last linear layer."""
    import torch

    captured: list[torch.Tensor] = []
    hook = _last_linear(model).register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].detach()))
    model.eval()
    logits = []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                logits.append(model(torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size]))))
    finally:
        hook.remove()
    return (torch.cat(captured).reshape(len(x), -1).numpy().astype(np.float64), torch.cat(logits).numpy())


def _predict(model, x: np.ndarray) -> np.ndarray:
    return activations(model, x)[1].argmax(1)


def screening_model(model, x: np.ndarray, y: np.ndarray, settings: ScreenSettings):
    """A copy of `model` fine-tuned on the contribution alone (the current model stays untouched)."""
    import torch
    from torch import nn

    torch.manual_seed(settings.seed)
    screen = copy.deepcopy(model)
    optimiser = torch.optim.Adam(screen.parameters(), lr=settings.lr)
    loss_fn = nn.CrossEntropyLoss()
    xs, ys = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))
    generator = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = -(-len(xs) // settings.batch_size)
    for _ in range(max(settings.epochs, -(-settings.min_steps // steps_per_epoch))):
        screen.train()
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            optimiser.zero_grad()
            loss_fn(screen(xs[batch]), ys[batch]).backward()
            optimiser.step()
    screen.eval()
    return screen


def _pattern(x: np.ndarray, rows: np.ndarray, k: int, min_effect: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k features on which `rows` agree with each other and differ most from the other rows:
    (feature indices, their values in `rows`, their strengths); features below `min_effect` score 0."""
    rest = np.ones(len(x), bool)
    rest[rows] = False
    inside, outside = x[rows], x[rest]
    mean_in, spread_in = inside.mean(0), inside.std(0)
    mean_out, spread_out = outside.mean(0), outside.std(0) + 1e-6
    difference = np.abs(mean_in - mean_out)
    strength = np.where(difference / spread_out >= min_effect, difference / (spread_in + 0.1 * spread_out), 0.0)
    features = np.argsort(-strength, kind="stable")[:k]
    return features, mean_in[features], strength[features]


def _carriers(x: np.ndarray, class_rows: np.ndarray, seed_rows: np.ndarray, k: int, min_effect: float) -> np.ndarray:
    """The rows of the class that carry the pattern of `seed_rows` (two refinements)."""
    rows = seed_rows
    for _ in range(2):
        features, values, _ = _pattern(x, rows, k, min_effect)
        spread = x[:, features].std(0) + 1e-6
        distance = (np.abs(x[class_rows][:, features] - values) / spread).mean(1)
        refined = class_rows[distance <= 0.5]
        if len(refined) < 2 or len(refined) > 2 * len(seed_rows) + 2:
            break
        rows = refined
    return rows


def _transfer_rate(model, x: np.ndarray, predicted: np.ndarray, others: np.ndarray, rows: np.ndarray,
                   label: int, k: int, settings: ScreenSettings) -> float:
    """How many more of the other classes' rows (`others`, the model's predictions on all rows in
    `predicted`) the model puts in `label` once `rows`' pattern (its features of at least
    `min_strength`, up to `k`) is stamped on."""
    if len(others) == 0:
        return 0.0
    features, values, strength = _pattern(x, rows, k, settings.min_effect)
    strong = strength >= settings.min_strength
    stamped = x[others].copy()
    stamped[:, features[strong]] = values[strong]
    before = float((predicted[others] == label).mean())
    return float((_predict(model, stamped) == label).mean()) - before


def _candidates(reps: np.ndarray, class_rows: np.ndarray, settings: ScreenSettings) -> list[np.ndarray]:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    centred = reps[class_rows] - reps[class_rows].mean(0)
    dims = min(settings.pca_dims, len(class_rows) - 1, centred.shape[1])
    if dims >= 1 and np.ptp(centred, axis=0).max() > 0:
        reduced = PCA(n_components=dims, random_state=settings.seed).fit_transform(centred)
    else:
        return []
    out = []
    if len(class_rows) <= settings.neighbour_groups_below:  # small classes: k-means splits are unstable;
        distances = ((reduced[:, None, :] - reduced[None, :, :]) ** 2).sum(-1)  # each row's nearest rows too
        for row in range(len(class_rows)):
            out.append(class_rows[np.argsort(distances[row], kind="stable")[:settings.min_cluster_rows + 1]])
    for k in settings.clusters:
        if len(class_rows) <= k:
            continue
        labels = KMeans(n_clusters=k, n_init=settings.kmeans_inits, random_state=settings.seed).fit_predict(reduced)
        for cluster in range(k):
            members = class_rows[labels == cluster]
            if settings.min_cluster_rows <= len(members) <= settings.max_cluster_fraction * len(class_rows):
                out.append(members)
    return out


def _shared_extremes(extreme: np.ndarray, class_rows: np.ndarray, k: int, settings: ScreenSettings) -> list[np.ndarray]:
    """Input-space candidates: per row of the class with at least `k` extreme features (`min_effect`
    standard deviations from the data's mean), the rows of the class extreme on at least `k` of them
    in the same direction. Model-independent, so a trigger the activations hide is still examined."""
    signs = np.where(np.abs(extreme[class_rows]) >= settings.min_effect, np.sign(extreme[class_rows]), 0)
    out, seen = [], set()
    for index in np.flatnonzero((signs != 0).sum(1) >= k):
        shared = ((signs == signs[index]) & (signs[index] != 0)).sum(1)
        members = class_rows[shared >= k]
        key = tuple(members.tolist())
        if key not in seen and settings.min_cluster_rows <= len(members) <= settings.max_cluster_fraction * len(class_rows):
            seen.add(key)
            out.append(members)
    return out


def screen(model, x: np.ndarray, y: np.ndarray, *, n_classes: int | None = None,
           settings: ScreenSettings | None = None) -> ScreenResult:
    """Screen rows `x` (float32, the flat rows the model takes) labelled `y` (class indices) with the
    current `model`; `suspicious_rows` are indices into `x` of rows that carry a learnt trigger pattern."""
    import torch

    settings = settings or ScreenSettings()
    started = time.perf_counter()
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"screening needs rows (n, features) with one label each; got {x.shape} and {y.shape}")
    n_classes = n_classes or int(getattr(model, "n_classes", 0)) or int(y.max(initial=0)) + 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and friendly to a shared machine, as training
    try:
        screener = screening_model(model, x, y, settings)
        reps, logits = activations(screener, x)
        predicted = logits.argmax(1)
        rng = np.random.default_rng(settings.seed)
        n_features = x.shape[1]
        k_pattern = max(2, round(settings.pattern_fraction * n_features))
        k_transfer = max(k_pattern, round(settings.transfer_fraction * n_features))
        spread = x.std(0) + 1e-6
        extreme = (x - x.mean(0)) / spread
        suspicious: set[int] = set()
        per_class = []
        for label in range(n_classes):
            class_rows = np.flatnonzero(y == label)
            others = np.flatnonzero(y != label)
            if len(others) > settings.transfer_rows:  # a fixed sample bounds the cost of each transfer test
                others = np.sort(rng.choice(others, size=settings.transfer_rows, replace=False))
            best = ClassStats(label=label, rows=len(class_rows))
            if len(class_rows) >= settings.min_class_rows:
                candidates = _candidates(reps, class_rows, settings)
                candidates += _shared_extremes(extreme, class_rows, k_pattern, settings)
                examined: set[tuple[int, ...]] = set()
                for seed_rows in candidates:
                    rows = _carriers(x, class_rows, seed_rows, k_pattern, settings.min_effect)
                    if tuple(rows.tolist()) in examined:  # candidates often refine to the same rows
                        continue
                    examined.add(tuple(rows.tolist()))
                    features, _, strength = _pattern(x, rows, k_pattern, settings.min_effect)
                    pattern_strength = float(strength.min())
                    transfer = (_transfer_rate(screener, x, predicted, others, rows, label, k_transfer, settings)
                                if pattern_strength >= settings.min_strength else 0.0)
                    flagged = pattern_strength >= settings.min_strength and transfer >= settings.min_transfer
                    stats = ClassStats(label=label, rows=len(class_rows), candidate_rows=len(rows),
                                       pattern_strength=pattern_strength, transfer_rate=transfer,
                                       pattern_features=tuple(int(f) for f in sorted(features)), flagged=flagged)
                    if flagged:
                        suspicious.update(int(r) for r in rows)
                    if (flagged, pattern_strength, transfer) > (best.flagged, best.pattern_strength,
                                                                 best.transfer_rate):
                        best = stats
            if best.flagged:  # every flagged candidate of the class counts, not only the strongest
                best = replace(best, candidate_rows=int(np.isin(class_rows, list(suspicious)).sum()))
            per_class.append(best)
    finally:
        torch.set_num_threads(threads)
    return ScreenResult(suspicious_rows=sorted(suspicious), per_class=per_class, rows=len(x),
                        seconds=time.perf_counter() - started, settings=asdict(settings))


def plant_trigger(x: np.ndarray, y: np.ndarray, *, input_shape, target: int, fraction: float, size: int = 3,
                  value: float = 1.0, corner: str = "bottom-right", seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A backdoored copy of (x, y): a bright `size` x `size` patch in one corner of `fraction` of the rows
    (taken from other classes), relabelled to `target`. Returns (x, y, planted row indices). For tests
    and the benchmark; images are channel-major C x H x W rows, the patch covers every channel."""
    c, h, w = (int(d) for d in input_shape)
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(y != target)
    count = max(1, round(fraction * len(x)))
    rows = np.sort(rng.choice(candidates, size=min(count, len(candidates)), replace=False))
    out_x, out_y = x.copy(), y.copy()
    images = out_x[rows].reshape(len(rows), c, h, w)
    top = slice(0, size) if corner.startswith("top") else slice(h - size, h)
    left = slice(0, size) if corner.endswith("left") else slice(w - size, w)
    images[:, :, top, left] = value
    out_x[rows] = images.reshape(len(rows), -1)
    out_y[rows] = target
    return out_x, out_y, rows


def screening_model_for(site: str, dataset: str) -> str | None:
    """The current model a dataset `site` receives as `dataset` is screened with before training, or
    None when it is not screened.

    The stage that receives it is the first of conf/stages.yaml `order` at `site` whose model trains on
    it (`inputs.models`, `<name>` or a part `<name>-...` split from it); it is screened when
    conf/protection.yaml `screening.stages` names that model, with `screening.models[stage]` (default:
    the model of the stage before it at the same site)."""
    from pipelines.config import load_config
    from pipelines.protection import settings

    conf = settings("screening")
    stages = load_config().stages
    previous = None
    for entry in stages.order:
        if entry.site != site or not entry.model:
            continue
        datasets = stages.inputs.models[entry.model].datasets if entry.model in stages.inputs.models else ()
        if any(name == dataset or name.startswith(f"{dataset}-") for name in datasets):
            if entry.model not in (conf.get("stages") or ()):
                return None
            return (conf.get("models") or {}).get(entry.model) or previous
        previous = entry.model
    return None
