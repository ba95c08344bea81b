"""Stage 8 — reciprocal contribution at the supplier.

Takes the destination's contribution and keeps a held-out part of it for evaluation
at the supplier (M3 and M8 are both evaluated on it). Fine-tunes M3 on the supplier's
data, all the origin data the supplier holds (shared and export-authorized) and the
rest of the contribution into **M8**, and delivers M8 to the origin through the
`model_release` gate, sealed.
"""

from airflow.sdk import dag
from factory_plugin.flows import (
    DEFAULT_ARGS,
    dataset_intake,
    inbox_asset,
    model_inputs,
    site_enabled,
    tags,
    training_flow,
)
from factory_plugin.steps import step_task

SITE = "supplier"


@dag(dag_id="stage_8_reciprocal_contribution", doc_md=__doc__,
     schedule=[inbox_asset(SITE, "destination-contribution")], catchup=False, tags=tags(8, SITE),
     default_args=DEFAULT_ARGS)
def stage_8_reciprocal_contribution():
    validated = dataset_intake(site=SITE, kind="destination-contribution", name="destination-contribution")
    split = step_task("split_holdout", site=SITE, dataset=validated)
    step_task("evaluate_registered", task_id="evaluate_m3_on_holdout", site=SITE, model="M3",
              test_sets=dict(model_inputs("M8").base_test_sets)) << split
    registered = training_flow(site=SITE, stage="M8", profile="collaborative", base_model="M3", after=[split])
    step_task("release_model", site=SITE, model=registered, recipient="origin", purpose="collaboration",
              kind="m8")


if site_enabled(SITE):
    stage_8_reciprocal_contribution()
