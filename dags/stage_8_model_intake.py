"""Stage 8 — the origin receives the improved domestic model **M8** and evaluates it on its own test data."""

from airflow.sdk import dag
from factory_plugin.flows import DEFAULT_ARGS, inbox_asset, model_intake_flow, site_enabled, tags

SITE = "origin"


@dag(dag_id="stage_8_model_intake", doc_md=__doc__, schedule=[inbox_asset(SITE, "m8")], catchup=False,
     tags=tags(8, SITE), default_args=DEFAULT_ARGS)
def stage_8_model_intake():
    model_intake_flow(site=SITE, kind="m8", stage="M8")


if site_enabled(SITE):
    stage_8_model_intake()
