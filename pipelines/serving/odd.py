"""The operational design domain (ODD) check of each inference request.

The rules are Rego (`policies/odd/odd.rego`, package `factory.odd`), the site's declared ODD is
policy data (`odd_sites` in `policies/factory/data.json`). The service builds the gate input from
the request context, the batch's statistics and the measured inference latency, and answers in the
mode the decision names: "normal", "flag" (prediction returned, flagged) or "withhold" (no prediction).
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
class OddDecision:
    allow: bool
    reasons: list[str]
    mode: str
    input: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"allow": self.allow, "mode": self.mode, "reasons": list(self.reasons)}


def batch_stats(x: np.ndarray) -> dict[str, Any]:
    """Per-sample mean and standard deviation over the batch, the statistics the envelope bounds."""
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
