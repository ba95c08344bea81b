"""Robustness at release (placeholder until implemented)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.context import StepContext


def release_robustness(ctx: StepContext, model_dir: Path, *, recipient: str, purpose: str) -> dict[str, Any]:
    return {"evaluated": False, "reason": "robustness evaluation is not implemented yet"}
