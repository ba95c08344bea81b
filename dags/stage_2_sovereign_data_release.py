"""Stage 2 — sovereign data integration, the origin's release part.

The origin sanitizes its shared operational data (sensitive columns removed or
coarsened, critical outliers and contradictory duplicates removed), validates it
with the release suite, asks its compliance officer to approve, passes the
`data_release` gate and seals the dataset for the supplier.
"""

from airflow.sdk import dag
from factory_plugin.flows import (
    DEFAULT_ARGS,
    data_release_flow,
    model_asset,
    release_paused,
    site_enabled,
    tags,
)

SITE = "origin"


@dag(dag_id="stage_2_sovereign_data_release", doc_md=__doc__, schedule=[model_asset(SITE, "M1")],
     catchup=False, tags=tags(2, SITE), default_args=DEFAULT_ARGS,
     is_paused_upon_creation=release_paused(2))  # paused while a federated stage keeps the data home
def stage_2_sovereign_data_release():
    data_release_flow(site=SITE, stage=2, recipient="supplier", purpose="collaboration",
                      kind="origin-shared")


if site_enabled(SITE):
    stage_2_sovereign_data_release()
