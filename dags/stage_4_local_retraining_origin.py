"""Stage 4 — local-only retraining at the origin.

Fine-tunes M3 on all the origin's own data (sanitized shared, private, export-authorized) into the
domestic model **M4**. M4 and the private data never leave the origin: M4's
lineage holds a local-only source, so the `model_release` gate denies any release.
Runs when M3 arrives or when drift is detected at the origin.
"""

from airflow.sdk import AssetAny, dag
from factory_plugin.flows import DEFAULT_ARGS, drift_asset, model_asset, site_enabled, tags, training_flow

SITE = "origin"


@dag(dag_id="stage_4_local_retraining_origin", doc_md=__doc__,
     schedule=AssetAny(model_asset(SITE, "M3"), drift_asset(SITE)), catchup=False, tags=tags(4, SITE),
     default_args=DEFAULT_ARGS)
def stage_4_local_retraining_origin():
    training_flow(site=SITE, stage="M4", profile="local", base_model="M3")


if site_enabled(SITE):
    stage_4_local_retraining_origin()
