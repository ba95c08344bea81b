"""Drift monitor at the origin — watches the model the origin serves.

Checks the origin's recent inference inputs (its bounded input store) against the serving
model's reference data with a KS and an MMD drift detector, logs the check to the site's
MLflow (experiment `drift-origin`) and audit log, and when drift is found emits an event on
the asset `factory://origin/drift` with the drift evidence as its extra. That event schedules
the origin's local-only retraining (stage 4), which still passes every gate.

Runs on the schedule `schedules.drift_monitor` of conf/stages.yaml, and on demand
(params: `model` — M1..M8, NAME@ALIAS or NAME/VERSION, empty for the site's default;
`window` — number of recent inputs, 0 for conf/odd.yaml's default).
"""

from airflow.sdk import Param, dag, task
from factory_plugin.flows import DEFAULT_ARGS, drift_asset, site_enabled, tags
from factory_plugin.steps import step_task

from pipelines.config import read_yaml

SITE = "origin"
DRIFT = drift_asset(SITE)


@task(outlets=[DRIFT])
def emit_drift_event(result: dict):
    from pipelines.steps.monitoring import drift_asset_events

    yield from drift_asset_events(result, DRIFT)


@dag(dag_id="drift_monitor_origin", doc_md=__doc__, schedule=read_yaml("stages.yaml")["schedules"]["drift_monitor"],
     catchup=False, tags=[*tags(4, SITE), "drift"], default_args=DEFAULT_ARGS,
     params={"model": Param("", type="string"), "window": Param(0, type="integer", minimum=0)})
def drift_monitor_origin():
    result = step_task("check_drift", site=SITE, model="{{ params.model }}", window="{{ params.window }}")
    emit_drift_event(result)


if site_enabled(SITE):
    drift_monitor_origin()
