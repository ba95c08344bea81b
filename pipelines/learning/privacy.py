"""Differential privacy: DP-SGD with Opacus, and the privacy spend a model's lineage carries.

A training profile with `privacy` (pipelines.config.DifferentialPrivacy) trains with Opacus'
PrivacyEngine: Poisson sampling of every batch (each row joins a step's batch with probability
batch_size / rows), each sample's gradient clipped to `max_grad_norm`, Gaussian noise of
`noise_multiplier` x `max_grad_norm` added to the sum. The accountant (Renyi DP by default, or
Opacus' PRV accountant) turns (noise, sample rate, steps) into the (epsilon, delta) spent; with
`target_epsilon` Opacus picks the noise that spends exactly that over the profile's epochs.

The guarantee covers the rows the DP steps see. What the training code derives from the data outside
those steps must not break it: a new model's input standardisation is fitted on rows the trainer
owns (`public_rows`), never on a partner's; the watermark imprint after the DP epochs trains on the
supplier's own synthetic trigger rows only (post-processing). Adversarial training is refused with
privacy (the profile validator). Noise comes from torch's generator seeded by the run's seed, so a
run is reproducible; Opacus' `secure_mode` (a cryptographic generator) would make it
unreproducible and is not used.

Lineage: every lineage entry a model records carries `dp`, the (epsilon, delta) spent on that
source along the model's chain, or None where some training on it had no bound (trained without DP,
or an older model that recorded nothing). A fine-tune that trains on a source its base already
trained on adds the spends (basic composition). The `model_release` gate compares them with the
owners' budgets (policies/model_release/privacy.rego).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from pipelines.config import DifferentialPrivacy

MECHANISM = "dp-sgd"


class PrivacyError(ValueError):
    """A model or a setting cannot train with differential privacy; the message says why."""


def check_compatible(model: nn.Module) -> None:
    """Refuse a model Opacus cannot compute per-sample gradients for (BatchNorm, for one: its batch
    statistics mix the samples), naming each offending module."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivacyError(f"{type(model).__name__} cannot train with differential privacy: "
                           + "; ".join(str(error) for error in errors)
                           + " (use GroupNorm instead of BatchNorm, as the resnet family does)")


def train_private(model: nn.Module, optimiser: torch.optim.Optimizer, loss_fn: nn.Module, xs: torch.Tensor,
                  ys: torch.Tensor, settings: DifferentialPrivacy, *, epochs: int, batch_size: int, seed: int,
                  on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                  ) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Train `model` in place with DP-SGD for `epochs` epochs of Poisson-sampled batches (expected
    size `batch_size`). Returns the epochs' metrics and the privacy record: mechanism, accountant,
    epsilon spent at delta, noise multiplier, clipping norm, sample rate, steps, epochs."""
    from opacus import PrivacyEngine

    check_compatible(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=batch_size,
                                         generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():  # its warning that the generator is not cryptographic: see the module doc
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=settings.accountant, secure_mode=False)
    common = {"module": model, "optimizer": optimiser, "data_loader": loader, "max_grad_norm": settings.max_grad_norm,
              "poisson_sampling": True, "noise_generator": torch.Generator().manual_seed(seed + 1)}
    if settings.target_epsilon is not None:
        private, dp_optimiser, dp_loader = engine.make_private_with_epsilon(
            **common, target_epsilon=settings.target_epsilon, target_delta=settings.delta, epochs=epochs)
    else:
        private, dp_optimiser, dp_loader = engine.make_private(**common, noise_multiplier=settings.noise_multiplier)
    history, steps = [], 0
    try:
        for epoch in range(epochs):
            private.train()
            total, correct, loss_sum = 0, 0, 0.0
            for inputs, labels in dp_loader:
                dp_optimiser.zero_grad()
                logits = private(inputs)
                # an empty Poisson batch still takes its (noise-only) step, as the accountant counts it
                loss = loss_fn(logits, labels) if len(labels) else logits.sum() * 0.0
                with warnings.catch_warnings():  # the rows need no gradient; the hooks see the modules' outputs
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                dp_optimiser.step()
                steps += 1
                loss_sum += float(loss.detach()) * len(labels)
                correct += int((logits.argmax(1) == labels).sum())
                total += len(labels)
            metrics = {"train_loss": loss_sum / max(total, 1), "train_accuracy": correct / max(total, 1)}
            history.append(metrics)
            if on_epoch:
                on_epoch(epoch, metrics)
        epsilon = float(engine.get_epsilon(settings.delta))
    finally:
        private._close()  # the hooks and per-sample gradients go; `model` is the plain module again
    record = {"mechanism": MECHANISM, "accountant": settings.accountant, "epsilon": epsilon, "delta": settings.delta,
              "noise_multiplier": float(dp_optimiser.noise_multiplier), "max_grad_norm": settings.max_grad_norm,
              "sample_rate": float(dp_loader.sample_rate), "steps": steps, "epochs": epochs,
              **({"target_epsilon": settings.target_epsilon} if settings.target_epsilon is not None else {})}
    return history, record


# ---------------------------------------------------------------- the spend in a model's lineage


def spend(privacy: Mapping[str, Any] | None) -> dict[str, float] | None:
    """What one training run spends on each source it trains on: (epsilon, delta), None without DP."""
    if not privacy:
        return None
    return {"epsilon": float(privacy["epsilon"]), "delta": float(privacy["delta"])}


def compose(earlier: Mapping[str, Any] | None, later: Mapping[str, Any] | None) -> dict[str, float] | None:
    """Basic composition of two spends on one source: epsilons and deltas add; no bound stays no bound."""
    if earlier is None or later is None:
        return None
    return {"epsilon": float(earlier["epsilon"]) + float(later["epsilon"]),
            "delta": float(earlier["delta"]) + float(later["delta"])}


def lineage_with_spend(base_lineage: Iterable[Mapping[str, Any]], run_entries: Iterable[Mapping[str, Any]],
                       run_spend: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """A model's lineage: its base model's entries (with the spends the base recorded; an entry without
    `dp` has no bound), then this run's sources. Each entry of this run carries `dp` = this run's
    spend, composed with the base's where the base trained on the same source. The entries' other
    keys are those of `pipelines.data.lineage.entry`, unchanged."""
    out: dict[str, dict[str, Any]] = {}
    for entry in base_lineage:
        out.setdefault(entry["dataset_id"], {**entry, "dp": entry.get("dp")})
    for entry in run_entries:
        if entry["dataset_id"] in out:
            earlier = out[entry["dataset_id"]]
            earlier["dp"] = compose(earlier["dp"], run_spend)
        else:
            out[entry["dataset_id"]] = {**entry, "dp": dict(run_spend) if run_spend else None}
    return list(out.values())
