"""Withdrawal of a contribution — the destination's request (`factory contribution revoke --owner destination --dataset ID`).

Checks that the destination owns the dataset (its catalog says so), then signs a revocation request for
it and every version derived from it here (the sanitized copy it released) and seals it for every
site its release records show received one of them. The trainer verifies the request, asks its
compliance officer, retrains the affected models without the data and revokes the old versions
(`contribution_revocation`). A dataset never released is a no-op; one owned by another site is refused.

Param: `dataset` — `site/name@md5`, `name@md5` or a name (its latest version).
"""

from airflow.sdk import dag
from factory_plugin.flows import DEFAULT_ARGS, site_enabled, tags
from factory_plugin.revocation_flows import TAG, request_params, revocation_request_flow

SITE = "destination"


@dag(dag_id="contribution_revocation_request_destination", doc_md=__doc__, schedule=None, catchup=False,
     tags=[*tags(6, SITE), TAG], default_args=DEFAULT_ARGS, params=request_params())
def contribution_revocation_request_destination():
    revocation_request_flow(site=SITE)


if site_enabled(SITE):
    contribution_revocation_request_destination()
