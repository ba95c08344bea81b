"""The DAG pieces of a contribution's withdrawal (`pipelines.steps.revocation`); DAG files call these."""

from __future__ import annotations

from airflow.sdk import Param, task

from factory_plugin.flows import approval_step, inbox_asset
from factory_plugin.steps import step_task

REQUEST_KIND = "contribution-revocation"  # pipelines.steps.revocation.REQUEST_KIND
NOTICE_KIND = "contribution-revocation-notice"  # pipelines.steps.revocation.NOTICE_KIND
TRAINER = "supplier"  # the one site that trains on its partners' data (design section 2)
TAG = "revocation"

GATE_BODY = (
    "{% set r = ti.xcom_pull(task_ids='receive_revocation') %}"
    "Revocation `{{ r['revocation_id'] }}`.\n\n{{ r['evidence_md'] }}\n\n"
    "Approve to retrain these models without the data and revoke the old versions here and at every "
    "partner that holds them. A rejection ends the request (audited); nothing is revoked."
)


def request_params() -> dict[str, Param]:
    """`dataset`: the owner's dataset to withdraw (`site/name@md5`, `name@md5` or the latest of `name`)."""
    return {"dataset": Param("", type="string", maxLength=200,  # empty: the step refuses it, naming the param
                             description="the dataset to withdraw: site/name@md5, name@md5 or name (its latest version)")}


def request_asset(site: str = TRAINER):
    return inbox_asset(site, REQUEST_KIND)


def notice_asset(site: str):
    return inbox_asset(site, NOTICE_KIND)


def revocation_request_flow(*, site: str):
    """The owner's part: check it owns the dataset, sign the request, seal it for every site it released it to."""
    return step_task("request_revocation", site=site, dataset="{{ params.dataset }}")


@task.short_circuit
def models_affected(revocation: dict) -> bool:
    """Stop here (nothing to approve) when no model of this site used the data: the request was a no-op."""
    return not revocation.get("noop")


def revocation_flow(*, site: str = TRAINER):
    """The trainer's part: verify the request → (no-op stops) → officer's approval → revoke and retrain →
    notices to the partners holding the old versions."""
    received = step_task("receive_revocation", site=site, kind=REQUEST_KIND)
    proceed = models_affected(received)
    answer = approval_step(group="revocation", gate_name="contribution_revocation", owner_site=site,
                           required_role="compliance_officer", subject="Withdraw a partner's contribution?",
                           body=GATE_BODY, after=[proceed],
                           requested_by="{{ ti.xcom_pull(task_ids='receive_revocation')['requested_by'] }}")
    applied = step_task("apply_revocation", site=site, revocation=received, approval=answer, resources="train")
    return step_task("send_revocation_notices", site=site, revocation=applied)


def revocation_notice_flow(*, site: str):
    """A holder's part: verify the trainer's notice and mark the versions it names revoked here."""
    return step_task("receive_revocation_notice", site=site, kind=NOTICE_KIND)
