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

from airflow.sdk import dag
from factory_plugin.flows import (
    DEFAULT_ARGS,
    drift_monitor_flow,
    drift_monitor_params,
    drift_monitor_schedule,
    site_enabled,
    tags,
)

SITE = "origin"


@dag(dag_id="drift_monitor_origin", doc_md=__doc__, schedule=drift_monitor_schedule(), catchup=False,
     tags=[*tags(4, SITE), "drift"], default_args=DEFAULT_ARGS, params=drift_monitor_params())
def drift_monitor_origin():
    drift_monitor_flow(site=SITE)


if site_enabled(SITE):
    drift_monitor_origin()
