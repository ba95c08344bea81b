"""Signed approvals: what an officer answered at a gate, and the check every release makes.

The gate task signs the answer Airflow recorded with the owner site's signing key (ECDSA P-256 /
SHA-256, `pipelines.trust.keys.signing_key`; the record names the key id). Any site can check such
a signature with its trust store, so an approval given at one site can be verified at another
without reading anything of the owner site. Two forms:

- a signed *answer* (`sign_answer`): the gate's recorded response, bound to its DAG run. A release
  step accepts only such answers and checks each one itself with `verify_answer`: the signature by
  the owner site, the run it belongs to, the responding user and the `approval` policy, at the
  verifying site. Nothing another task wrote (a force-marked gate, an XCom written through the
  REST API, the output of an earlier check) counts as an approval.
- a signed approval *document* (`sign_document`): a site's decision on another site's request (the
  origin's review of an export), naming the request, the model (its uri at the requesting site
  and its digest), the decision, the officer, the comment and the time. `verified_document`
  checks it at the requesting site against the request it refers to.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from pipelines.config import SITES, load_config
from pipelines.context import StepError
from pipelines.workspace import SitePaths

APPROVE = "Approve"
REJECT = "Reject"
ANSWER_VERSION = "factory-approval-answer-v3"
DOCUMENT_TYPE = "factory-approval-document-v1"
SIGNATURE_FIELD = "signature"
MAX_TEXT = 2000  # characters of a comment or an id a signed record may carry


class ApprovalRefused(StepError):
    """An approval does not hold; nothing may be released on it."""


# ---------------------------------------------------------------- signatures


def _message(version: str, record: dict[str, Any]) -> bytes:
    """What is signed: the version line and the canonical JSON of every field but the signature."""
    body = {name: value for name, value in record.items() if name != SIGNATURE_FIELD}
    return f"{version}\n".encode() + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _signed(paths: SitePaths, version: str, record: dict[str, Any]) -> dict[str, Any]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from pipelines.trust import keys

    signed = {name: value for name, value in record.items() if name != SIGNATURE_FIELD}
    signed |= {"key_id": keys.signing_key_id(paths), "signed_at": keys.iso(keys.now())}
    signature = keys.signing_key(paths).sign(_message(version, signed), ec.ECDSA(hashes.SHA256()))
    return signed | {SIGNATURE_FIELD: base64.b64encode(signature).decode()}


def _signature_problem(verifier: SitePaths, signer: str, version: str, record: dict[str, Any]) -> str | None:
    """Why `record` is not signed by a key of `signer` that `verifier` trusts (None when it is)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from pipelines.trust import keys

    key_id, signed_at, signature = record.get("key_id"), record.get("signed_at"), record.get(SIGNATURE_FIELD)
    if not (isinstance(key_id, str) and isinstance(signed_at, str) and isinstance(signature, str)):
        return "it carries no key id, signing time and signature"
    try:
        moment = keys.parse_time(signed_at[:40])
        if moment.tzinfo is None:
            raise ValueError("no time zone")
        public = keys.check_signing_key(verifier, signer, key_id, signed_at=moment)
        public.verify(base64.b64decode(signature, validate=True), _message(version, record),
                      ec.ECDSA(hashes.SHA256()))
    except keys.TrustError as error:
        return str(error)
    except (InvalidSignature, ValueError, TypeError):
        return "the signature does not verify (forged or altered)"
    return None


def _configured_site(value: Any) -> str | None:
    """`value` if it names a configured site (a name from `SITES`), else None."""
    return next((site for site in SITES if value == site), None)


def _short(value: Any, limit: int = 64) -> str:
    return str(value)[:limit]


def sign_answer(paths: SitePaths, record: dict[str, Any]) -> dict[str, Any]:
    """The gate answer `record` signed by this site (`key_id`, `signed_at` and `signature` added)."""
    return _signed(paths, ANSWER_VERSION, record)


# ---------------------------------------------------------------- audit and refusal


def _audit(paths: SitePaths, *, action: str, actor: str, gate: str, outcome: str, details: dict[str, Any]) -> None:
    from pipelines.trust import audit

    audit.append(paths, action=action, actor=actor, object=gate, outcome=outcome, details=details)


