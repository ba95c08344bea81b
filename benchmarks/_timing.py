"""Shared helpers for the orchestration benchmarks: fresh workspaces and per-kind step timing."""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
import time
from pathlib import Path

KIND_OF_STEP = {
    "train_model": "training", "export_model": "training", "register_model": "sealing, signing, attestation",
    "evaluate_model": "evaluation", "receive_model": "sealing, signing, attestation",
    "release_model": "sealing, signing, attestation", "release_dataset": "sealing, signing, attestation",
    "receive_dataset": "sealing, signing, attestation", "sanitize_dataset": "validation + sanitization",
    "validate_dataset": "validation + sanitization", "split_holdout": "validation + sanitization",
}


def warm_imports() -> None:
    """Import what the steps use before timing, so neither side pays the first import of torch,
    MLflow or Great Expectations."""
    import great_expectations  # noqa: F401
    import mlflow  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401

    from pipelines.steps import get_step

    get_step("train_model")


def fresh_home(prefix: str, scale: int | None = None) -> Path:
    """A new FACTORY_HOME with the three sites built (not timed); `scale` as `factory init --scale`."""
    from pipelines.init import init_workspace

    home = Path(tempfile.mkdtemp(prefix=prefix)) / "factory"
    if os.environ.get("FACTORY_DB", "").startswith("postgres"):
        home.parent.chmod(0o711)  # the postgres system user must reach the cluster under FACTORY_HOME
    init_workspace(home, scale=scale)
    return home


@contextlib.contextmanager
def step_timer():
    """Time every step and every policy evaluation by kind (in this process)."""
    import pipelines.policy as policy
    import pipelines.steps as steps

    totals: dict[str, float] = collections.defaultdict(float)
    run_step, evaluate = steps.run_step, policy.evaluate

    def timed_step(step_name, ctx, /, **params):
        start = time.perf_counter()
        try:
            return run_step(step_name, ctx, **params)
        finally:
            totals[KIND_OF_STEP.get(step_name, "other steps")] += time.perf_counter() - start

    def timed_evaluate(*args, **kwargs):
        start = time.perf_counter()
        try:
            return evaluate(*args, **kwargs)
        finally:
            totals["policy"] += time.perf_counter() - start

    steps.run_step, policy.evaluate = timed_step, timed_evaluate
    try:
        yield totals
    finally:
        steps.run_step, policy.evaluate = run_step, evaluate


def shares(totals: dict[str, float], wall: float) -> dict[str, float]:
    """Per-kind seconds with policy time taken out of the steps that called it; the rest is orchestration."""
    kinds = dict(totals)
    policy_time = kinds.get("policy", 0.0)
    for kind in ("sealing, signing, attestation", "training", "evaluation", "validation + sanitization"):
        if kind in kinds and policy_time:
            taken = min(kinds[kind], policy_time)  # gates run inside release and data-access checks
            kinds[kind] -= taken
            policy_time -= taken
            if policy_time <= 0:
                break
    kinds["orchestration"] = max(wall - sum(v for k, v in totals.items() if k != "policy"), 0.0)
    return kinds
