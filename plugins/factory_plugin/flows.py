"""Reusable pieces of stage DAGs. DAG files call these; they only wire tasks together."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, task_group

from factory_plugin.steps import step_task

DEFAULT_ARGS = {"owner": "factory", "retries": 1, "retry_delay": timedelta(seconds=10)}


def site_enabled(site: str) -> bool:
    """FACTORY_SITE restricts which site's DAGs load (production: one site per Airflow)."""
    wanted = os.environ.get("FACTORY_SITE")
    return not wanted or wanted == site


def tags(stage: int, site: str) -> list[str]:
    return [f"stage:{stage}", f"site:{site}"]


def inbox_asset(site: str, kind: str) -> Asset:
    """A sealed package of `kind` arrived in the site's inbox."""
    return Asset(f"factory://{site}/inbox/{kind}", group="inbox")


def model_asset(site: str, stage: str) -> Asset:
    """A model version for `stage` was registered (trained or received) at the site."""
    return Asset(f"factory://{site}/models/{stage.lower()}", group="models")


def dataset_asset(site: str, name: str) -> Asset:
    """A received dataset was registered and validated at the site."""
    return Asset(f"factory://{site}/datasets/{name}", group="datasets")


def drift_asset(site: str) -> Asset:
    """Drift was detected at the site; the event's extra holds the evidence."""
    return Asset(f"factory://{site}/drift", group="drift")


def retraining_schedule(dag_id: str, asset: Asset):
    """The asset trigger, or the asset or the platform team's cron when conf/stages.yaml sets one."""
    from airflow.sdk import AssetOrTimeSchedule
    from airflow.timetables.trigger import CronTriggerTimetable

    from pipelines.config import load_config

    cron = load_config().stages.schedules.get(dag_id)
    if not cron:
        return [asset]
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=[asset])


@task_group
def training_flow(*, site: str, stage: str, profile: str, datasets: list[str], test_sets: dict[str, str],
                  parity_set: str, base_model: str | None = None, base_variant: str | None = None,
                  variant: Any = None, subset: Any = None, subset_datasets: list[str] | None = None,
                  min_accuracy: dict[str, float] | None = None, after: list | None = None,
                  outlets: list | None = None):
    """train → evaluate → export to ONNX (parity) → register, at one site, after the tasks in `after`."""
    trained = step_task("train_model", site=site, resources="train", stage=stage, profile=profile,
                        datasets=datasets, base_model=base_model, base_variant=base_variant, variant=variant,
                        subset=subset, subset_datasets=subset_datasets)
    for upstream in after or []:
        upstream >> trained
    evaluated = step_task("evaluate_model", site=site, trained=trained, test_sets=test_sets,
                          min_accuracy=min_accuracy or {})
    exported = step_task("export_model", site=site, trained=evaluated, parity_set=parity_set)
    return step_task("register_model", site=site, trained=exported, outlets=outlets or [model_asset(site, stage)])


def approval_step(*, group: str, gate_name: str, owner_site: str, required_role: str, subject: str, body: str,
                  after: list | None = None):
    """An approval gate (HITL); returns its sealed answer for the release step to check.

    The release step never trusts the gate task's state or another task's word: it checks the
    answer's seal, run and responder against the `approval` policy itself (a force-marked gate
    has no answer; an XCom written through the API has no valid seal).
    """
    from factory_plugin.approvals import approval_gate

    gate = approval_gate(task_id=f"{group}_approval", gate_name=gate_name, owner_site=owner_site,
                         required_role=required_role, subject=subject, body=body,
                         requested_by="{{ dag_run.triggering_user_name or '' }}")
    for upstream in after or []:
        upstream >> gate
    return gate.output


def data_release_flow(*, site: str, dataset: str, recipient: str, purpose: str, kind: str):
    """sanitize → validate (release suite) → officer approval → data_release gate → seal to recipient."""
    sanitized = step_task("sanitize_dataset", site=site, dataset=dataset, purpose=purpose)
    validated = step_task("validate_dataset", task_id="validate_release", site=site, dataset=sanitized,
                          suite="release")
    body = (
        f"**{site}** asks to release its `{dataset}` data (sanitized) to **{recipient}** for *{purpose}*.\n\n"
        "- Sanitized dataset: `{{ ti.xcom_pull(task_ids='sanitize_dataset')['dataset_id'] }}`, "
        "derived from `{{ ti.xcom_pull(task_ids='sanitize_dataset')['source_id'] }}`\n"
        "- Sanitization passed: `{{ ti.xcom_pull(task_ids='sanitize_dataset')['passed'] }}`; "
        "sensitive columns left: `{{ ti.xcom_pull(task_ids='sanitize_dataset')['remaining_sensitive_columns'] }}`\n"
        "- Sanitization report: `{{ ti.xcom_pull(task_ids='sanitize_dataset')['report'] }}`\n"
        "- Validation (release suite): `{{ ti.xcom_pull(task_ids='validate_release')['success'] }}`\n\n"
        "The `data_release` policy then needs: sanitization passed with no sensitive column left, validation "
        f"success, a dataset that is not local-only and is releasable to {recipient}, and your approval "
        "(a compliance officer of the owner site who is not the requester)."
    )
    approved = approval_step(group="release", gate_name="data_release", owner_site=site,
                             required_role="compliance_officer", subject=f"Release {dataset} data to {recipient}?",
                             body=body, after=[validated])
    return step_task("release_dataset", site=site, dataset=sanitized, recipient=recipient, purpose=purpose,
                     kind=kind, approvals=approved, validation=validated, outlets=[inbox_asset(recipient, kind)])


def data_intake_flow(*, site: str, kind: str, name: str):
    """open the package → register the dataset → validate it for training."""
    received = step_task("receive_dataset", site=site, kind=kind, name=name)
    return step_task("validate_dataset", site=site, dataset=received, suite="training",
                     outlets=[dataset_asset(site, name)])


def model_intake_flow(*, site: str, kind: str, stage: str, test_sets: dict[str, str]):
    """open the model package → verify its signature → register and evaluate it on local test data."""
    return step_task("receive_model", site=site, kind=kind, test_sets=test_sets,
                     outlets=[model_asset(site, stage)])


def export_threshold_schema() -> dict:
    """JSON-schema properties for a run's stricter thresholds: each at least the policy's threshold."""
    from pipelines.policy import release_thresholds

    return {metric: {"type": "number", "minimum": floor, "maximum": 1.0}
            for metric, floor in release_thresholds("export").items() if isinstance(floor, (int, float))}