def _refuse(paths: SitePaths, message: str, *, actor: str, gate: str, outcome: str, details: dict[str, Any],
            action: str = "approval.answered"):
    """Record the refusal at the verifying site (best effort: it stands even if the log is unwritable)."""
    try:
        _audit(paths, action=action, actor=actor, gate=gate, outcome=outcome, details=details)
    except Exception as error:  # noqa: BLE001 - never let a logging failure turn a refusal into a pass
        message += f" (audit log not written: {error})"
    raise ApprovalRefused(message)


def answer_owner(record: Any) -> str:
    """The site that must have signed `record`: its claimed owner, if that is a configured site."""
    owner = _configured_site(record.get("owner_site") if isinstance(record, dict) else None)
    if owner is None:
        claimed = record.get("owner_site") if isinstance(record, dict) else None
        raise ApprovalRefused(f"approval answer names owner site {_short(claimed, 40)!r}, which is not a "
                              "configured site; nothing is released")
    return owner


def _allowed(site_paths: SitePaths, *, user: dict[str, Any], gate_name: str, owner_site: str, required_role: Any,
             requested_by: str | None):
    from pipelines.policy import evaluate

    return evaluate(
        "approval",
        {"user": user, "gate": {"name": gate_name, "owner_site": owner_site, "required_role": required_role},
         "requested_by": requested_by},
        site=site_paths.site,
        home=Path(site_paths.home),
    )


# ---------------------------------------------------------------- gate answers


def verified_decision(record: Any, *, gate_name: str, owner_site: str, required_role: str | None = None,
                      requested_by: str, site_paths: SitePaths, dag_id: str | None, run_id: str | None) -> dict:
    """Check a signed gate answer and return `{user, site, roles, decision, comment, responded_at}`.

    `site_paths` is the VERIFYING site: refusals are audited there and the `approval` policy is
    evaluated there (its pinned bundle decides); `owner_site` is the site whose key must have signed
    the answer, looked up in the verifier's trust store. Raises ApprovalRefused when there is no
    answer, the owner is not a configured site, the signature does not verify, the answer belongs to
    another gate or run, or the user is unknown or not allowed. A valid rejection is returned (with
    `decision: "reject"`, audited); `verify_answer` refuses it. `required_role` defaults to the signed one.
    """
    where = {"dag_id": dag_id, "run_id": run_id, "owner_site": _short(owner_site, 40)}
    record = record if isinstance(record, dict) else None
    if not record or not record.get(SIGNATURE_FIELD) or not record.get("responded_by"):
        _refuse(site_paths, f"gate {gate_name} has no recorded response (was it force-marked?); "
                "nothing is released", actor="unknown", gate=gate_name, outcome="no_response",
                details={**where, "comment": ""})
    owner = _configured_site(owner_site)
    if owner is None:
        _refuse(site_paths, f"gate {gate_name}: owner site {_short(owner_site, 40)!r} is not a configured site; "
                "nothing is released", actor="unknown", gate=gate_name, outcome="invalid", details=where)
    if problem := _signature_problem(site_paths, owner, ANSWER_VERSION, record):
        _refuse(site_paths, f"gate {gate_name}: the recorded response is not signed by site {owner} ({problem}); "
                "nothing is released", actor="unknown", gate=gate_name, outcome="forged",
                details={**where, "comment": "", "claimed_by": _short(record.get("responded_by"))})
    if (record.get("gate"), record.get("owner_site")) != (gate_name, owner) or (
        dag_id and (record.get("dag_id"), record.get("run_id")) != (dag_id, run_id)
    ):
        _refuse(site_paths, f"gate {gate_name}: the response belongs to gate {_short(record.get('gate'))} of "
                f"{_short(record.get('dag_id'))}/{_short(record.get('run_id'))}, not this run; nothing is released",
                actor=_short(record.get("responded_by")), gate=gate_name, outcome="other_run", details=where)
    required_role = required_role or record.get("required_role")
    user_id = record["responded_by"]
    comment = str(record.get("comment") or "")[:MAX_TEXT]
    decision = "approve" if record.get("chosen_options") == [APPROVE] else "reject"
    details = {**where, "comment": comment}
    try:
        user = load_config().user(user_id)
    except (KeyError, TypeError):
        _refuse(site_paths, f"gate {gate_name}: answered by {_short(user_id)}, who is not a configured user; "
                "nothing is released", actor=_short(user_id), gate=gate_name, outcome=decision,
                details={**details, "allowed": False})
    verdict = _allowed(site_paths, user={"id": user.id, "site": user.site, "roles": list(user.roles)},
                       gate_name=gate_name, owner_site=owner, required_role=required_role, requested_by=requested_by)
    details = {**details, "allowed": bool(verdict.allow), "reasons": list(verdict.reasons)}
    if not verdict.allow:
        _refuse(site_paths, f"gate {gate_name}: {user_id} may not answer it: "
                f"{'; '.join(verdict.reasons) or 'denied'}; nothing is released",
                actor=user_id, gate=gate_name, outcome=decision, details=details)
    # A decision counts only once it is in the audit log: a failure to write it fails the step.
    _audit(site_paths, action="approval.answered", actor=user_id, gate=gate_name, outcome=decision, details=details)
    return {"user": user.id, "site": user.site, "roles": list(user.roles), "decision": decision,
            "comment": comment, "responded_at": record.get("responded_at")}


