"""Training, fine-tuning and evaluation. Pure functions on arrays; I/O is the caller's."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.config import AdversarialTraining, TrainingProfile
from pipelines.data.spec import DIGITS, DataSpec

# Collaboration modes the training step can take; federated rounds come later.
COLLABORATION_MODES = ("centralized", "fine_tune")


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    # DP-SGD runs: mechanism, accountant, epsilon spent, delta, noise multiplier, clipping norm, sample
    # rate, steps, epochs (pipelines.learning.privacy.train_private); None without privacy
    privacy: dict[str, Any] | None = None


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def train(
    x: np.ndarray,
    y: np.ndarray,
    profile: TrainingProfile,
    *,
    seed: int,
    family: str | None = None,
    spec: DataSpec | None = None,
    architecture: Mapping[str, Any] | None = None,
    base_state: dict[str, torch.Tensor] | None = None,
    mode: str = "centralized",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    watermark: tuple[np.ndarray, np.ndarray] | None = None,
    public_rows: np.ndarray | None = None,
) -> TrainResult:
    """Train a new model of `family` (default: conf/stages.yaml model_family) for rows of `spec`
    (default: the digits demo), or fine-tune `base_state` (transfer learning) when given.

    `architecture` ({architecture, hyper}, as metadata.json records it) builds that model instead of
    the family's from conf/models.yaml (fine-tuning continues the base model's architecture). The
    model is built after seeding, so its initial weights follow `seed`.

    `watermark` (rows, labels) are trigger rows (`pipelines.protection.watermark.embedding_rows`)
    trained on with the data; they do not enter the input standardisation a new model fits.

    A profile with `privacy` trains with DP-SGD (pipelines.learning.privacy) and refuses a model that
    cannot. A new model then fits its input standardisation on `public_rows` only (rows the trainer
    owns; none: no standardisation), and the watermark imprint trains on the trigger rows alone, so
    nothing but the DP steps touches the training rows."""
    from pipelines.learning.families import build_architecture, build_model, default_family

    if mode not in COLLABORATION_MODES:
        raise ValueError(f"unknown collaboration mode {mode!r}; known: {', '.join(COLLABORATION_MODES)}")
    if len(x) == 0:
        raise ValueError("no training records")
    spec = spec or DIGITS
    _seed(seed)
    torch.set_num_threads(1)  # deterministic and friendly to a shared machine
    if architecture is not None:
        model = build_architecture(architecture, spec)
    else:
        model = build_model(family or default_family(), spec)
    n_features = int(np.prod(model.input_shape))
    if x.ndim != 2 or x.shape[1] != n_features:
        raise ValueError(f"training rows have shape {tuple(x.shape)}; the model takes rows of {n_features} features")
    if len(y) != len(x):
        raise ValueError(f"{len(x)} training rows but {len(y)} labels")
    if y.min() < 0 or y.max() >= model.n_classes:
        raise ValueError(f"labels must be class indices 0..{model.n_classes - 1}; found {int(y.min())}..{int(y.max())}")
    if base_state is not None:
        model.load_state_dict(base_state)
    optimiser = torch.optim.Adam(model.parameters(), lr=profile.lr, weight_decay=profile.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    xs, ys = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))
    privacy = profile.privacy
    if privacy is not None:
        from pipelines.learning.privacy import check_compatible

        check_compatible(model)  # before any work
    if base_state is None and mode == "centralized" and hasattr(model, "fit_inputs"):
        if privacy is None:
            model.fit_inputs(xs)  # a new model takes its input standardisation from the training rows
        elif public_rows is not None and len(public_rows):
            if public_rows.ndim != 2 or public_rows.shape[1] != n_features:
                raise ValueError(f"public rows have shape {tuple(public_rows.shape)}; the model takes {n_features}")
            model.fit_inputs(torch.from_numpy(np.ascontiguousarray(public_rows, dtype=np.float32)))
    if watermark is not None and len(watermark[0]):
        marks_x, marks_y = watermark
        if marks_x.shape[1:] != x.shape[1:] or len(marks_y) != len(marks_x):
            raise ValueError(f"watermark rows of shape {tuple(marks_x.shape)} do not fit training rows of {n_features}")
        data_x, data_y = xs, ys
        marks = torch.from_numpy(np.ascontiguousarray(marks_x, dtype=np.float32)), torch.from_numpy(marks_y.astype(np.int64))
        xs, ys = torch.cat([xs, marks[0]]), torch.cat([ys, marks[1]])
    generator = torch.Generator().manual_seed(seed)
    adversarial, bounds = profile.adversarial, (float(x.min()), float(x.max()))  # the data's range
    result = TrainResult(model)
    if privacy is not None:
        from pipelines.learning.privacy import train_private

        result.history, result.privacy = train_private(model, optimiser, loss_fn, xs, ys, privacy,
                                                       epochs=profile.epochs, batch_size=profile.batch_size,
                                                       seed=seed, on_epoch=on_epoch)
        # the imprint below is post-processing on the supplier's own trigger rows, with a plain optimiser
        optimiser = torch.optim.Adam(model.parameters(), lr=profile.lr, weight_decay=profile.weight_decay)
    for epoch in range(profile.epochs if privacy is None else 0):  # the DP epochs ran above
        model.train()
        order = torch.randperm(len(xs), generator=generator)
        total, correct, loss_sum = 0, 0, 0.0
        for start in range(0, len(xs), profile.batch_size):
            batch = order[start : start + profile.batch_size]
            inputs = xs[batch]
            if adversarial is not None:  # the first share of a shuffled batch becomes adversarial
                n = max(1, round(adversarial.ratio * len(batch)))
                inputs = torch.cat([adversarial_examples(model, inputs[:n], ys[batch][:n], adversarial, bounds),
                                    inputs[n:]])
            optimiser.zero_grad()
            logits = model(inputs)
            loss = loss_fn(logits, ys[batch])
            loss.backward()
            optimiser.step()
            loss_sum += float(loss.detach()) * len(batch)
            correct += int((logits.argmax(1) == ys[batch]).sum())
            total += len(batch)
        metrics = {"train_loss": loss_sum / total, "train_accuracy": correct / total}
        result.history.append(metrics)
        if on_epoch:
            on_epoch(epoch, metrics)
    if watermark is not None and len(watermark[0]):
        steps = _imprint(model, optimiser, loss_fn, marks, None if privacy else (data_x, data_y), generator,
                         profile.batch_size)
        print(f"watermark: {len(marks[1])} trigger rows imprinted in {steps} extra steps", flush=True)
    model.eval()
    return result


IMPRINT_MAX_STEPS = 300


def _imprint(model: nn.Module, optimiser, loss_fn, marks: tuple[torch.Tensor, torch.Tensor],
             data: tuple[torch.Tensor, torch.Tensor] | None, generator: torch.Generator, batch_size: int) -> int:
    """Continue training until the model answers every trigger with its label (at most
    IMPRINT_MAX_STEPS steps), each step on the triggers beside as many training rows drawn at random,
    so the mark holds where the epochs alone did not teach it (few epochs, small data, narrow models)
    without the model drifting from its data. Without `data` (DP training: the training rows are
    touched by the DP steps only) each step trains on the triggers alone. Returns the steps taken."""
    mx, my = marks
    for steps in range(IMPRINT_MAX_STEPS + 1):
        model.eval()
        with torch.no_grad():
            if bool((model(mx).argmax(1) == my).all()):
                return steps
        if steps == IMPRINT_MAX_STEPS:
            return steps
        model.train()
        inputs, labels = mx, my
        if data is not None:
            rows = torch.randint(0, len(data[0]), (max(len(mx), batch_size),), generator=generator)
            inputs, labels = torch.cat([mx, data[0][rows]]), torch.cat([my, data[1][rows]])
        optimiser.zero_grad()
        loss_fn(model(inputs), labels).backward()
        optimiser.step()
    return IMPRINT_MAX_STEPS


def adversarial_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, adversarial: AdversarialTraining,
                         bounds: tuple[float, float]) -> torch.Tensor:
    """FGSM or PGD (L-inf, no random start) examples of `x` against `model` within `adversarial.eps`
    of the value range `bounds`, clipped to it. The model's mode is kept; its gradients are not touched."""
    low, high = bounds
    eps = adversarial.eps * max(high - low, 1e-12)
    steps = 1 if adversarial.method == "fgsm" else adversarial.steps
    step_size = eps if adversarial.method == "fgsm" else 2.5 * eps / steps
    was_training = model.training
    model.eval()
    x_adv = x.detach().clone()
    try:
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(x_adv), y), x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(low, high)
    finally:
        model.train(was_training)
    return x_adv.detach()


def logits_torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    if len(y) == 0:
        raise ValueError("no evaluation records")
    return float((logits.argmax(1) == y).mean())
