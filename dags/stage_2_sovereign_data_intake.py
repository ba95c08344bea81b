"""Stage 2 — sovereign data integration, the supplier's intake part.

Opens the origin's sealed, sanitized dataset, registers it in the supplier's
catalog with the origin's flags (owner, releasability) and validates it for training.
"""

from airflow.sdk import dag
from factory_plugin.flows import DEFAULT_ARGS, data_intake_flow, inbox_asset, site_enabled, tags

SITE = "supplier"


@dag(dag_id="stage_2_sovereign_data_intake", doc_md=__doc__, schedule=[inbox_asset(SITE, "origin-shared")],
     catchup=False, tags=tags(2, SITE), default_args=DEFAULT_ARGS)
def stage_2_sovereign_data_intake():
    data_intake_flow(site=SITE, kind="origin-shared", name="origin-shared")


if site_enabled(SITE):
    stage_2_sovereign_data_intake()
