"""Monitoring steps: the drift check of the drift-monitor DAGs and the asset event it emits."""

from __future__ import annotations

from typing import Any

from pipelines.serving.drift import DriftError, check_drift, default_model, drift_event_extra
from pipelines.steps import StepContext, StepError, step


@step("check_drift")
def check_drift_step(ctx: StepContext, *, model: str | None = None, window: int | str | None = None) -> dict[str, Any]:
    """Drift check of the model the site serves (step of the drift-monitor DAGs); returns the evidence.

    `model` empty and `window` 0 (as rendered from the DAG's params) mean the defaults."""
    try:
        window = int(window or 0) or None
    except ValueError:
        raise StepError(f"window must be a whole number of inputs, got {window!r}") from None
    try:
        model_ref = default_model(ctx.paths, model or None)
        return check_drift(ctx.paths, model_ref, window=window)
    except DriftError as exc:
        raise StepError(str(exc)) from exc


def drift_asset_events(result: dict[str, Any], asset: Any):
    """Body of the drift-monitor DAG's emit task: yields the asset event's Metadata when there is
    drift and skips the task otherwise (a skipped task emits no asset event)."""
    from airflow.sdk import Metadata
    from airflow.sdk.exceptions import AirflowSkipException

    extra = drift_event_extra(result)
    if extra is None:
        raise AirflowSkipException(f"no drift at {result.get('site')} ({result.get('status', 'checked')})")
    yield Metadata(asset, extra)
