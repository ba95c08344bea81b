"""Watermarks (placeholder until implemented)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.context import StepContext


def verify_release(ctx: StepContext, model_dir: Path, *, recipient: str, purpose: str) -> dict[str, Any]:
    return {"verified": False, "reason": "watermarks are not implemented yet"}
