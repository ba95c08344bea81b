"""Stage 6 — destination collaboration, the destination's release part.

The destination sanitizes and validates its shared data, its compliance officer
approves, and the `data_release` gate lets it be sealed for the supplier.
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

SITE = "destination"


@dag(dag_id="stage_6_destination_data_release", doc_md=__doc__, schedule=[model_asset(SITE, "M5")],
     catchup=False, tags=tags(6, SITE), default_args=DEFAULT_ARGS,
     is_paused_upon_creation=release_paused(6))  # paused while a federated stage keeps the data home
def stage_6_destination_data_release():
    data_release_flow(site=SITE, stage=6, recipient="supplier", purpose="collaboration",
                      kind="destination-shared")


if site_enabled(SITE):
    stage_6_destination_data_release()
