"""Approval gates: a person answers in Airflow's Required Actions; releases accept only signed answers.

`approval_gate(...)` builds the human-in-the-loop task, assigned to the owner site's users with
the required role. When Airflow resumes it with the recorded answer, it signs that answer with
the owner site's signing key (`pipelines.approvals`). Release steps take the signed answers and
check each one themselves; `verified_approval(...)` is the same check for a task of its own.

Nothing here imports Airflow at module import time: Airflow's plugin manager loads this file.
"""

from __future__ import annotations

import functools

# --- who may answer -------------------------------------------------------------------------------

def _assigned_approvers(owner_site: str, required_role: str, requested_by: str | None):
    """From conf only, so parsing a DAG evaluates no policy; `verified_approval` enforces it at run time."""
    from pipelines.policy import assigned_approvers

    return assigned_approvers(owner_site, required_role, requested_by)


def _is_template(value: str | None) -> bool:
    return bool(value) and ("{{" in value or "{%" in value)


# --- the gate -------------------------------------------------------------------------------------

@functools.cache
def _operator_class():
    from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator

    class FactoryApprovalOperator(ApprovalOperator):
        """ApprovalOperator whose result is signed by the site and whose Reject does not skip.

        The step after the gate must run on Reject too, so that the rejection is audited and the
        run fails with the officer's reason instead of ending quietly with skipped tasks.
        """

        template_fields = (*ApprovalOperator.template_fields, "requested_by")

        def __init__(self, *, gate_name: str, owner_site: str, required_role: str, requested_by: str,
                     **kwargs):
            super().__init__(**kwargs)
            self.gate_name = gate_name
            self.owner_site = owner_site
            self.required_role = required_role
            self.requested_by = requested_by

        def execute_complete(self, context, event):
            # HITLOperator's part only: validate the recorded answer, no skipping on Reject.
            answer = HITLOperator.execute_complete(self, context=context, event=event)
            from pipelines import approvals
            from pipelines.workspace import SitePaths

            ti = context["ti"]
            user = answer.get("responded_by_user") or {}
            record = {
                "gate": self.gate_name,
                "owner_site": self.owner_site,
                "required_role": self.required_role,
                "dag_id": ti.dag_id,
                "run_id": ti.run_id,
                "task_id": ti.task_id,
                "chosen_options": list(answer.get("chosen_options") or []),
                "comment": str((answer.get("params_input") or {}).get("comment") or ""),
                "responded_by": user.get("id"),
                "responded_at": _iso(answer.get("responded_at")),
                "requested_by": self.requested_by,
                "timedout": bool(answer.get("timedout")),
            }
            record = approvals.sign_answer(SitePaths.of(self.owner_site), record)
            self.log.info("Answer %s by %s recorded for gate %s", record["chosen_options"],
                          record["responded_by"], self.gate_name)
            return record

    return FactoryApprovalOperator


def _iso(value) -> str | None:
    if value is None:
        return None
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def approval_gate(
    *,
    task_id: str,
    gate_name: str,
    owner_site: str,
    required_role: str,
    subject: str,
    body: str,
    requested_by: str,
    **kwargs,
):
    """A human-in-the-loop approval task assigned to the owner site's users with `required_role`.

    `subject`, `body` (Markdown: what is asked, lineage summary, policy reasons, links to the
    sanitization report and MLflow run) and `requested_by` may be Jinja templates. A templated
    requester is only known at run time, so it is excluded from the assigned users by
    `verified_approval`, not here. The gate takes an optional "comment". Retries default to 0:
    a retried gate re-registers its request and drops an answer already given.
    """
    from airflow.sdk import Param

    approvers = _assigned_approvers(owner_site, required_role, None if _is_template(requested_by) else requested_by)
    if not approvers:
        raise ValueError(
            f"no user may answer gate {gate_name!r} of site {owner_site!r} (role {required_role!r}); "
            "check conf/users.yaml and the approval policy"
        )
    kwargs.setdefault("retries", 0)
    params = kwargs.pop("params", None) or {}
    params.setdefault(
        "comment",
        Param(None, type=["null", "string"], title="Comment",
              description="Why you approve or reject (optional, kept in the audit log)"),
    )
    footer = f"\n\n---\nGate `{gate_name}` of site `{owner_site}`, answered by a `{required_role}`; requested by `{requested_by}`."
    return _operator_class()(
        task_id=task_id,
        gate_name=gate_name,
        owner_site=owner_site,
        required_role=required_role,
        requested_by=requested_by,
        subject=subject,
        body=body + footer,
        assigned_users=[{"id": user.id, "name": user.id} for user in approvers],
        params=params,
        **kwargs,
    )


# --- a check of its own ---------------------------------------------------------------------------

def _current_run() -> tuple[str | None, str | None]:
    try:
        from airflow.sdk import get_current_context

        ti = get_current_context()["ti"]
        return ti.dag_id, ti.run_id
    except Exception:  # outside a running task (direct calls in tests)
        return None, None


def verified_approval(
    *,
    ti_xcom_value: dict | None,
    gate_name: str,
    owner_site: str,
    required_role: str,
    requested_by: str,
    site_paths,
    dag_id: str | None = None,
    run_id: str | None = None,
) -> dict:
    """`pipelines.approvals.verify_answer` for the running task: a refusal fails the task without retry.

    `ti_xcom_value` is the gate task's XCom return value; `site_paths` the site that checks it (refusals
    are audited there, its pinned policy decides); `dag_id`/`run_id` default to the running task's.
    """
    from airflow.sdk.exceptions import AirflowFailException

    from pipelines.approvals import ApprovalRefused, verify_answer

    if dag_id is None or run_id is None:
        current_dag, current_run = _current_run()
        dag_id, run_id = dag_id or current_dag, run_id or current_run
    try:
        return verify_answer(ti_xcom_value, gate_name=gate_name, owner_site=owner_site, required_role=required_role,
                             requested_by=requested_by, site_paths=site_paths, dag_id=dag_id, run_id=run_id)
    except ApprovalRefused as refused:
        raise AirflowFailException(str(refused)) from refused
