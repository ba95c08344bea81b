"""The federated stage DAGs' pieces (issue 20): the coordinator's round and the participant's turn.

Every DAG run is one turn of a round: the coordinator's runs start a training (param `start`),
collect updates as they arrive (its inbox asset) or when its poll cron notices a passed deadline,
and, on the last round, hand the result to the same evaluate → export → register steps as
centralized training, then release the model to the participants like the centralized stage.
A participant's run opens the global model of a round and returns its units' updates.
"""

from __future__ import annotations

from airflow.sdk import Param, task

from factory_plugin.flows import inbox_asset, model_asset, model_inputs
from factory_plugin.steps import step_task
from pipelines.config import load_config


def federated(stage: int) -> bool:
    """Whether conf/stages.yaml has the stage collaborate federated (its federated DAGs unpaused)."""
    return load_config().stages.collaboration_of(stage) == "federated"


def package_kinds(stage: int) -> tuple[str, str]:
    """The inbox kinds of the stage's global models and updates (`m3-fl-global`, `m3-fl-update`)."""
    model = load_config().stages.stage(stage).model or ""
    return f"{model.lower()}-fl-global", f"{model.lower()}-fl-update"


def coordinator_schedule(stage: int):
    """An update's arrival, or the poll cron (`federated.<stage>.poll`) that notices a passed deadline."""
    from airflow.sdk import AssetOrTimeSchedule
    from airflow.timetables.trigger import CronTriggerTimetable

    conf = load_config().stages
    site = conf.stage(stage).site
    asset = inbox_asset(site, package_kinds(stage)[1])
    plan = conf.federated.get(stage)
    if plan is None or not plan.poll:
        return [asset]
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(plan.poll, timezone="UTC"), assets=[asset])


def coordinator_params() -> dict[str, Param]:
    """`start`: begin a new federated training (a run without it collects the running round)."""
    return {"start": Param(False, type="boolean")}


@task.short_circuit
def training_finished(result: dict) -> bool:
    """Go on to evaluate → export → register only after the last round."""
    return bool(result.get("finished"))


def coordinator_flow(*, stage: int, recipients: list[str], kind: str):
    """federated_coordinate → (last round) evaluate → export → register → release to each participant."""
    conf = load_config().stages
    entry = conf.stage(stage)
    inputs = model_inputs(entry.model)
    result = step_task("federated_coordinate", site=entry.site, resources="train", stage=stage,
                       start="{{ params.start }}")
    gate = training_finished(result)
    evaluated = step_task("evaluate_model", site=entry.site, trained=result, test_sets=dict(inputs.test_sets))
    gate >> evaluated
    exported = step_task("export_model", site=entry.site, trained=evaluated, parity_set=inputs.parity_set)
    registered = step_task("register_model", site=entry.site, trained=exported,
                           outlets=[model_asset(entry.site, entry.model)])
    for recipient in recipients:
        step_task("release_model", task_id=f"release_model_{recipient}", site=entry.site, model=registered,
                  recipient=recipient, purpose="collaboration", kind=kind)


def participant_flow(*, site: str, stage: int):
    """federated_participate: open the round's global model, train the units, seal their updates."""
    return step_task("federated_participate", site=site, resources="train", stage=stage)
