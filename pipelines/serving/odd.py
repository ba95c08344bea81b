"""The operational design domain (ODD) check of each inference request.

The rules are Rego (`policies/odd/odd.rego`, package `factory.odd`), the site's declared ODD is
policy data (`policies/data/odd.json`). The service builds the gate input from the request context,
the batch's statistics and the measured inference latency, and answers in the mode the decision
names: "normal", "flag" (prediction returned, flagged) or "withhold" (no prediction).
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import PROJECT_ROOT, read_yaml

GATE = "odd"
RULE = "data.factory.odd.decision"
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


def _policies_dir() -> Path:
    return PROJECT_ROOT / "policies"


class OddGate:
    """Evaluates the ODD gate with one embedded regorus engine kept loaded (it runs on every request).

    It loads the same files as `pipelines.policy` (`policies/odd/*.rego`, and every
    `policies/data/*.json` at `data.data`); any engine error denies in "withhold" mode (fail closed).
    """

    def __init__(self, policies_dir: Path | None = None) -> None:
        root = policies_dir or _policies_dir()
        data: dict[str, Any] = {}
        for path in sorted((root / "data").glob("*.json")):
            data.update(json.loads(path.read_text()))
        self._data = {"data": data}
        self._policies = [(str(p), p.read_text()) for p in sorted((root / GATE).glob("*.rego"))
                          if not p.name.endswith("_test.rego")]
        self._local = threading.local()  # a regorus Engine may only be used by the thread that made it
        self.site_odd = data.get("odd", {}).get("sites", {})
        self._engine()  # a policy that does not parse fails here, at start

    def _engine(self):
        engine = getattr(self._local, "engine", None)
        if engine is None:
            import regorus

            engine = regorus.Engine()
            engine.add_data(self._data)
            for name, text in self._policies:
                engine.add_policy(name, text)
            self._local.engine = engine
        return engine

    def decide(self, odd_input: dict[str, Any]) -> OddDecision:
        try:
            engine = self._engine()
            engine.set_input(odd_input)
            doc = engine.eval_rule(RULE)
            allow, reasons, mode = doc["allow"] is True, [str(r) for r in doc["reasons"]], doc["mode"]
            if mode not in MODES or (allow and mode != "normal"):
                raise ValueError(f"malformed ODD decision {doc!r}")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # fail closed: any engine error (a Rust panic included) is a breach
            return OddDecision(False, [f"ODD gate error: {exc}".splitlines()[0]], "withhold", odd_input)
        return OddDecision(allow, reasons, mode, odd_input)

    def approved_sensors(self, site: str) -> list[str]:
        return list(self.site_odd.get(site, {}).get("approved_sensors", []))
