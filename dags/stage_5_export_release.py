"""Stage 5 — the supplier releases an export request the origin approved.

The origin's signed decision arrives as an approval document. It must verify
against the origin's key in this site's trust store and name an export request
in review here and exactly the model digest recorded with it; anything else is
refused and kept aside. A rejection ends the request and releases nothing. On an
approval, the supplier's export-control officer decides; the `model_release`
export gate then checks lineage, licence, thresholds, the model signature and
both approvals before the request's model is sealed for its destination, with
the variant and thresholds recorded with the request. This DAG releases to
`destination`, the export destination the preparation DAG offers; a request for
another destination is refused.
"""

from airflow.sdk import dag
from factory_plugin.flows import DEFAULT_ARGS, approval_step, inbox_asset, site_enabled, tags
from factory_plugin.steps import step_task

SITE = "supplier"

BODY = (
    "{% set r = ti.xcom_pull(task_ids='receive_approval') %}"
    "Export request `{{ r['request_id'] }}`: **M5** variant `{{ r['variant'] }}` (`{{ r['model'] }}`, digest "
    "`{{ r['digest'] }}`) to **{{ r['destination'] }}**; stricter thresholds `{{ r['thresholds'] | tojson }}`; "
    "end use `{{ r.get('end_use') or 'none given' }}`.\n\n"
    "- **{{ r['from'] }}** approved it: decision of `{{ r['officer'] }}` ({{ r['comment'] or 'no comment' }}), "
    "signed by {{ r['from'] }} and verified here against this request and this model digest\n\n"
    "The model on this site's test data, beside the version it would replace and this site's own M1, and its "
    "checks:\n\n{{ r.get('evidence_md', '') }}\n\n"
    "On your approval the `model_release` export gate needs every lineage source export-authorized and "
    "releasable to the destination, a valid export licence covering the end use, metrics at or above the export thresholds of the "
    "policy data and of this request, a verified model signature, and both approvals (the origin's compliance "
    "officer and yours), neither by the requester."
)


@dag(dag_id="stage_5_export_release", doc_md=__doc__, schedule=[inbox_asset(SITE, "m5-approval")], catchup=False,
     tags=tags(5, SITE), default_args=DEFAULT_ARGS)
def stage_5_export_release():
    decided = step_task("receive_approval", site=SITE, kind="m5-approval")
    export_ok = approval_step(group="export_control", gate_name="model_release", owner_site=SITE,
                              required_role="export_control_officer",
                              subject="Approve export of M5 (export control)?", body=BODY, after=[decided],
                              requested_by="{{ ti.xcom_pull(task_ids='receive_approval')['requested_by'] }}")
    step_task("release_export", site=SITE, request=decided, approvals=[export_ok], recipient="destination",
              kind="m5")


if site_enabled(SITE):
    stage_5_export_release()