def verify_answer(record: Any, *, gate_name: str, owner_site: str, required_role: str | None = None,
                  requested_by: str, site_paths: SitePaths, dag_id: str | None, run_id: str | None) -> dict:
    """`verified_decision`, and a rejection refused too (naming the officer and the comment)."""
    approval = verified_decision(record, gate_name=gate_name, owner_site=owner_site, required_role=required_role,
                                 requested_by=requested_by, site_paths=site_paths, dag_id=dag_id, run_id=run_id)
    if approval["decision"] != "approve":
        raise ApprovalRefused(f"gate {gate_name} rejected by {approval['user']}: {approval['comment'] or '(no comment)'}")
    return approval


# ---------------------------------------------------------------- approval documents (across sites)


def sign_document(paths: SitePaths, *, recipient: str, gate_name: str, request_id: str, model_uri: str,
                  model_digest: str, approval: dict[str, Any], answer: dict[str, Any] | None = None,
                  end_use: str | None = None, membership_audit: dict[str, Any] | None = None) -> dict[str, Any]:
    """A decision of this site on `recipient`'s request, signed by this site.

    `approval` is what `verified_decision` returned for this site's officer; `answer` (optional)
    names the gate run that recorded it (`dag_id`, `run_id`, `task_id`) for the audit trail;
    `end_use` is the end use the request named (the officer decided on that one);
    `membership_audit` (optional) the figures of this site's membership-inference audit of the
    model (pipelines.protection.membership.signed_figures), which a release gate may require."""
    document = {
        "type": DOCUMENT_TYPE,
        "signer": paths.site,
        "recipient": recipient,
        "gate": gate_name,
        "request_id": request_id,
        "model": {"uri": model_uri, "digest": model_digest},
        "end_use": end_use,
        "decision": approval["decision"],
        "officer": {"user": approval["user"], "site": approval["site"], "roles": list(approval["roles"])},
        "comment": approval.get("comment") or "",
        "responded_at": approval.get("responded_at"),
        "answer": {k: (answer or {}).get(k) for k in ("dag_id", "run_id", "task_id")},
    }
    if membership_audit is not None:
        document["membership_audit"] = membership_audit
    return _signed(paths, DOCUMENT_TYPE, document)


def is_document(value: Any) -> bool:
    return isinstance(value, dict) and value.get("type") == DOCUMENT_TYPE


def _document_problem(document: dict[str, Any]) -> str | None:
    officer, model = document.get("officer"), document.get("model")
    if not (isinstance(officer, dict) and isinstance(officer.get("user"), str) and isinstance(officer.get("site"), str)
            and isinstance(officer.get("roles"), list) and all(isinstance(r, str) for r in officer["roles"])):
        return "its officer is not {user, site, roles}"
    if not (isinstance(model, dict) and isinstance(model.get("uri"), str) and isinstance(model.get("digest"), str)):
        return "its model is not {uri, digest}"
    if document.get("decision") not in ("approve", "reject"):
        return "its decision is neither approve nor reject"
    if not all(isinstance(document.get(k), str) and len(document[k]) <= MAX_TEXT for k in ("request_id", "comment")):
        return "its request id or comment is not a short text"
    if document.get("end_use") is not None and not (isinstance(document["end_use"], str)
                                                     and len(document["end_use"]) <= MAX_TEXT):
        return "its end use is not a short text"
    return None


