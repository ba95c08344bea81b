"""Stage 6 — destination collaboration at the supplier.

Fine-tunes the export model M5 on the data the supplier may use for the
destination (its own data, the origin's export-authorized subset and the
destination's shared data) into **M6**, released to the destination through the
`model_release` gate, sealed. Runs when the destination's data arrives or on cron.
"""

from airflow.sdk import dag
from factory_plugin.flows import (
    DEFAULT_ARGS,
    dataset_intake,
    inbox_asset,
    retraining_schedule,
    site_enabled,
    tags,
    training_flow,
)
from factory_plugin.steps import step_task

SITE = "supplier"


@dag(dag_id="stage_6_destination_collaboration", doc_md=__doc__,
     schedule=retraining_schedule("stage_6_destination_collaboration", inbox_asset(SITE, "destination-shared")),
     catchup=False, tags=tags(6, SITE), default_args=DEFAULT_ARGS)
def stage_6_destination_collaboration():
    validated = dataset_intake(site=SITE, kind="destination-shared", name="destination-shared")
    registered = training_flow(site=SITE, stage="M6", profile="collaborative", base_model="M5", after=[validated])
    step_task("release_model", site=SITE, model=registered, recipient="destination", purpose="collaboration",
              kind="m6")


if site_enabled(SITE):
    stage_6_destination_collaboration()
