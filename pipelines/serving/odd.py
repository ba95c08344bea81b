"""The operational design domain (ODD) check of each inference request.

The rules are Rego (`policies/odd/odd.rego`, package `factory.odd`), the site's declared ODD is
policy data (`odd_sites` in `policies/factory/data.json`). The service builds the gate input from
the request context, the batch's statistics and the measured inference latency, and answers in the
mode the decision names: "normal", "flag" (prediction returned, flagged) or "withhold" (no prediction).

Each served model has an input envelope (`input_envelope`): the range every feature of a request
must lie in (outside it the request is refused). conf/odd.yaml `service.input_envelopes` gives it per
model family; a family without an entry gets the per-feature range of the model's training data
(metadata.json `input_envelope`), widened by `service.derived_envelope_margin`. The statistics the
ODD bounds (`batch_stats`) are taken on the inputs scaled to that envelope, so one site envelope
reads alike for every family (for the digits, envelope [0, 1], they are the raw pixel statistics).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.config import read_yaml

GATE = "odd"
MODES = ("normal", "flag", "withhold")


@functools.lru_cache(maxsize=1)
def serving_conf() -> dict[str, Any]:
    """`conf/odd.yaml`: default models, service limits, store bounds, drift parameters."""
    return read_yaml("odd.yaml")


@dataclass(frozen=True)
class InputEnvelope:
    """Per-feature bounds [low, high] of a served model's inputs and where they come from."""

    low: np.ndarray  # float64, one per feature
    high: np.ndarray
    source: str

    def outside(self, x: np.ndarray) -> np.ndarray:
        return (x < self.low) | (x > self.high)

    def scaled(self, x: np.ndarray) -> np.ndarray:
        """`x` mapped so the envelope becomes [0, 1] (the identity for the envelope [0, 1])."""
        return ((x - self.low) / (self.high - self.low)).astype(np.float32)


def input_envelope(family: str, metadata: dict[str, Any], n_features: int,
                   service: dict[str, Any]) -> InputEnvelope:
    """The input envelope of a model of `family` with `metadata` (see the module docstring).

    Raises ValueError naming what is missing or malformed."""
    configured = (service.get("input_envelopes") or {}).get(family)
    if configured is not None:
        try:
            low, high = float(configured["min"]), float(configured["max"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"conf/odd.yaml service.input_envelopes.{family} must be {{min: number, max: number}}, "
                             f"not {configured!r}") from None
        if not np.isfinite([low, high]).all() or low >= high:
            raise ValueError(f"conf/odd.yaml service.input_envelopes.{family}: min {low} must be below max {high}")
        return InputEnvelope(np.full(n_features, low), np.full(n_features, high),
                             f"conf/odd.yaml service.input_envelopes.{family}")
    recorded = metadata.get("input_envelope")
    if not isinstance(recorded, dict):
        raise ValueError(f"no input envelope for family {family!r}: conf/odd.yaml service.input_envelopes has none "
                         "and the model's metadata records no training range (input_envelope)")
    try:
        low = np.asarray(recorded["min"], dtype=np.float64)
        high = np.asarray(recorded["max"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise ValueError("the model's metadata input_envelope is not {min: [numbers], max: [numbers]}") from None
    if low.shape != (n_features,) or high.shape != (n_features,):
        raise ValueError(f"the model's metadata input_envelope holds {low.size} and {high.size} bounds "
                         f"for {n_features} features")
    if not (np.isfinite(low).all() and np.isfinite(high).all()) or (low > high).any():
        raise ValueError("the model's metadata input_envelope has non-finite bounds or a min above its max")
    margin = float(service.get("derived_envelope_margin", 0.1))
    if not margin > 0:
        raise ValueError(f"conf/odd.yaml service.derived_envelope_margin must be above 0, not {margin}")
    span = high - low
    pad = margin * np.where(span > 0, span, np.maximum(np.abs(low), 1.0))
    return InputEnvelope(low - pad, high + pad, "training data range (model metadata input_envelope)")


@dataclass(frozen=True)
class OddDecision:
    allow: bool
    reasons: list[str]
    mode: str
    input: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"allow": self.allow, "mode": self.mode, "reasons": list(self.reasons)}


def batch_stats(x: np.ndarray) -> dict[str, Any]:
    """Per-sample mean and standard deviation over the batch, the statistics the envelope bounds
    (the service passes the inputs scaled to the model's input envelope)."""
    means, stds = x.mean(axis=1), x.std(axis=1)
    return {
        "batch_size": int(len(x)),
        "sample_mean": {"min": float(means.min()), "max": float(means.max())},
        "sample_std": {"min": float(stds.min()), "max": float(stds.max())},
    }


def gate_input(
    site: str, model: dict[str, Any], context: dict[str, Any], stats: dict[str, Any], latency_ms: float
) -> dict[str, Any]:
    return {"site": site, "model": model, "context": context, "stats": stats, "latency_ms": latency_ms}


class OddGate:
    """The ODD gate, evaluated on every request by the shared embedded engine (`pipelines.policy`,
    gate "odd"); any engine error denies in "withhold" mode (fail closed). Breaches are audited by
    the service as security events, not here, so a request costs one evaluation and no log write."""

    def __init__(self, site_paths=None) -> None:
        """With `site_paths`, every decision is checked against that site's pinned policy bundle."""
        from pipelines.policy import policy_data

        self.site_paths = site_paths
        self.site_odd = policy_data().get("odd_sites", {})
        probe = self._evaluate(gate_input(site_paths.site if site_paths else "origin", {}, {}, {}, 0.0))
        if probe.failed:  # a policy that does not load, or is not the pinned one: refuse to start
            raise RuntimeError("the ODD policy cannot decide: " + "; ".join(probe.reasons))

    def _evaluate(self, odd_input: dict[str, Any]):
        from pipelines.policy import evaluate

        paths = self.site_paths
        if paths is None:
            return evaluate(GATE, odd_input)
        return evaluate(GATE, odd_input, site=paths.site, home=paths.home, audit=False)

    def decide(self, odd_input: dict[str, Any]) -> OddDecision:
        decision = self._evaluate(odd_input)
        mode = decision.extra.get("mode", "withhold")
        if decision.failed or mode not in MODES or (decision.allow and mode != "normal"):
            return OddDecision(False, list(decision.reasons) or [f"malformed ODD decision (mode {mode!r})"],
                               "withhold", odd_input)
        return OddDecision(decision.allow, list(decision.reasons), mode, odd_input)

    def approved_sensors(self, site: str) -> list[str]:
        return list(self.site_odd.get(site, {}).get("approved_sensors", []))
