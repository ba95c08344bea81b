"""Reusable pieces of stage DAGs. DAG files call these; they only wire tasks together."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, Param, task, task_group

from factory_plugin.data_docs import URL_PREFIX as DATA_DOCS_PREFIX
from factory_plugin.steps import step_task
from pipelines.config import load_config

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


def drift_asset(site: str) -> Asset:
    """Drift was detected at the site; the event's extra holds the evidence."""
    return Asset(f"factory://{site}/drift", group="drift")


def retraining_schedule(dag_id: str, asset: Asset):
    """The asset trigger, or the asset or the platform team's cron when conf/stages.yaml sets one.

    A cron run with no new package in the inbox trains on the dataset received last (see `dataset_intake`).
    """
    from airflow.sdk import AssetOrTimeSchedule
    from airflow.timetables.trigger import CronTriggerTimetable

    cron = load_config().stages.schedules.get(dag_id)
    if not cron:
        return [asset]
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=[asset])


def model_inputs(stage: str):
    """What the `stage` model trains and is checked on (conf/stages.yaml `inputs.models`)."""
    return load_config().stages.inputs.model(stage)


def received_test_sets(site: str) -> dict[str, str]:
    """The test sets `site` evaluates the models it receives on (conf/stages.yaml `inputs.received`)."""
    return load_config().stages.inputs.received_test_sets(site)


@task_group
def training_flow(*, site: str, stage: str, profile: str, base_model: str | None = None,
                  base_variant: str | None = None, variant: Any = None, subset: Any = None,
                  restrictions: Any = None, recipient: Any = None, min_accuracy: dict[str, float] | None = None,
                  after: list | None = None, outlets: list | None = None):
    """train → evaluate → export to ONNX (parity) → register, at one site, after the tasks in `after`.

    The datasets, test sets and parity set are the stage model's `inputs` in conf/stages.yaml;
    `restrictions` (an export variant's capability restrictions) go into the model's metadata;
    `recipient` (stage 5's destination) gets its own watermark in the model."""
    inputs = model_inputs(stage)
    subset_datasets = list(inputs.subset_datasets) if inputs.subset_datasets is not None else None
    trained = step_task("train_model", site=site, resources="train", stage=stage, profile=profile,
                        datasets=list(inputs.datasets), base_model=base_model, base_variant=base_variant,
                        variant=variant, subset=subset, subset_datasets=subset_datasets,
                        **({"restrictions": restrictions} if restrictions is not None else {}),
                        **({"recipient": recipient} if recipient is not None else {}))
    for upstream in after or []:
        upstream >> trained
    evaluated = step_task("evaluate_model", site=site, trained=trained, test_sets=dict(inputs.test_sets),
                          min_accuracy=min_accuracy or {})
    exported = step_task("export_model", site=site, trained=evaluated, parity_set=inputs.parity_set)
    return step_task("register_model", site=site, trained=exported, outlets=outlets or [model_asset(site, stage)])


def approval_step(*, group: str, gate_name: str, owner_site: str, required_role: str, subject: str, body: str,
                  after: list | None = None, requested_by: str = "{{ dag_run.triggering_user_name or '' }}"):
    """An approval gate (HITL); returns its signed answer for the release step to check.

    The release step never trusts the gate task's state or another task's word: it checks the
    answer's signature, run and responder against the `approval` policy itself (a force-marked gate
    has no answer; an XCom written through the API has no valid signature). `requested_by` (shown
    to the officer) defaults to the user who triggered the run.
    """
    from factory_plugin.approvals import approval_gate

    gate = approval_gate(task_id=f"{group}_approval", gate_name=gate_name, owner_site=owner_site,
                         required_role=required_role, subject=subject, body=body, requested_by=requested_by)
    for upstream in after or []:
        upstream >> gate
    return gate.output


def release_paused(stage: int) -> bool:
    """A data release DAG is paused when a federated stage keeps its data home (conf/stages.yaml)."""
    return load_config().stages.release_kept_home(stage) is not None


