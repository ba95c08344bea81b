"""The step registry. A step is one function `fn(ctx, **params) -> dict`.

The same function runs in-process (embedded runtime), from `factory step NAME`
(the container entry point of a KubernetesPodOperator pod), or from a test.
`params` and the returned dict are small JSON values (digests, run ids, model
versions, package ids), which is what travels through XCom.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pipelines.context import StepContext, StepError

__all__ = ["StepContext", "StepError", "get_step", "run_step", "step"]

StepFunction = Callable[..., dict[str, Any]]
STEPS: dict[str, StepFunction] = {}

# Modules that register steps; imported on first lookup.
STEP_MODULES = ("pipelines.steps.training", "pipelines.steps.exchange", "pipelines.steps.review",
                "pipelines.steps.monitoring", "pipelines.steps.protection", "pipelines.steps.revocation",
                "pipelines.steps.federated")


def step(name: str) -> Callable[[StepFunction], StepFunction]:
    def register(fn: StepFunction) -> StepFunction:
        if name in STEPS and STEPS[name] is not fn:
            raise ValueError(f"step {name!r} is registered twice")
        STEPS[name] = fn
        fn.step_name = name  # type: ignore[attr-defined]
        return fn

    return register


def get_step(name: str) -> StepFunction:
    for module in STEP_MODULES:
        importlib.import_module(module)
    try:
        return STEPS[name]
    except KeyError:
        raise StepError(f"unknown step {name!r}; known steps: {', '.join(sorted(STEPS))}") from None


def run_step(step_name: str, ctx: StepContext, /, **params: Any) -> dict[str, Any]:
    """Run a step; first remove what a killed step of this site left half-written (plaintext staging)."""
    from pipelines.trust.packages import clean_stale_staging

    function = get_step(step_name)
    clean_stale_staging(ctx.paths)
    return function(ctx, **params)
