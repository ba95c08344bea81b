"""Stage 5 — the destination receives its export model **M5** and evaluates it on its own test data."""

from airflow.sdk import dag
from factory_plugin.flows import DEFAULT_ARGS, inbox_asset, model_intake_flow, site_enabled, tags

SITE = "destination"


@dag(dag_id="stage_5_export_model_intake", doc_md=__doc__, schedule=[inbox_asset(SITE, "m5")], catchup=False,
     tags=tags(5, SITE), default_args=DEFAULT_ARGS)
def stage_5_export_model_intake():
    model_intake_flow(site=SITE, kind="m5", stage="M5")


if site_enabled(SITE):
    stage_5_export_model_intake()
