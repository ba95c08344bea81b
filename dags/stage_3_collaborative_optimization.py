"""Stage 3 — collaborative optimization at the supplier.

Opens the origin's sealed, sanitized dataset from the inbox, registers it in the supplier's
catalog with the origin's flags (owner, releasability) and validates it for training. Then
fine-tunes M1 on the supplier's data plus the origin's shared data (transfer learning) into the
collaborative model **M3**, and releases M3 to the origin through the `model_release` gate,
signed and sealed. Runs when the origin's data arrives, or on the platform team's retraining
cron (conf/stages.yaml `schedules`): a cron run with no new package trains on the origin data
received last.
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


@dag(dag_id="stage_3_collaborative_optimization", doc_md=__doc__,
     schedule=retraining_schedule("stage_3_collaborative_optimization", inbox_asset(SITE, "origin-shared")),
     catchup=False, tags=tags(3, SITE), default_args=DEFAULT_ARGS)
def stage_3_collaborative_optimization():
    validated = dataset_intake(site=SITE, kind="origin-shared", name="origin-shared")
    registered = training_flow(site=SITE, stage="M3", profile="collaborative", base_model="M1", after=[validated])
    step_task("release_model", site=SITE, model=registered, recipient="origin", purpose="collaboration",
              kind="m3")


if site_enabled(SITE):
    stage_3_collaborative_optimization()
