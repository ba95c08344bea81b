"""Stage 6, federated — the supplier coordinates rounds of federated training of **M6**.

Active when conf/stages.yaml sets `collaboration: {6: federated}` (paused otherwise). Trigger it
with `start: true` to begin: the global model (M5 in round 1) goes to each participant site as a
sealed package through the `model_release` gate, the supplier trains its own unit. Each update
package that arrives (or the poll cron, for a passed deadline) runs it again: it opens the round's
updates, leaves out a site past the deadline, aggregates by the configured rule, evaluates on the
supplier's test data and logs the round to MLflow (step = round); after the last round the result
is evaluated, exported, registered as M6 and released to the destination like centralized M6.
"""

from airflow.sdk import dag
from factory_plugin.federated_flows import (
    coordinator_flow,
    coordinator_params,
    coordinator_schedule,
    federated,
)
from factory_plugin.flows import DEFAULT_ARGS, site_enabled, tags

SITE = "supplier"
STAGE = 6


@dag(dag_id="stage_6_federated_coordinator", doc_md=__doc__, schedule=coordinator_schedule(STAGE), catchup=False,
     tags=[*tags(STAGE, SITE), "federated"], default_args=DEFAULT_ARGS, params=coordinator_params(),
     is_paused_upon_creation=not federated(STAGE), max_active_runs=1)
def stage_6_federated_coordinator():
    coordinator_flow(stage=STAGE, recipients=["destination"], kind="m6")


if site_enabled(SITE):
    stage_6_federated_coordinator()
