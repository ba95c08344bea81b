"""Withdrawal of a contribution — the origin revokes the model versions the trainer withdrew.

Runs when a revocation notice from the supplier arrives. The notice must be signed by the supplier
and addressed here; each model it names (registered name and training run key) that this site
received from the supplier is marked revoked here: in the site's revocation list, which
`factory serve` checks on every request (a served version stops answering, 410), and on its
registry tag. Revoked versions no longer resolve as a stage model and every gate refuses them.
"""

from airflow.sdk import dag
from factory_plugin.flows import DEFAULT_ARGS, site_enabled, tags
from factory_plugin.revocation_flows import TAG, notice_asset, revocation_notice_flow

SITE = "origin"


@dag(dag_id="contribution_revocation_notice_origin", doc_md=__doc__, schedule=[notice_asset(SITE)], catchup=False,
     tags=[*tags(2, SITE), TAG], default_args=DEFAULT_ARGS)
def contribution_revocation_notice_origin():
    revocation_notice_flow(site=SITE)


if site_enabled(SITE):
    contribution_revocation_notice_origin()
