"""Stage 3 — the origin receives the collaborative model **M3** and evaluates it on its own test data."""

from airflow.sdk import dag
from factory_plugin.flows import DEFAULT_ARGS, inbox_asset, model_intake_flow, site_enabled, tags

SITE = "origin"


@dag(dag_id="stage_3_model_intake", doc_md=__doc__, schedule=[inbox_asset(SITE, "m3")], catchup=False,
     tags=tags(3, SITE), default_args=DEFAULT_ARGS)
def stage_3_model_intake():
    model_intake_flow(site=SITE, kind="m3", stage="M3")


if site_enabled(SITE):
    stage_3_model_intake()
