"""Stage 7 — local-only retraining at the destination.

Fine-tunes M6 on the destination's sanitized shared data and private data into
**M7**, which never leaves the destination (the `model_release` gate denies it
because of the local-only lineage). Runs when M6 arrives or on detected drift.
"""

from airflow.sdk import AssetAny, dag
from factory_plugin.flows import DEFAULT_ARGS, drift_asset, model_asset, site_enabled, tags, training_flow

SITE = "destination"


@dag(dag_id="stage_7_local_retraining_destination", doc_md=__doc__,
     schedule=AssetAny(model_asset(SITE, "M6"), drift_asset(SITE)), catchup=False, tags=tags(7, SITE),
     default_args=DEFAULT_ARGS)
def stage_7_local_retraining_destination():
    training_flow(site=SITE, stage="M7", profile="local", base_model="M6")


if site_enabled(SITE):
    stage_7_local_retraining_destination()
