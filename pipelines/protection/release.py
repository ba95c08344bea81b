"""The protection checks of a model release: what the model_release gate reads beside the signature."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.context import StepContext


def release_checks(ctx: StepContext, model_dir: Path, *, recipient: str, purpose: str) -> dict[str, Any]:
    """{"watermark": {...}, "robustness": {...}} for the exact model directory that is sealed."""
    from pipelines.protection.robustness import release_robustness
    from pipelines.protection.watermark import verify_release

    return {"watermark": verify_release(ctx, model_dir, recipient=recipient, purpose=purpose),
            "robustness": release_robustness(ctx, model_dir, recipient=recipient, purpose=purpose)}