def data_release_flow(*, site: str, stage: int, recipient: str, purpose: str, kind: str):
    """sanitize → validate (release suite) → officer approval → data_release gate → seal to recipient.

    The dataset is the partition conf/stages.yaml `inputs.releases` names for `stage` at `site`."""
    dataset = load_config().stages.inputs.release(stage, site)
    sanitized = step_task("sanitize_dataset", site=site, dataset=dataset, purpose=purpose)
    validated = step_task("validate_dataset", task_id="validate_release", site=site, dataset=sanitized,
                          suite="release")
    body = (
        f"**{site}** asks to release its `{dataset}` data (sanitized) to **{recipient}** for *{purpose}*.\n\n"
        "- Sanitized dataset: `{{ ti.xcom_pull(task_ids='sanitize_dataset')['dataset_id'] }}`, "
        "derived from `{{ ti.xcom_pull(task_ids='sanitize_dataset')['source_id'] }}`\n\n"
        "{{ ti.xcom_pull(task_ids='sanitize_dataset').get('evidence_md', '') }}\n\n"
        "{{ ti.xcom_pull(task_ids='validate_release').get('evidence_md', '') }}\n\n"
        f"[Open the validation's Data Docs page]({DATA_DOCS_PREFIX}/{site}/validation?suite=release&dataset="
        "{{ ti.xcom_pull(task_ids='validate_release')['dataset_id'] | urlencode }}) "
        f"(served by {site}'s Airflow to its compliance officers)\n\n"
        "The `data_release` policy then needs: sanitization passed with no sensitive column left, validation "
        f"success, a dataset that is not local-only and is releasable to {recipient}, and your approval "
        "(a compliance officer of the owner site who is not the requester)."
    )
    approved = approval_step(group="release", gate_name="data_release", owner_site=site,
                             required_role="compliance_officer", subject=f"Release {dataset} data to {recipient}?",
                             body=body, after=[validated])
    return step_task("release_dataset", site=site, dataset=sanitized, recipient=recipient, purpose=purpose,
                     kind=kind, approvals=approved, validation=validated)


def dataset_intake(*, site: str, kind: str, name: str):
    """open the newest package of `kind` → register it as dataset `name` → validate it for training
    → screen it for poisoning with the current model, for the stages conf/protection.yaml
    `screening.stages` names (a poisoned version is quarantined and the run stops before training).

    The first tasks of a stage that trains on a partner's data. With no new package in the inbox
    (a cron-triggered run) the dataset received last is used again; with none ever received the
    run fails, naming the inbox.
    """
    from pipelines.protection.poisoning import screening_model_for

    received = step_task("receive_dataset", site=site, kind=kind, name=name)
    validated = step_task("validate_dataset", site=site, dataset=received, suite="training")
    model = screening_model_for(site, name)
    if model is None:
        return validated
    return step_task("screen_dataset", site=site, dataset=validated, model=model)


def model_intake_flow(*, site: str, kind: str, stage: str):
    """open the model package → verify its signature → register and evaluate it on local test data
    (the site's `inputs.received` test sets)."""
    return step_task("receive_model", site=site, kind=kind, test_sets=received_test_sets(site),
                     outlets=[model_asset(site, stage)])



def export_threshold_schema() -> dict:
    """JSON-schema properties for a run's stricter thresholds: each at least the policy's threshold."""
    from pipelines.policy import release_thresholds

    return {metric: {"type": "number", "minimum": floor, "maximum": 1.0}
            for metric, floor in release_thresholds("export").items() if isinstance(floor, (int, float))}


def drift_monitor_schedule():
    """`schedules.drift_monitor` of conf/stages.yaml."""
    return load_config().stages.schedules["drift_monitor"]


def drift_monitor_params() -> dict[str, Param]:
    """`model` (M1..M8, NAME@ALIAS or NAME/VERSION; empty: the site's default) and `window` (0: the default)."""
    return {"model": Param("", type="string"), "window": Param(0, type="integer", minimum=0)}


def drift_monitor_flow(*, site: str):
    """check_drift at `site` → an event on the site's drift asset when drift is found (the event's
    extra holds the evidence); the event schedules the site's local-only retraining."""
    drift = drift_asset(site)

    @task(outlets=[drift])
    def emit_drift_event(result: dict):
        from pipelines.steps.monitoring import drift_asset_events

        yield from drift_asset_events(result, drift)

    result = step_task("check_drift", site=site, model="{{ params.model }}", window="{{ params.window }}")
    return emit_drift_event(result)
