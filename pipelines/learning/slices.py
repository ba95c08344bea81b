"""Sliced training, so that withdrawing one dataset does not mean training again from the start.

SISA slicing (Bourtoule et al., "Machine Unlearning", IEEE S&P 2021) with one slice per contribution:
the trainer's own datasets form slice 0, every other party's dataset a slice of its own, in the order
given. Slice k continues from the weights slice k-1 ended with and trains on the datasets of slices
0..k together (cumulative), for its share of the epochs. After each slice its weights are kept as a
checkpoint at the trainer (`<state_dir>/checkpoints/`, never in the model directory that is signed
and sent).

Withdrawing dataset j removes it from every slice (`without`). Slices before the first that held j
are unchanged, so their checkpoints are reused and only what followed is trained again; the result
is the model the same schedule gives when j was never there, bit for bit: each slice is one call of
`pipelines.learning.train.train` seeded with (seed + k), starting from the weights before it (a fresh
optimiser per slice), so a slice depends on nothing but its starting weights, its data and its seed.
A checkpoint is found by a key over everything that decides its weights: the base model, the
architecture and profile, the seed and, per slice so far, the datasets' digests and epochs (not the
code version: a checkpoint outlives commits that leave training alone).

The own slice carries `own_share` of the epochs (conf/stages.yaml `unlearning.own_share`, 0.625:
5 of 8 collaborative epochs), each contribution slice the rest (3). A contribution that this leaves
with fewer passes than unsliced training (the last one: 3 of 8) enters each epoch of its slices
round(8 / passes) times, so every dataset is seen about as often as unsliced (benchmarks/unlearning.py:
M3 and M8 within 0.7 points of unsliced training on every test set, mean of 3 seeds). Withdrawing the
first contribution of M3 then trains again 3 of 8 epochs, on the own data alone.
Input standardisation of a new model is fitted on the own slice only, so no statistic of a
contribution stays behind in the weights its withdrawal keeps. Watermark rows train in the last
slice, and the imprint follows it, as in unsliced training.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.config import TrainingProfile
from pipelines.data.spec import DIGITS, DataSpec
from pipelines.fileio import read_json, write_atomic, write_json

CHECKPOINTS = "checkpoints"
WEIGHTS = "weights.safetensors"
RECORD = "checkpoint.json"


class SliceError(ValueError):
    pass


@dataclass(frozen=True)
class Slice:
    datasets: tuple[str, ...]  # every dataset the slice trains on: its own and those of the slices before
    epochs: int
    repeat: tuple[tuple[str, int], ...] = ()  # datasets whose rows enter each epoch more than once, and how often

    def times(self, dataset: str) -> int:
        return dict(self.repeat).get(dataset, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"datasets": list(self.datasets), "epochs": self.epochs,
                **({"repeat": dict(self.repeat)} if self.repeat else {})}


@dataclass
class SlicedResult:
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    slices: list[dict[str, Any]] = field(default_factory=list)  # per slice: datasets, epochs, key, checkpoint digest
    resumed_from_slice: int | None = None  # the first slice trained again (the ones before came from checkpoints)
    trained_slices: int = 0
    privacy: dict[str, Any] | None = None  # sliced runs do not train with DP-SGD (as TrainResult's)


def plan_slices(datasets: Sequence[str], *, own: int, epochs: int, own_share: float) -> list[Slice]:
    """The slices of a run on `datasets` (the first `own` of them the trainer's, the rest one
    contribution each). Without contributions: one slice of every epoch (unsliced training).

    The own slice takes `own_share` of the `epochs`, every contribution slice the rest. A dataset is
    then trained on in its slice and every later one; one that this leaves with fewer passes than
    unsliced training gives it (`epochs`) enters each epoch `round(epochs / passes)` times, so every
    contribution is seen about as often as unsliced training sees it (the last one otherwise only
    in the last slice)."""
    if not datasets:
        raise SliceError("no datasets to slice")
    if not 0 < own_share <= 1:
        raise SliceError(f"own_share must lie in (0, 1], got {own_share}")
    first = max(own, 1)  # with no own data the first contribution opens the run
    groups = [list(datasets[:first])] + [[d] for d in datasets[first:]]
    if len(groups) == 1:
        return [Slice(tuple(datasets), epochs)]
    own_epochs = min(max(1, math.ceil(epochs * own_share)), max(1, epochs - 1))
    counts = [own_epochs] + [max(1, epochs - own_epochs)] * (len(groups) - 1)
    repeat: dict[str, int] = {}
    for k, group in enumerate(groups[1:], start=1):
        passes = sum(counts[k:])
        if round(epochs / passes) > 1:
            repeat[group[0]] = round(epochs / passes)
    cumulative: list[str] = []
    out = []
    for group, count in zip(groups, counts, strict=True):
        cumulative += group
        out.append(Slice(tuple(cumulative), count, tuple((d, repeat[d]) for d in cumulative if d in repeat)))
    return out


def without(slices: Sequence[Slice], dataset: str) -> list[Slice]:
    """The schedule with `dataset` withdrawn: it leaves every slice; a slice left with no data gives
    its epochs to the next one. Slices before the first that held it are unchanged."""
    if not any(dataset in s.datasets for s in slices):
        raise SliceError(f"no slice trains on {dataset}")
    out: list[Slice] = []
    carried = 0
    for s in slices:
        kept = tuple(d for d in s.datasets if d != dataset)
        if not kept:
            carried += s.epochs
            continue
        out.append(Slice(kept, s.epochs + carried, tuple((d, r) for d, r in s.repeat if d != dataset)))
        carried = 0
    if not out:
        raise SliceError(f"withdrawing {dataset} leaves nothing to train on")
    if carried:
        out[-1] = Slice(out[-1].datasets, out[-1].epochs + carried, out[-1].repeat)
    return out


def from_records(records: Sequence[Mapping[str, Any]]) -> list[Slice]:
    """Slices as metadata.json `slices` records them."""
    try:
        return [Slice(tuple(str(d) for d in r["datasets"]), int(r["epochs"]),
                      tuple((str(d), int(n)) for d, n in (r.get("repeat") or {}).items())) for r in records]
    except (KeyError, TypeError, ValueError) as exc:
        raise SliceError(f"unreadable slice plan: {exc}") from None


def checkpoint_keys(slices: Sequence[Slice], material: Mapping[str, Any], digests: Mapping[str, str],
                    watermark: Any = None) -> list[str]:
    """Per slice, the key of its checkpoint: a digest of `material` (base model, architecture,
    profile, seed...) and of the datasets' digests and epochs of every slice up to it. The last
    slice also trains the watermark rows, so its key names them (`watermark`)."""
    keys, prefix = [], []
    for k, s in enumerate(slices):
        prefix.append([sorted(digests.get(d, d) for d in s.datasets), s.epochs,
                       sorted([digests.get(d, d), r] for d, r in s.repeat)])
        last = {"watermark": watermark} if k == len(slices) - 1 and watermark is not None else {}
        body = json.dumps({"material": material, "slices": prefix, **last}, sort_keys=True, default=str)
        keys.append(hashlib.sha256(body.encode()).hexdigest()[:32])
    return keys


def save_checkpoint(folder: Path, key: str, state: Mapping[str, torch.Tensor], record: Mapping[str, Any]) -> str:
    """Write a slice's weights and record under `folder/key`, each file atomically, the record last
    (a checkpoint without its record is not one). Returns the weights' digest."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous() for k, v in state.items()})
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    target = folder / key
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(target / WEIGHTS, data, mode=0o600)
    write_json(target / RECORD, {**record, "key": key, "digest": digest}, mode=0o600)
    return digest


