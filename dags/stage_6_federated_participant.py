"""Stage 6, federated — the destination takes part in the supplier's rounds of federated training of **M6**.

Active when conf/stages.yaml sets `collaboration: {6: federated}` (paused otherwise). Runs when a
global model package arrives: verifies it against the M5 the destination holds, trains each of the
destination's units on its own share of its data (which never leaves), evaluates the global model on the
destination's test data (per-round metrics in its MLflow) and seals the units' updates (model
weights' differences and row counts only) back to the supplier through the `model_release` gate.
"""

from airflow.sdk import dag
from factory_plugin.federated_flows import federated, package_kinds, participant_flow
from factory_plugin.flows import DEFAULT_ARGS, inbox_asset, site_enabled, tags

SITE = "destination"
STAGE = 6


@dag(dag_id="stage_6_federated_participant", doc_md=__doc__, schedule=[inbox_asset(SITE, package_kinds(STAGE)[0])],
     catchup=False, tags=[*tags(STAGE, SITE), "federated"], default_args=DEFAULT_ARGS,
     is_paused_upon_creation=not federated(STAGE), max_active_runs=1)
def stage_6_federated_participant():
    participant_flow(site=SITE, stage=STAGE)


if site_enabled(SITE):
    stage_6_federated_participant()
