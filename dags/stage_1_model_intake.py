"""Stage 1 — the origin receives **M1**, the supplier's base model, as its initial system.

Opens the sealed package from its inbox (signature, recipient, replay and expiry
checked), verifies the model signature, registers M1 in the origin's MLflow and
evaluates it on the origin's own test data, which never leaves the origin.
"""

from airflow.sdk import dag
from factory_plugin.flows import DEFAULT_ARGS, inbox_asset, model_intake_flow, site_enabled, tags

SITE = "origin"


@dag(dag_id="stage_1_model_intake", doc_md=__doc__, schedule=[inbox_asset(SITE, "m1")], catchup=False,
     tags=tags(1, SITE), default_args=DEFAULT_ARGS)
def stage_1_model_intake():
    model_intake_flow(site=SITE, kind="m1", stage="M1")


if site_enabled(SITE):
    stage_1_model_intake()