def load_checkpoint(folder: Path, key: str) -> tuple[dict[str, torch.Tensor], str] | None:
    """The weights of checkpoint `key` and their digest; None when absent, incomplete or altered."""
    from safetensors.torch import load

    target = folder / key
    try:
        record = read_json(target / RECORD)
        data = (target / WEIGHTS).read_bytes()
    except (OSError, ValueError):
        return None
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if record.get("key") != key or record.get("digest") != digest:
        return None
    return load(data), digest


def _rows(parts: Mapping[str, tuple[np.ndarray, np.ndarray]], piece: Slice) -> tuple[np.ndarray, np.ndarray]:
    missing = [n for n in piece.datasets if n not in parts]
    if missing:
        raise SliceError(f"slice names datasets that were not given: {', '.join(missing)}")
    names = [n for n in piece.datasets for _ in range(piece.times(n))]
    return (np.concatenate([parts[n][0] for n in names]), np.concatenate([parts[n][1] for n in names]))


def train_sliced(
    parts: Mapping[str, tuple[np.ndarray, np.ndarray]],
    slices: Sequence[Slice],
    profile: TrainingProfile,
    *,
    seed: int,
    material: Mapping[str, Any],
    digests: Mapping[str, str] | None = None,
    checkpoints: Path | None = None,
    base_state: dict[str, torch.Tensor] | None = None,
    architecture: Mapping[str, Any] | None = None,
    family: str | None = None,
    spec: DataSpec | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    watermark: tuple[np.ndarray, np.ndarray] | None = None,
    watermark_id: Any = None,
    resume: bool = True,
) -> SlicedResult:
    """Train `slices` over `parts` (dataset -> rows, labels), each slice from the weights the one
    before ended with (slice 0 from `base_state`, or a new model). With `checkpoints` (a folder at
    the trainer) each slice's weights are kept there, and with `resume` the run starts after the
    last slice whose checkpoint already exists. `material` and `digests` (dataset -> content digest)
    make the checkpoint keys; `watermark_id` names the watermark rows the last slice trains."""
    from pipelines.learning.families import build_architecture, build_model, default_family
    from pipelines.learning.train import train

    if not slices:
        raise SliceError("no slices to train")
    spec = spec or DIGITS
    digests = digests or {}
    keys = checkpoint_keys(slices, material, digests, watermark_id if watermark is not None else None)
    state, start, found = base_state, 0, {}
    if checkpoints is not None and resume:
        for k in range(len(slices) - 1, -1, -1):
            loaded = load_checkpoint(checkpoints, keys[k])
            if loaded is not None:
                state, start = loaded[0], k + 1
                found = {k: loaded[1]}
                break
    result = SlicedResult(model=None)  # type: ignore[arg-type]
    result.resumed_from_slice = start if start else None
    offset = sum(s.epochs for s in slices[:start])
    records = [{**s.to_dict(), "key": keys[k]} for k, s in enumerate(slices)]
    for k in range(start, len(slices)):
        x, y = _rows(parts, slices[k])
        last = k == len(slices) - 1

        def shifted(epoch: int, metrics: dict[str, float], at: int = offset) -> None:
            if on_epoch:
                on_epoch(at + epoch, metrics)

        trained = train(x, y, profile.model_copy(update={"epochs": slices[k].epochs}), seed=seed + k,
                        architecture=architecture, family=family, spec=spec, base_state=state,
                        mode="centralized" if state is None else "fine_tune", on_epoch=shifted,
                        watermark=watermark if last else None)
        result.history += trained.history
        offset += slices[k].epochs
        state = {name: value.detach().clone() for name, value in trained.model.state_dict().items()}
        result.model, result.trained_slices = trained.model, result.trained_slices + 1
        if checkpoints is not None:
            found[k] = save_checkpoint(checkpoints, keys[k], state, {"slice": k, **slices[k].to_dict(),
                                                                     "digests": [digests.get(d, d) for d in slices[k].datasets]})
    if result.model is None:  # every slice came from its checkpoint
        if architecture is not None:
            model = build_architecture(architecture, spec)
        else:
            model = build_model(family or default_family(), spec)
        model.load_state_dict(state)
        model.eval()
        result.model = model
    for k, record in enumerate(records):
        if k in found:
            record["checkpoint"] = found[k]
    if checkpoints is not None:  # earlier checkpoints of a resumed run: their recorded digests
        for k in range(start - 1):
            loaded = load_checkpoint(checkpoints, keys[k])
            if loaded is not None:
                records[k]["checkpoint"] = loaded[1]
    result.slices = records
    return result


def checkpoint_dir(state_dir: Path) -> Path:
    """Where a site keeps its slice checkpoints (beside its other state; never in a model directory)."""
    return state_dir / CHECKPOINTS
