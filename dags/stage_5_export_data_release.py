"""Stage 5 — export model preparation, the origin's part: release the export-authorized subset.

The origin sanitizes and validates the subset of its data it authorizes for
export, its compliance officer approves, and the `data_release` gate lets it be
sealed for the supplier, which may use it only for export models.
"""

from airflow.sdk import dag
from factory_plugin.flows import DEFAULT_ARGS, data_release_flow, model_asset, site_enabled, tags

SITE = "origin"


@dag(dag_id="stage_5_export_data_release", doc_md=__doc__, schedule=[model_asset(SITE, "M3")], catchup=False,
     tags=tags(5, SITE), default_args=DEFAULT_ARGS)
def stage_5_export_data_release():
    data_release_flow(site=SITE, stage=5, recipient="supplier", purpose="export",
                      kind="origin-export")


if site_enabled(SITE):
    stage_5_export_data_release()
