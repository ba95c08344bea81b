"""Stage 8 — reciprocal contribution, the destination's release part.

The destination sanitizes and validates the subset it authorizes as a
contribution, its compliance officer approves, and the `data_release` gate lets
it be sealed for the supplier (it is releasable onward to the origin in models).
"""

from airflow.sdk import dag
from factory_plugin.flows import DEFAULT_ARGS, data_release_flow, model_asset, site_enabled, tags

SITE = "destination"


@dag(dag_id="stage_8_contribution_release", doc_md=__doc__, schedule=[model_asset(SITE, "M6")], catchup=False,
     tags=tags(8, SITE), default_args=DEFAULT_ARGS)
def stage_8_contribution_release():
    data_release_flow(site=SITE, stage=8, recipient="supplier", purpose="collaboration",
                      kind="destination-contribution")


if site_enabled(SITE):
    stage_8_contribution_release()
