"""Stage 3, federated — the origin takes part in the supplier's rounds of federated training of **M3**.

Active when conf/stages.yaml sets `collaboration: {3: federated}` (paused otherwise). Runs when a
global model package arrives: verifies it against the M1 the origin holds, trains each of the
origin's units on its own share of its data (which never leaves), evaluates the global model on the
origin's test data (per-round metrics in the origin's MLflow) and seals the units' updates (model
weights' differences and row counts only) back to the supplier through the `model_release` gate.
"""

from airflow.sdk import dag
from factory_plugin.federated_flows import federated, package_kinds, participant_flow
from factory_plugin.flows import DEFAULT_ARGS, inbox_asset, site_enabled, tags

SITE = "origin"
STAGE = 3


@dag(dag_id="stage_3_federated_participant", doc_md=__doc__, schedule=[inbox_asset(SITE, package_kinds(STAGE)[0])],
     catchup=False, tags=[*tags(STAGE, SITE), "federated"], default_args=DEFAULT_ARGS,
     is_paused_upon_creation=not federated(STAGE), max_active_runs=1)
def stage_3_federated_participant():
    participant_flow(site=SITE, stage=STAGE)


if site_enabled(SITE):
    stage_3_federated_participant()
