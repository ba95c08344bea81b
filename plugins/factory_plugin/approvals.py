"""Approval gates: a person answers in Airflow's Required Actions, the next step re-checks the answer.

`approval_gate(...)` builds the human-in-the-loop task, assigned to the users the `approval`
policy allows. `verified_approval(...)` is what the step after the gate calls: it never trusts
the gate task's state (a USER can force-mark a task successful through the REST API, or write
an XCom), only a response the gate itself sealed when Airflow resumed it with the recorded
answer. It re-evaluates the `approval` policy for the responding user, writes every answer to
the owner site's audit log and returns the approval record that goes into release inputs and
provenance.

Nothing here imports Airflow at module import time: Airflow's plugin manager loads this file.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

APPROVE = "Approve"
REJECT = "Reject"
SEAL_VERSION = "factory-approval-v1"
_SEALED_FIELDS = ("gate", "owner_site", "dag_id", "run_id", "task_id", "chosen_options", "comment",
                  "responded_by", "responded_at")


# --- who may answer -------------------------------------------------------------------------------

def _assigned_approvers(owner_site: str, required_role: str, requested_by: str | None):
    """From conf only, so parsing a DAG evaluates no policy; `verified_approval` enforces it at run time."""
    from pipelines.policy import assigned_approvers

    return assigned_approvers(owner_site, required_role, requested_by)


def _is_template(value: str | None) -> bool:
    return bool(value) and ("{{" in value or "{%" in value)


# --- the gate -------------------------------------------------------------------------------------

def _seal_key(site_paths) -> bytes:
    """The site's key for sealing gate responses (0600, created on first use, never leaves the site)."""
    path = Path(site_paths.state_dir) / "approval-seal.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # first writer wins; a concurrent one reads the winner's key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_bytes()


def _mac(key: bytes, record: dict[str, Any]) -> str:
    content = json.dumps({name: record.get(name) for name in _SEALED_FIELDS}, sort_keys=True, default=str)
    return hmac.new(key, f"{SEAL_VERSION}\n{content}".encode(), hashlib.sha256).hexdigest()


@functools.cache
def _operator_class():
    from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator

    class FactoryApprovalOperator(ApprovalOperator):
        """ApprovalOperator whose result is sealed by the site and whose Reject does not skip.

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
            from pipelines.workspace import SitePaths

            ti = context["ti"]
            user = answer.get("responded_by_user") or {}
            record = {
                "gate": self.gate_name,
                "owner_site": self.owner_site,
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
            record["seal"] = _mac(_seal_key(SitePaths.of(self.owner_site)), record)
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


# --- the step after the gate ----------------------------------------------------------------------

def _fail(message: str):
    from airflow.sdk.exceptions import AirflowFailException

    raise AirflowFailException(message)


def _audit(site_paths, *, actor: str, gate: str, outcome: str, details: dict[str, Any]) -> None:
    from pipelines.trust import audit

    audit.append(site_paths, action="approval.answered", actor=actor, object=gate, outcome=outcome,
                 details=details)


def _refuse(site_paths, message: str, *, actor: str, gate: str, outcome: str, details: dict[str, Any]):
    """Record the refused answer (best effort: the refusal stands even if the log is unwritable)."""
    try:
        _audit(site_paths, actor=actor, gate=gate, outcome=outcome, details=details)
    except Exception as error:  # noqa: BLE001 - never let a logging failure turn a refusal into a pass
        message += f" (audit log not written: {error})"
    _fail(message)


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
    """Check the gate's recorded answer and return the approval record; raise when it does not hold.

    `ti_xcom_value` is the gate task's XCom return value. `dag_id`/`run_id` default to the running
    task's; the sealed answer must belong to this run. Returns
    `{user, site, roles, decision, comment, responded_at}`.
    """
    from pipelines.config import load_config

    if dag_id is None or run_id is None:
        current_dag, current_run = _current_run()
        dag_id, run_id = dag_id or current_dag, run_id or current_run
    record = ti_xcom_value if isinstance(ti_xcom_value, dict) else None
    where = {"dag_id": dag_id, "run_id": run_id}
    if not record or not record.get("seal") or not record.get("responded_by"):
        _refuse(site_paths, f"gate {gate_name} has no recorded response (was it force-marked?); "
                "nothing is released", actor="unknown", gate=gate_name, outcome="no_response",
                details={**where, "comment": ""})
    expected = _mac(_seal_key(site_paths), record)
    if not hmac.compare_digest(expected, str(record["seal"])):
        _refuse(site_paths, f"gate {gate_name}: the recorded response is not sealed by site {owner_site} "
                "(forged or altered XCom); nothing is released", actor="unknown", gate=gate_name,
                outcome="forged", details={**where, "comment": "", "claimed_by": record.get("responded_by")})
    if (record.get("gate"), record.get("owner_site")) != (gate_name, owner_site) or (
        dag_id and (record.get("dag_id"), record.get("run_id")) != (dag_id, run_id)
    ):
        _fail(f"gate {gate_name}: the response belongs to gate {record.get('gate')} of "
              f"{record.get('dag_id')}/{record.get('run_id')}, not this run; nothing is released")

    user_id = record["responded_by"]
    comment = record.get("comment") or ""
    decision = "approve" if record.get("chosen_options") == [APPROVE] else "reject"
    details = {**where, "comment": comment}
    try:
        user = load_config().user(user_id)
    except KeyError:
        _refuse(site_paths, f"gate {gate_name}: answered by {user_id}, who is not a configured user; "
                "nothing is released", actor=user_id, gate=gate_name, outcome=decision,
                details={**details, "allowed": False})

    from pipelines.policy import evaluate

    verdict = evaluate(
        "approval",
        {
            "user": {"id": user.id, "site": user.site, "roles": list(user.roles)},
            "gate": {"name": gate_name, "owner_site": owner_site, "required_role": required_role},
            "requested_by": requested_by,
        },
        site=owner_site,
        home=Path(site_paths.home),
    )
    details = {**details, "allowed": bool(verdict.allow), "reasons": list(verdict.reasons)}
    if not verdict.allow:
        _refuse(site_paths, f"gate {gate_name}: {user_id} may not answer it: "
                f"{'; '.join(verdict.reasons) or 'denied'}; nothing is released",
                actor=user_id, gate=gate_name, outcome=decision, details=details)
    if decision != "approve":
        _refuse(site_paths, f"gate {gate_name} rejected by {user_id}: {comment or '(no comment)'}",
                actor=user_id, gate=gate_name, outcome=decision, details=details)
    # An approval counts only once it is in the audit log: a failure to write it fails the step.
    _audit(site_paths, actor=user_id, gate=gate_name, outcome=decision, details=details)
    return {
        "user": user.id,
        "site": user.site,
        "roles": list(user.roles),
        "decision": decision,
        "comment": comment,
        "responded_at": record.get("responded_at"),
    }
