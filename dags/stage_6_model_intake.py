"""Stage 6 — the destination receives **M6** and evaluates it on its own test data."""

from airflow.sdk import dag
from factory_plugin.flows import DEFAULT_ARGS, inbox_asset, model_intake_flow, site_enabled, tags

SITE = "destination"


@dag(dag_id="stage_6_model_intake", doc_md=__doc__, schedule=[inbox_asset(SITE, "m6")], catchup=False,
     tags=tags(6, SITE), default_args=DEFAULT_ARGS)
def stage_6_model_intake():
    model_intake_flow(site=SITE, kind="m6", stage="M6")


if site_enabled(SITE):
    stage_6_model_intake()
