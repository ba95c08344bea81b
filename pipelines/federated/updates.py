"""Model updates as flat float32 vectors, and a participant's local training step.

A round moves one vector per participant: the difference between its locally trained weights and
the global weights it started from (McMahan et al. 2017, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", FedAvg's client update). `StateLayout` fixes the order and the
shapes of a model's floating-point state (parameters and float buffers, in state_dict order), so
every party flattens and rebuilds the same way; entries that are not floating point (counters)
are not part of an update and are carried from the global state.

`local_update` is the participant's step: SGD (or Adam) over its own rows for a few epochs from
the global state, optionally with FedProx's proximal term mu/2 ||w - w_global||^2 added to the loss
(Li et al. 2020, "Federated Optimization in Heterogeneous Networks"); mu = 0 is FedAvg's step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.data.spec import DataSpec

OPTIMIZERS = ("sgd", "adam")


class FederatedError(ValueError):
    """A federated round cannot go on: the message says which input or participant and why."""


@dataclass(frozen=True)
class StateLayout:
    """The floating-point entries of a state_dict, in order: (name, shape, dtype) each."""

    entries: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> StateLayout:
        return cls(tuple((name, tuple(t.shape), t.dtype) for name, t in state.items()
                         if torch.is_floating_point(t)))

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) for _, shape, _ in self.entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.entries)

    def to_vector(self, state: Mapping[str, torch.Tensor]) -> np.ndarray:
        """The entries of `state` as one float32 vector (refuses a state of another model)."""
        parts = []
        for name, shape, _ in self.entries:
            if name not in state:
                raise FederatedError(f"the state has no entry {name!r} of the model's layout")
            tensor = state[name]
            if tuple(tensor.shape) != shape:
                raise FederatedError(f"state entry {name!r} has shape {list(tensor.shape)}; the layout says {list(shape)}")
            parts.append(tensor.detach().cpu().reshape(-1).to(torch.float32).numpy())
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def to_state(self, vector: np.ndarray, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state_dict with the entries of `vector` (shapes and dtypes of the layout); entries
        outside the layout (not floating point) are copied from `template`."""
        vector = np.asarray(vector)
        if vector.ndim != 1 or len(vector) != self.size:
            raise FederatedError(f"an update of shape {list(vector.shape)} does not fit a model of {self.size} values")
        out = {name: t.detach().clone() for name, t in template.items()}
        offset = 0
        for name, shape, dtype in self.entries:
            count = int(np.prod(shape, dtype=np.int64))
            out[name] = torch.from_numpy(np.array(vector[offset : offset + count], dtype=np.float32)).reshape(shape).to(dtype)
            offset += count
        return out


def apply_update(global_state: Mapping[str, torch.Tensor], delta: np.ndarray) -> dict[str, torch.Tensor]:
    """The global state moved by `delta` (an aggregate of updates)."""
    layout = StateLayout.of(global_state)
    return layout.to_state(layout.to_vector(global_state) + np.asarray(delta, dtype=np.float32), global_state)


UPDATE_MAGIC = b"FEDUPD1\n"


def update_bytes(vector: np.ndarray) -> bytes:
    """An update as the bytes a package carries: a magic line, then the little-endian values
    (float32, or uint64 for a masked vector) after one byte naming the type."""
    vector = np.asarray(vector)
    kinds = {np.dtype(np.float32): b"f", np.dtype(np.uint64): b"u"}
    if vector.ndim != 1 or vector.dtype not in kinds:
        raise FederatedError(f"an update is a vector of float32 or uint64 values, not {vector.dtype} {list(vector.shape)}")
    return UPDATE_MAGIC + kinds[vector.dtype] + vector.astype(vector.dtype.newbyteorder("<")).tobytes()


def update_from_bytes(data: bytes, size: int) -> np.ndarray:
    """The vector `update_bytes` wrote, refusing anything else or a vector of another length."""
    header = len(UPDATE_MAGIC) + 1
    if not data.startswith(UPDATE_MAGIC) or data[header - 1 : header] not in (b"f", b"u"):
        raise FederatedError("not an update (no update header)")
    dtype = np.dtype("<f4") if data[header - 1 : header] == b"f" else np.dtype("<u8")
    if len(data) - header != size * dtype.itemsize:
        raise FederatedError(f"the update holds {(len(data) - header) / dtype.itemsize:g} values; the model has {size}")
    vector = np.frombuffer(data, dtype=dtype, offset=header).astype(dtype.newbyteorder("="))
    if dtype.kind == "f" and not np.all(np.isfinite(vector)):
        raise FederatedError("the update holds values that are not finite")
    return vector


