"""Sealed approval answers: what an officer answered at a gate, and the check every release makes.

The gate task seals the answer Airflow recorded (HMAC with the owner site's approval key, which
never leaves the site). A release step accepts only such sealed answers and checks each one
itself with `verify_answer`: the seal, the run it belongs to, the responding user and the
`approval` policy. Nothing another task wrote (a force-marked gate, an XCom written through the
REST API, the output of an earlier check) counts as an approval.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from pipelines.config import SITES, load_config
from pipelines.context import StepError
from pipelines.workspace import SitePaths

APPROVE = "Approve"
REJECT = "Reject"
SEAL_VERSION = "factory-approval-v2"
SEALED_FIELDS = ("gate", "owner_site", "required_role", "dag_id", "run_id", "task_id", "chosen_options",
                 "comment", "responded_by", "responded_at")


class ApprovalRefused(StepError):
    """An approval answer does not hold; nothing may be released on it."""


def seal_key(paths: SitePaths) -> bytes:
    """The site's key for sealing gate answers (0600, created on first use, never leaves the site)."""
    path = Path(paths.state_dir) / "approval-seal.key"
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


def seal(paths: SitePaths, record: dict[str, Any]) -> str:
    """The seal of an answer record (over SEALED_FIELDS) with the site's approval key."""
    content = json.dumps({name: record.get(name) for name in SEALED_FIELDS}, sort_keys=True, default=str)
    return hmac.new(seal_key(paths), f"{SEAL_VERSION}\n{content}".encode(), hashlib.sha256).hexdigest()


def _audit(paths: SitePaths, *, actor: str, gate: str, outcome: str, details: dict[str, Any]) -> None:
    from pipelines.trust import audit

    audit.append(paths, action="approval.answered", actor=actor, object=gate, outcome=outcome, details=details)


def _refuse(paths: SitePaths, message: str, *, actor: str, gate: str, outcome: str, details: dict[str, Any]):
    """Record the refused answer (best effort: the refusal stands even if the log is unwritable)."""
    try:
        _audit(paths, actor=actor, gate=gate, outcome=outcome, details=details)
    except Exception as error:  # noqa: BLE001 - never let a logging failure turn a refusal into a pass
        message += f" (audit log not written: {error})"
    raise ApprovalRefused(message)


def answer_site(record: Any, home: Path | None = None) -> SitePaths:
    """The paths of the site that must have sealed `record`: its claimed owner, if that is a configured site."""
    owner = record.get("owner_site") if isinstance(record, dict) else None
    if owner not in SITES:
        raise ApprovalRefused(f"approval answer names owner site {str(owner)[:40]!r}, which is not a configured "
                              "site; nothing is released")
    return SitePaths.of(owner, home)


def verify_answer(record: Any, *, gate_name: str, owner_site: str, required_role: str | None = None,
                  requested_by: str, site_paths: SitePaths, dag_id: str | None, run_id: str | None) -> dict:
    """Check a sealed gate answer and return the approval `{user, site, roles, decision, comment, responded_at}`.

    Raises ApprovalRefused (audited at the owner site) when there is no answer, the seal does not
    verify, the answer belongs to another gate or run, the user is unknown or not allowed by the
    `approval` policy, or the answer is a rejection. `required_role` defaults to the sealed one.
    """
    where = {"dag_id": dag_id, "run_id": run_id}
    record = record if isinstance(record, dict) else None
    if not record or not record.get("seal") or not record.get("responded_by"):
        _refuse(site_paths, f"gate {gate_name} has no recorded response (was it force-marked?); "
                "nothing is released", actor="unknown", gate=gate_name, outcome="no_response",
                details={**where, "comment": ""})
    if not hmac.compare_digest(seal(site_paths, record), str(record["seal"])):
        _refuse(site_paths, f"gate {gate_name}: the recorded response is not sealed by site {owner_site} "
                "(forged or altered XCom); nothing is released", actor="unknown", gate=gate_name,
                outcome="forged", details={**where, "comment": "", "claimed_by": str(record.get("responded_by"))[:64]})
    if (record.get("gate"), record.get("owner_site")) != (gate_name, owner_site) or (
        dag_id and (record.get("dag_id"), record.get("run_id")) != (dag_id, run_id)
    ):
        raise ApprovalRefused(f"gate {gate_name}: the response belongs to gate {record.get('gate')} of "
                              f"{record.get('dag_id')}/{record.get('run_id')}, not this run; nothing is released")
    required_role = required_role or record.get("required_role")
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
    return {"user": user.id, "site": user.site, "roles": list(user.roles), "decision": decision,
            "comment": comment, "responded_at": record.get("responded_at")}
