"""Withdrawal of a contribution — the supplier (the trainer) acts on a data owner's revocation request.

Runs when a revocation request arrives. The request must be signed by its sender and name datasets
the sender owns (one this site knows as another site's is denied and audited). The affected models
are the versions this site trained whose lineage holds the withdrawn data; with none, the run says so
and stops (no-op). Otherwise the supplier's compliance officer decides; on approval every affected
version is marked revoked at once (`factory serve` stops serving it), retrained without the data
(`retrain_without`: from the last checkpoint before the data where the training kept one) and its
new version recorded as its replacement; then each partner that received an old version gets a
signed notice and revokes it too (`contribution_revocation_notice_<site>`).
"""

from airflow.sdk import dag
from factory_plugin.flows import DEFAULT_ARGS, site_enabled, tags
from factory_plugin.revocation_flows import TAG, TRAINER, request_asset, revocation_flow

SITE = TRAINER


@dag(dag_id="contribution_revocation", doc_md=__doc__, schedule=[request_asset(SITE)], catchup=False,
     tags=[*tags(3, SITE), TAG], default_args=DEFAULT_ARGS)
def contribution_revocation():
    revocation_flow(site=SITE)


if site_enabled(SITE):
    contribution_revocation()
