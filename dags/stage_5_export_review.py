"""Stage 5 — the origin reviews an export request for **M5**, where its test data lives.

The supplier sends M5 here for review (only to a data owner in the model's
lineage). This site checks that the model is the one the request names (its
digest, computed here), registers it and evaluates it on its own test data,
which never leaves this site, beside its own M3 and M4. The origin's compliance
officer then approves or rejects; the answer is verified here and sent to the
supplier as an approval document signed by this site's key.
"""

from airflow.sdk import dag
from factory_plugin.flows import (
    DEFAULT_ARGS,
    approval_step,
    inbox_asset,
    model_asset,
    received_test_sets,
    site_enabled,
    tags,
)
from factory_plugin.steps import step_task

SITE = "origin"

BODY = (
    "{% set r = ti.xcom_pull(task_ids='receive_review') %}"
    "**{{ r['from'] }}** asks to export **M5** variant `{{ r['variant'] }}` to **{{ r['destination'] }}** "
    "(export request `{{ r['request_id'] }}`).\n\n"
    "- Model: `{{ r['model'] }}` at {{ r['from'] }}, digest `{{ r['digest'] }}` (checked here); "
    "registered here as `{{ r['here'] }}`\n"
    "- Stricter thresholds of this variant: `{{ r['thresholds'] | tojson }}`\n"
    "- End use: `{{ r.get('end_use') or 'none given' }}` (the `model_release` export gate checks it against "
    "the destination's export licence)\n\n"
    "Accuracy on this site's test data, evaluated here (the test data does not leave this site), beside "
    "this site's own models:\n\n{{ r['evidence'] }}\n\n"
    "Membership-inference audit by this site (members: the rows this site released that M5 was trained "
    "on; non-members: this site's test set; only the figures leave this site, signed into your answer): "
    "{{ r.get('membership_summary') or 'not run' }}\n\n"
    "Your answer is signed by this site and sent to the supplier. The supplier releases M5 only on your "
    "approval and its export-control officer's, through the `model_release` export gate (every lineage "
    "source export-authorized and releasable to the destination, a valid export licence, the export "
    "thresholds, a verified model signature, neither approval by the requester). A rejection ends the request."
)


@dag(dag_id="stage_5_export_review", doc_md=__doc__, schedule=[inbox_asset(SITE, "m5-review")], catchup=False,
     tags=tags(5, SITE), default_args=DEFAULT_ARGS)
def stage_5_export_review():
    review = step_task("receive_review", site=SITE, kind="m5-review", test_sets=received_test_sets(SITE),
                       outlets=[model_asset(SITE, "M5")])
    answer = approval_step(group="review", gate_name="model_release", owner_site=SITE,
                           required_role="compliance_officer", subject="Approve export of M5 (origin review)?",
                           body=BODY, after=[review],
                           requested_by="{{ ti.xcom_pull(task_ids='receive_review')['requested_by'] }}")
    step_task("send_approval", site=SITE, review=review, approval=answer, recipient="supplier", kind="m5-approval")


if site_enabled(SITE):
    stage_5_export_review()