def verified_document(document: Any, *, site_paths: SitePaths, owner_site: str, gate_name: str, required_role: str,
                      request_id: str, model_uri: str, model_digest: str, requested_by: str | None,
                      end_use: str | None = None) -> dict:
    """Check an approval document from `owner_site` at the verifying site `site_paths` and return the
    approval `{user, site, roles, decision, comment, responded_at, request_id, signed_by, key_id}`.

    It must be addressed to this site, signed by a key of `owner_site` this site trusts, name exactly
    this request, this model (uri and digest) and this end use (None: the request named none), and its officer must belong to `owner_site` and be
    allowed by the `approval` policy evaluated here (not the requester). Every check is audited here
    (`approval.document`); a refusal raises ApprovalRefused. A valid rejection is returned (`decision:
    "reject"`): the caller ends the request on it.
    """
    where = {"request_id": _short(request_id, 256), "owner_site": _short(owner_site, 40)}

    def refuse(reason: str, outcome: str, actor: str = "unknown"):
        _refuse(site_paths, f"approval document for request {_short(request_id, 256)}: {reason}; nothing is released",
                actor=actor, gate=gate_name, outcome=outcome, details={**where, "reason": reason},
                action="approval.document")

    owner = _configured_site(owner_site)
    if owner is None or owner == site_paths.site:
        refuse(f"{_short(owner_site, 40)!r} is not a partner site that may approve here", "invalid")
    if not is_document(document):
        refuse("it is not an approval document", "invalid")
    if (document.get("signer"), document.get("recipient"), document.get("gate")) != (owner, site_paths.site, gate_name):
        refuse(f"it is a {_short(document.get('gate'))} decision of {_short(document.get('signer'))} for "
               f"{_short(document.get('recipient'))}, not a {gate_name} decision of {owner} for {site_paths.site}",
               "invalid")
    if problem := _signature_problem(site_paths, owner, DOCUMENT_TYPE, document):
        refuse(f"not signed by site {owner} ({problem})", "forged")
    if problem := _document_problem(document):
        refuse(problem, "invalid")
    if document["request_id"] != request_id:
        refuse(f"it answers request {_short(document['request_id'], 256)}, not this one", "other_request")
    if (document["model"]["uri"], document["model"]["digest"]) != (model_uri, model_digest):
        refuse(f"it names model {_short(document['model']['uri'])} ({_short(document['model']['digest'], 80)}), "
               f"not {model_uri} ({model_digest})", "other_model")
    if document.get("end_use") != end_use:
        refuse(f"it approves end use {_short(document.get('end_use'), 64)!r}, not {_short(end_use, 64)!r}",
               "other_end_use")
    officer = document["officer"]
    verdict = _allowed(site_paths, user={"id": officer["user"], "site": officer["site"], "roles": officer["roles"]},
                       gate_name=gate_name, owner_site=owner, required_role=required_role, requested_by=requested_by)
    details = {**where, "comment": document["comment"], "allowed": bool(verdict.allow),
               "reasons": list(verdict.reasons), "key_id": document["key_id"]}
    if not verdict.allow:
        refuse(f"{_short(officer['user'])} may not decide it: {'; '.join(verdict.reasons) or 'denied'}",
               "not_allowed", actor=_short(officer["user"]))
    _audit(site_paths, action="approval.document", actor=officer["user"], gate=gate_name,
           outcome=document["decision"], details=details)
    return {"user": officer["user"], "site": officer["site"], "roles": list(officer["roles"]),
            "decision": document["decision"], "comment": document["comment"],
            "responded_at": document.get("responded_at"), "request_id": request_id, "signed_by": owner,
            "key_id": document["key_id"], "signed_at": document["signed_at"]}