@dataclass(frozen=True)
class LocalConfig:
    """A participant's local training: epochs over its rows, learning rate, batch size, the
    optimizer (FedAvg's is SGD), and FedProx's mu (0: none)."""

    epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    mu: float = 0.0
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise FederatedError(f"local training needs epochs >= 1 and batch_size >= 1, not {self.epochs}, {self.batch_size}")
        if not self.lr > 0:
            raise FederatedError(f"local learning rate must be positive, not {self.lr}")
        if self.mu < 0:
            raise FederatedError(f"FedProx mu must be >= 0, not {self.mu}")
        if self.optimizer not in OPTIMIZERS:
            raise FederatedError(f"unknown local optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")


@dataclass
class LocalUpdate:
    """What a participant returns: its update (local weights minus global), its sample count and
    its local training metrics (they stay with the participant's run; only `delta` travels)."""

    delta: np.ndarray
    n_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


def build_model(architecture: Mapping[str, Any], spec: DataSpec, state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """The model `architecture` ({architecture, hyper}, as metadata.json records it) for `spec`,
    loaded with `state` when given."""
    from pipelines.learning.families import build_architecture

    model = build_architecture(architecture, spec)
    if state is not None:
        model.load_state_dict(dict(state))
    return model


def _check_rows(model: nn.Module, x: np.ndarray, y: np.ndarray, who: str) -> None:
    n_features = int(np.prod(model.input_shape))
    if x.ndim != 2 or x.shape[1] != n_features:
        raise FederatedError(f"{who}: rows of shape {tuple(x.shape)}; the model takes rows of {n_features} features")
    if len(y) != len(x) or len(x) == 0:
        raise FederatedError(f"{who}: {len(x)} rows and {len(y)} labels (need as many, and at least one)")
    if y.min() < 0 or y.max() >= model.n_classes:
        raise FederatedError(f"{who}: labels must be class indices 0..{model.n_classes - 1}; found {int(y.min())}..{int(y.max())}")


def local_update(
    global_state: Mapping[str, torch.Tensor],
    x: np.ndarray,
    y: np.ndarray,
    *,
    architecture: Mapping[str, Any],
    spec: DataSpec,
    config: LocalConfig,
    seed: int,
    who: str = "participant",
) -> LocalUpdate:
    """Train the global model on (x, y) for `config.epochs` and return the update and sample count.

    With `config.mu` > 0 the loss has FedProx's proximal term mu/2 ||w - w_global||^2 over the
    trainable parameters; with mu = 0 this is FedAvg's ClientUpdate. Seeded: the same inputs give
    the same update."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # deterministic and friendly to a shared machine
    model = build_model(architecture, spec, global_state)
    _check_rows(model, x, y, who)
    layout = StateLayout.of(global_state)
    start = layout.to_vector(global_state)
    anchors = [p.detach().clone() for p in model.parameters()] if config.mu > 0 else []
    if config.optimizer == "sgd":
        optimiser = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    else:
        optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    ys = torch.from_numpy(np.asarray(y, dtype=np.int64))
    generator = torch.Generator().manual_seed(seed)
    loss_sum, correct, total = 0.0, 0, 0
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(len(xs), generator=generator)
        loss_sum, correct, total = 0.0, 0, 0
        for begin in range(0, len(xs), config.batch_size):
            batch = order[begin : begin + config.batch_size]
            optimiser.zero_grad()
            logits = model(xs[batch])
            loss = loss_fn(logits, ys[batch])
            if anchors:
                proximal = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchors, strict=True))
                loss = loss + 0.5 * config.mu * proximal
            loss.backward()
            optimiser.step()
            loss_sum += float(loss.detach()) * len(batch)
            correct += int((logits.argmax(1) == ys[batch]).sum())
            total += len(batch)
    model.eval()
    delta = layout.to_vector(model.state_dict()) - start
    if not np.all(np.isfinite(delta)):
        raise FederatedError(f"{who}: local training diverged (the update is not finite); lower the learning rate")
    return LocalUpdate(delta.astype(np.float32), len(x),
                       {"train_loss": loss_sum / total, "train_accuracy": correct / total})


def evaluate_state(
    state: Mapping[str, torch.Tensor], x: np.ndarray, y: np.ndarray, *, architecture: Mapping[str, Any], spec: DataSpec
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the model `state` on (x, y) (where those rows live)."""
    model = build_model(architecture, spec, state)
    _check_rows(model, x, y, "evaluation")
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
        loss = float(nn.functional.cross_entropy(logits, labels))
    return {"accuracy": float((logits.argmax(1) == labels).float().mean()), "loss": loss}
