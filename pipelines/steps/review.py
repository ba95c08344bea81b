"""Stage 5's cross-site export decision: the supplier asks, the data owner reviews, the supplier releases.

Each site runs its own part in its own Airflow; what passes between them is sealed packages.

1. `request_review` (supplier, once M5 is registered) records the export REQUEST in the supplier's
   state (`export-requests.json`: request id = the preparation run's id, the model's uri and
   digest, destination, variant, thresholds, end use, the variant's capability restrictions as its
   signed metadata records them, requester) and sends M5 to the data owner for review
   (`model_release` gate, purpose `review`). The release later takes its parameters from this
   record, never from what comes back.
2. `receive_review` (origin) opens the review package, checks that the model is the one the
   request names (its digest, computed here), registers it and evaluates it on the origin's own
   test data, beside the version it would replace and the origin's M3 and M4 on the same test set
   (`pipelines.evidence.model_md`, the gate page's evidence, with the model's restrictions, which
   must be those the request names). The officer decides at a gate.
3. `send_approval` (origin) verifies the officer's signed answer at the origin and sends the
   decision to the requesting site as an approval DOCUMENT signed by the origin's key.
4. `receive_approval` (supplier) opens the document, verifies the origin's signature with the
   supplier's trust store and that it names a pending request and exactly that model digest. A
   rejection ends the request (audited) and the run fails with the officer's reason.
5. `release_export` (supplier, after its export-control officer's gate) verifies the stored
   document and the gate's signed answer again and releases the request's model to the request's
   destination through the `model_release` export gate, with the request's variant, thresholds and
   end use (which the gate checks against the destination's licence). Its officer's gate page shows
   `receive_approval`'s evidence: the model on the supplier's test data, its restrictions and its checks.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipelines.config import SITES
from pipelines.fileio import read_json, update_json, write_json
from pipelines.learning import registry
from pipelines.learning import restrictions as capability
from pipelines.steps import StepContext, StepError, step
from pipelines.steps.exchange import (
    _already_sent,
    _intake,
    _last_received,
    _records,
    _remember,
    _requester,
    _seal_to_outbox,
    _verified_approvals,
    receive_model_package,
    release_checked_model,
)

REQUESTS = "export-requests"  # at the requesting site: request id -> request
REVIEWS = "export-reviews"  # at the reviewing site: review package id -> review
IN_REVIEW, APPROVED, REJECTED, RELEASED = "in_review", "approved", "rejected", "released"
GATE = "model_release"
EXPORT = "export"  # the release purpose of an export
PARITY_METRIC = "onnx_parity_max_abs"  # a model's metric that is no test set (pipelines.steps.training.export_model)
OWNER_ROLE = "compliance_officer"  # data.factory.officers.data_owner_role
APPROVAL_CONTENT = "approval"
MAX_DOCUMENT = 64 * 1024  # bytes of an approval document
MAX_ID = 256  # characters of a request id (an Airflow run id)
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_PACKAGE_ID = re.compile(r"^[0-9a-f]{32}$")
_END_USE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def _site(value: Any, what: str) -> str:
    """`value` if it names a configured site (the name from SITES), else StepError."""
    for site in SITES:
        if value == site:
            return site
    raise StepError(f"{what} {str(value)[:40]!r} is not a configured site ({', '.join(SITES)})")


def _thresholds(value: Any) -> dict[str, float]:
    if value in (None, ""):
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in value.items()
    ):
        raise StepError(f"thresholds must map metric names to numbers, not {str(value)[:80]}")
    return {k: float(v) for k, v in value.items()}


def _end_use(value: Any, destination: str) -> str | None:
    """The end use of an export request: `value`, or the default of the destination's licence when empty."""
    from pipelines.policy import default_end_use

    if value in (None, ""):
        return default_end_use(destination)
    if not isinstance(value, str) or not _END_USE.match(value):
        raise StepError(f"end use {str(value)[:40]!r} is not a short name (lower-case letters, digits, _ and -)")
    return value


def _requests_file(ctx: StepContext) -> Path:
    return ctx.paths.state_dir / f"{REQUESTS}.json"


def _request_id(value: Any) -> str:
    request_id = value.get("request_id") if isinstance(value, dict) else value
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID:
        raise StepError(f"no export request id in {str(value)[:80]}")
    return request_id


def export_request(ctx: StepContext, value: Any) -> dict[str, Any]:
    """The export request recorded at this site under the id in `value` (a request id or a step output)."""
    request_id = _request_id(value)
    record = _records(ctx, REQUESTS).get(request_id)
    if record is None:
        raise StepError(f"{ctx.site} has no export request {request_id[:80]!r}")
    return record


def _set_status(ctx: StepContext, request_id: str, expected: str, status: str, **changes: Any) -> dict[str, Any]:
    """Move a request from `expected` to `status` (under the state file's lock)."""
    from pipelines.trust.keys import iso, now

    with update_json(_requests_file(ctx), {}) as requests:
        record = requests[request_id]
        if record["status"] != expected:
            raise StepError(f"export request {request_id} is {record['status']}, not {expected}")
        record.update(status=status, **changes)
        record.setdefault("history", []).append({"status": status, "at": iso(now()), "run_id": ctx.run_id})
        return dict(record)


# ---------------------------------------------------------------------------- requesting site


@step("request_review")
def request_review(ctx: StepContext, *, model: str | dict, recipient: str, kind: str, destination: str,
                   variant: str | None = None, thresholds: dict[str, float] | None = None,
                   end_use: str | None = None, restrictions: dict | None = None) -> dict[str, Any]:
    """Record the export request of this run and send the model to the data owner `recipient` for review.

    The request (id = this DAG run's id) holds the model's uri and digest, the destination, the
    variant, the thresholds and the end use (default: `pipelines.policy.default_end_use` of the
    destination's licence); the release takes them from here and the `model_release` export gate
    checks the end use against the destination's licence. The request's capability restrictions are
    the model's (its signed metadata); `restrictions`, the run's param, must be those. A model below
    the run's stricter thresholds is refused before anyone is asked."""
    from pipelines.learning.artifacts import model_digest
    from pipelines.trust import audit
    from pipelines.trust.keys import iso, now

    ref = registry.resolve_model(ctx.paths, model if isinstance(model, str) else f"{model['name']}/{model['version']}")
    meta = ref.metadata
    if variant is not None and variant != (meta.get("variant") or registry.DEFAULT_VARIANT):
        raise StepError(f"{ref.uri} is variant {meta.get('variant')!r}, not {variant!r}")
    destination = _site(destination, "export destination")
    reviewer = _site(recipient, "reviewing site")
    if ctx.site in (destination, reviewer):
        raise StepError(f"{ctx.site} cannot export to or review for itself")
    thresholds = _thresholds(thresholds)
    end_use = _end_use(end_use, destination)
    try:
        restricted = capability.parse(meta.get("restrictions"))
        if restrictions is not None and capability.parse(restrictions) != restricted:
            raise StepError(f"{ref.uri} is restricted to {capability.describe(restricted)}, not "
                            f"{capability.describe(capability.parse(restrictions))} as this run asks")
    except capability.RestrictionError as error:
        raise StepError(f"{ref.uri}: {error}") from None
    for metric, floor in thresholds.items():  # a run may raise a threshold, never lower it
        value = meta.get("metrics", {}).get(metric)
        if value is None or value < floor:
            raise StepError(f"{ref.uri} {metric} {value} is below this variant's threshold {floor}; no review is requested")
    request = {
        "request_id": ctx.run_id, "model": ref.uri, "digest": model_digest(ref.model_dir), "stage": meta["stage"],
        "destination": destination, "variant": meta.get("variant") or registry.DEFAULT_VARIANT,
        "thresholds": thresholds, "end_use": end_use, "restrictions": restricted,
        "requested_by": _requester(ctx), "reviewer": reviewer,
    }
    known = _records(ctx, REQUESTS).get(ctx.run_id)
    if known and {k: known.get(k) for k in request} != request:
        raise StepError(f"export request {ctx.run_id} was made for {known['model']} to {known['destination']}; "
                        "one run makes one request")
    sent = release_checked_model(
        ctx, ref, recipient=reviewer, purpose="review", kind=kind, key=f"{kind}:{ctx.run_id}:{reviewer}",
        approvals=[], requested_by=request["requested_by"],
        metadata={"request": {k: v for k, v in request.items() if k != "reviewer"}})
    # Recorded once the review is sealed: an answer can only name a request that reached its reviewer.
    with update_json(_requests_file(ctx), {}) as requests:
        if ctx.run_id not in requests:
            requests[ctx.run_id] = {**request, "status": IN_REVIEW, "created": iso(now()),
                                    "review_package": sent["package_id"],
                                    "history": [{"status": IN_REVIEW, "at": iso(now()), "run_id": ctx.run_id}]}
    if not known:
        audit.append(ctx.paths, action="export.requested", actor=request["requested_by"], object=ctx.run_id,
                     outcome="success", details={k: v for k, v in request.items() if k != "request_id"}
                     | {"package_id": sent["package_id"]})
    print(f"export request {ctx.run_id}: {ref.uri} to {destination}, sent to {reviewer} for review")
    return {**sent, **request}


# ---------------------------------------------------------------------------- reviewing site


def _request_problem(request: Any, header: dict[str, Any]) -> str | None:
    """What is wrong with the request a review package carries (None when it is well formed)."""
    if not isinstance(request, dict):
        return "it carries no export request"
    text = {"request_id": MAX_ID, "model": 200, "variant": 64, "requested_by": 64, "stage": 8}
    if not all(isinstance(request.get(k), str) and 0 < len(request[k]) <= n for k, n in text.items()):
        return "its request lacks a short text id, model, variant, stage or requester"
    if request["model"] != header["metadata"].get("model"):
        return f"its request names model {request['model'][:80]}, the package carries another"
    if not isinstance(request.get("digest"), str) or not _DIGEST.match(request["digest"]):
        return "its request carries no sha256 model digest"
    if request.get("destination") not in SITES:
        return "its request names no configured destination"
    if request.get("end_use") is not None and not (isinstance(request["end_use"], str)
                                                    and _END_USE.match(request["end_use"])):
        return "its request's end use is not a short name"
    try:
        _thresholds(request.get("thresholds"))
        capability.parse(request.get("restrictions"))
    except (StepError, capability.RestrictionError) as error:
        return str(error)
    return None


def _metrics(ref: registry.ModelRef, metric_keys: list[str] | None = None) -> dict[str, float]:
    """A registered model's metrics on this site's test sets: its registry tags, else its metadata's."""
    tagged = {k.removeprefix("factory.metric."): float(v) for k, v in ref.tags.items()
              if k.startswith("factory.metric.")}
    metrics = tagged or {k: float(v) for k, v in (ref.metadata.get("metrics") or {}).items()}
    return {k: v for k, v in metrics.items() if metric_keys is None or k in metric_keys}


def _comparison(ctx: StepContext, ref: registry.ModelRef, metric_keys: list[str],
                own_stages: tuple[str, ...]) -> list[dict[str, Any]]:
    """What a model is compared with on a gate page: the version of it registered before (the one it
    would replace) and this site's own models of `own_stages`, each with its metrics on the same test
    sets (those this site holds them for)."""
    found = []
    if ref.version.isdigit() and int(ref.version) > 1:
        try:
            previous = registry.resolve_model(ctx.paths, f"{ref.name}/{int(ref.version) - 1}")
            found.append({"label": "previous version (it would replace)", "model": previous.uri,
                          "metrics": _metrics(previous, metric_keys)})
        except registry.ModelNotFound:
            pass
    for stage in own_stages:
        try:
            own = registry.resolve_model(ctx.paths, stage)
        except registry.ModelNotFound:
            continue
        metrics = _metrics(own, metric_keys)
        if metrics and own.uri != ref.uri:
            found.append({"label": f"{stage} ({ctx.site}'s own)", "model": own.uri, "metrics": metrics})
    return found


def _required(check: str) -> bool | None:
    """Whether the policy data requires `check` (signature, watermark) of an export; None where it says nothing."""
    from pipelines.policy import policy_data

    required = policy_data().get("release_verification", {}).get(EXPORT, {}).get(check)
    return required if isinstance(required, bool) else None


def _signature_check(ctx: StepContext, ref: registry.ModelRef) -> dict[str, Any]:
    from pipelines.trust.signing import verify_model_dir

    try:
        verify_model_dir(ref.model_dir, paths=ctx.paths, signer_site=ref.metadata["site"])
    except Exception as error:  # any failure is shown as a failed check; the gate denies it too
        return {"passed": False, "required": _required("signature"), "detail": str(error)[:200]}
    return {"passed": True, "required": _required("signature"),
            "detail": f"verified at {ctx.site} against {ref.metadata['site']}'s key"}


def _watermark_check(ctx: StepContext, ref: registry.ModelRef, recipient: str) -> dict[str, Any]:
    """The recipient's mark verified with this site's watermark key, as the release step will."""
    from pipelines.protection.watermark import verify_release

    result = verify_release(ctx, ref.model_dir, recipient=recipient, purpose=EXPORT)
    return {"passed": bool(result.get("verified")), "required": _required("watermark"),
            "detail": f"mark {result.get('mark')} of key {result.get('key_id')}: {result.get('reason') or ''}"[:300]}


def _robustness_check(ctx: StepContext, robustness: dict[str, Any] | None, recipient: str, *,
                      at_gate: bool) -> dict[str, Any]:
    """Robust accuracy as measured at this site, against the policy minimum for exports to
    `recipient` (`release_robustness`) where this site's measurement is the one the gate reads."""
    from pipelines.policy import policy_data

    minimum = policy_data().get("release_robustness", {}).get(recipient, {}).get(EXPORT, {}) if at_gate else {}
    if not robustness or not robustness.get("evaluated"):
        reason = (robustness or {}).get("reason") or "not evaluated"
        return {"passed": False, "required": bool(minimum) if at_gate else None, "detail": str(reason)[:300]}
    accuracy = robustness.get("accuracy") or {}
    shown = ", ".join(f"{key} {value:.3f}" for key, value in accuracy.items() if isinstance(value, (int, float)))
    below = [f"{key} < {floor}" for key, floor in minimum.items()
             if not isinstance(accuracy.get(key), (int, float)) or accuracy[key] < floor]
    where = f"measured at {ctx.site} on {robustness.get('dataset') or 'its test data'}"
    detail = f"{shown} ({where})" + (f"; policy minimum {', '.join(f'{k} {v}' for k, v in minimum.items())}"
                                     if minimum else "")
    return {"passed": not below, "required": bool(minimum) if at_gate else None,
            "detail": detail + (f"; below: {', '.join(below)}" if below else "")}


def membership_limits(owner: str, purpose: str = EXPORT) -> dict[str, float]:
    """The limits `owner`'s policy sets on its membership-inference audit of a model released for
    `purpose` (policy data `membership_audits`; {} when none)."""
    from pipelines.policy import policy_data

    limits = policy_data().get("membership_audits", {}).get(owner, {}).get(purpose, {})
    return {k: float(v) for k, v in limits.items() if isinstance(v, (int, float))} if isinstance(limits, dict) else {}


def membership_summary(result: dict[str, Any] | None) -> str:
    from pipelines.protection.membership import summary

    return summary(result)


def _membership_check(ctx: StepContext, result: dict[str, Any]) -> dict[str, Any]:
    """This site's membership-inference audit against the limits its policy sets for exports (the
    supplier's export gate checks the same figures, signed into this site's decision)."""
    limits = membership_limits(ctx.site)
    over = [f"{key} > {limit}" for key, limit in limits.items()
            if not isinstance(result.get(key), (int, float)) or result[key] > limit]
    shown = (f"AUC {result['auc']:.3f}, TPR@1%FPR {result['tpr_at_1pct_fpr']:.3f} ({result['members']} members, "
             f"{result['non_members']} non-members)" if result.get("audited") else membership_summary(result))
    detail = shown + (f"; limits {', '.join(f'{k} {v}' for k, v in limits.items())}" if limits else "") + (
        f"; over: {', '.join(over)}" if over else "")
    return {"passed": bool(result.get("audited")) and not over, "required": bool(limits), "detail": detail[:400]}


def export_evidence(ctx: StepContext, model: str, recipient: str) -> str:
    """The export-control gate's evidence at the requesting site: the model's metrics on this site's
    test sets beside the version it would replace and this site's own M1, and the checks the
    release step repeats on the sealed directory (signature, the recipient's watermark, robustness)."""
    from pipelines.evidence import model_md
    from pipelines.protection.robustness import release_robustness

    ref = registry.resolve_model(ctx.paths, model)
    metrics = _metrics(ref)
    checks = {"signature": _signature_check(ctx, ref), "watermark": _watermark_check(ctx, ref, recipient),
              "robustness": _robustness_check(ctx, release_robustness(ctx, ref.model_dir, recipient=recipient,
                                                                      purpose=EXPORT), recipient, at_gate=True)}
    if (parity := metrics.pop(PARITY_METRIC, None)) is not None:  # not a test set: export_model's ONNX check
        checks["ONNX parity"] = {"passed": True, "required": None,
                                 "detail": f"largest difference to PyTorch {parity:.2e} on the parity set"}
    stage = ref.metadata.get("stage", "model")
    return model_md({"label": f"{stage} to export", "short": stage, "model": ref.uri, "metrics": metrics},
                    _comparison(ctx, ref, sorted(metrics), ("M1",)), checks,
                    restrictions=ref.metadata.get("restrictions") or {})


def _evidence(review: dict[str, Any]) -> str:
    """The review's gate evidence: the model under review beside what it is compared with, and the checks."""
    from pipelines.evidence import model_md

    return model_md({"label": f"{review['stage']} under review", "short": review["stage"], "model": review["here"],
                     "metrics": review["metrics"]}, review["comparison"], review.get("checks"),
                    restrictions=review.get("restrictions") or {})


@step("receive_review")
def receive_review(ctx: StepContext, *, kind: str, test_sets: dict[str, str]) -> dict[str, Any]:
    """Open the newest review package of `kind`, check the model is the one its request names (digest
    computed here), register it and evaluate it on this site's test data, beside this site's M3/M4."""
    from pipelines.learning.artifacts import model_digest
    from pipelines.protection.membership import owner_audit, record_audit
    from pipelines.protection.robustness import received_robustness
    from pipelines.trust.packages import PackageRejected

    def check(header: dict[str, Any], meta: dict[str, Any], model_dir: Path) -> None:
        request = header["metadata"].get("request")
        if problem := _request_problem(request, header):
            raise PackageRejected(f"review package from {header['sender']} refused: {problem}")
        if model_digest(model_dir) != request["digest"]:
            raise PackageRejected(f"review package from {header['sender']} refused: the model's digest is not "
                                  f"the {request['digest'][:20]}... its request names")
        try:
            signed = capability.parse(meta.get("restrictions"))
        except capability.RestrictionError as error:
            raise PackageRejected(f"review package from {header['sender']} refused: {error}") from None
        if capability.parse(request.get("restrictions")) != signed:
            raise PackageRejected(f"review package from {header['sender']} refused: its request names restrictions "
                                  f"({capability.describe(capability.parse(request.get('restrictions')))}) the "
                                  f"signed model does not have ({capability.describe(signed)})")

    received = receive_model_package(ctx, kind=kind, test_sets=test_sets, check=check)
    if received is None:
        reviews = [r for r in _records(ctx, REVIEWS).values() if r["kind"] == kind]
        if not reviews:
            raise StepError(f"no acceptable {kind} package in the {ctx.site} inbox ({ctx.paths.inbox})")
        return reviews[-1]
    record, header = received
    request = header["metadata"]["request"]
    here = registry.resolve_model(ctx.paths, f"{record['name']}/{record['version']}")
    # this site's membership-inference audit of the model on its own released rows and test set: only
    # the figures are kept (registry tags, audit log, this review) and signed into the decision
    membership = owner_audit(ctx.paths, here.model_dir, test_sets)
    record_audit(ctx, here, membership)
    review = {
        "review_id": header["package_id"], "kind": kind, "from": header["sender"],
        "request_id": request["request_id"], "model": request["model"], "digest": request["digest"],
        "stage": request["stage"], "destination": request["destination"], "variant": request["variant"],
        "thresholds": _thresholds(request.get("thresholds")), "requested_by": request["requested_by"],
        "end_use": request.get("end_use"), "restrictions": capability.parse(request.get("restrictions")),
        "here": f"{record['name']}/{record['version']}", "metrics": record["metrics"],
        "comparison": _comparison(ctx, here, sorted(record["metrics"]), ("M3", "M4")),
        "checks": {"signature": {"passed": True, "required": _required("signature"),
                                 "detail": f"signature, provenance and BOM verified against {header['sender']}'s key "
                                           "at intake here"},
                   # the mark is verified with the supplier's secret key, at the supplier's export gate
                   "watermark": {"passed": None, "required": _required("watermark"),
                                 "detail": f"verified by {header['sender']} with its watermark key at release"},
                   "robustness": _robustness_check(ctx, received_robustness(ctx, record, test_sets),
                                                   request["destination"], at_gate=False),
                   "membership inference": _membership_check(ctx, membership)},
        "membership": membership, "membership_summary": membership_summary(membership),
        "status": "pending",
    }
    review["evidence"] = _evidence(review)
    _remember(ctx, REVIEWS, review["review_id"], review)
    print(f"review of {review['model']} for {review['from']} (request {review['request_id']}): {review['metrics']}")
    return review


@step("send_approval")
def send_approval(ctx: StepContext, *, review: str | dict, approval: Any, recipient: str, kind: str,
                  gate_name: str = GATE, required_role: str = OWNER_ROLE) -> dict[str, Any]:
    """Verify this site's officer's signed answer on a review and send the decision (approve or reject)
    to the requesting site `recipient` as an approval document signed by this site."""
    from pipelines.approvals import sign_document, verified_decision
    from pipelines.protection.membership import signed_figures
    from pipelines.trust import audit

    review_id = review.get("review_id") if isinstance(review, dict) else review
    if not isinstance(review_id, str) or not _PACKAGE_ID.match(review_id):
        raise StepError(f"no review id in {str(review)[:80]}")
    record = _records(ctx, REVIEWS).get(review_id)
    if record is None:
        raise StepError(f"{ctx.site} has received no review {review_id}")
    if record["from"] != recipient:
        raise StepError(f"review {review_id} came from {record['from']}; its decision goes back there, not to {recipient}")
    key = f"{kind}:{record['request_id']}:{recipient}"
    if sent := _already_sent(ctx, key):
        return sent
    decision = verified_decision(approval, gate_name=gate_name, owner_site=ctx.site, required_role=required_role,
                                 requested_by=record["requested_by"], site_paths=ctx.paths, dag_id=ctx.dag_id,
                                 run_id=ctx.run_id)
    audited = signed_figures(record.get("membership"))
    if audited is not None and audited["model_digest"] != record["digest"]:
        audited = None  # an audit of other weights says nothing about this model
    document = sign_document(ctx.paths, recipient=recipient, gate_name=gate_name, request_id=record["request_id"],
                             model_uri=record["model"], model_digest=record["digest"], approval=decision,
                             answer=approval, end_use=record.get("end_use"), membership_audit=audited)
    scratch = Path(tempfile.mkdtemp(prefix="approval-", dir=ctx.paths.state_dir))
    try:
        content = write_json(scratch / "approval.json", document)
        header, target = _seal_to_outbox(
            ctx, recipient, content, purpose="review", content_type=APPROVAL_CONTENT,
            metadata={"kind": kind, "request_id": record["request_id"], "decision": decision["decision"]})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    audit.append(ctx.paths, action="approval.sent", actor=decision["user"], object=record["request_id"],
                 outcome=decision["decision"], details={"recipient": recipient, "package_id": header["package_id"],
                                                        "model": record["model"], "digest": record["digest"],
                                                        "comment": decision["comment"]})
    with update_json(ctx.paths.state_dir / f"{REVIEWS}.json", {}) as reviews:
        reviews[review_id].update(status=decision["decision"], decision_package=header["package_id"])
    out = {"package": str(target), "package_id": header["package_id"], "recipient": recipient, "kind": kind,
           "request_id": record["request_id"], "decision": decision["decision"], "officer": decision["user"]}
    _remember(ctx, "sent", key, out)
    print(f"{decision['decision']} of request {record['request_id']} by {decision['user']} sealed for {recipient}")
    return out


# ---------------------------------------------------------------------------- requesting site again


def _checked_document(ctx: StepContext, request: dict[str, Any], document: Any, *, gate_name: str,
                      required_role: str) -> dict[str, Any]:
    from pipelines.approvals import verified_document

    return verified_document(document, site_paths=ctx.paths, owner_site=request["reviewer"], gate_name=gate_name,
                             required_role=required_role, request_id=request["request_id"],
                             model_uri=request["model"], model_digest=request["digest"],
                             requested_by=request["requested_by"], end_use=request.get("end_use"))


def _rejected(record: dict[str, Any]) -> StepError:
    return StepError(f"export request {record['request_id']} rejected by {record['officer']} of {record['from']}: "
                     f"{record['comment'] or '(no comment)'}; the request is ended and nothing is released")


@step("receive_approval")
def receive_approval(ctx: StepContext, *, kind: str, gate_name: str = GATE,
                     required_role: str = OWNER_ROLE) -> dict[str, Any]:
    """Open the newest approval document of `kind` and check it against the pending request it names:
    signed by the reviewing site's key, exactly that model digest, an officer the `approval` policy
    allows. An approval marks the request approved; a rejection ends it and fails the run."""
    from pipelines.approvals import ApprovalRefused
    from pipelines.trust import audit
    from pipelines.trust.keys import iso, now
    from pipelines.trust.packages import PackageRejected

    def accept(header: dict[str, Any], content: Path) -> tuple[dict, dict, dict]:
        if header["content_type"] != APPROVAL_CONTENT or header["layout"] != "file":
            raise PackageRejected(f"a {kind} package must hold one approval document, not {header['content_type'][:40]}")
        if content.stat().st_size > MAX_DOCUMENT:
            raise PackageRejected(f"approval document of {content.stat().st_size} bytes (limit {MAX_DOCUMENT})")
        try:
            document = read_json(content)
        except ValueError as error:
            raise PackageRejected(f"approval document is not JSON: {error}") from None
        request_id = document.get("request_id") if isinstance(document, dict) else None
        request = _records(ctx, REQUESTS).get(request_id) if isinstance(request_id, str) else None
        if request is None or request["status"] != IN_REVIEW:
            shown = str(request_id)[:80]
            raise PackageRejected(f"approval document names request {shown!r}, which is not an export request "
                                  f"in review at {ctx.site} ({request['status'] if request else 'unknown'})")
        if header["sender"] != request["reviewer"]:
            raise PackageRejected(f"request {request_id} is reviewed by {request['reviewer']}, not {header['sender']}")
        try:
            approval = _checked_document(ctx, request, document, gate_name=gate_name, required_role=required_role)
        except ApprovalRefused as refused:
            raise PackageRejected(str(refused)) from None
        return document, approval, request

    opened = _intake(ctx, kind, accept)
    if opened is None:
        last = _last_received(ctx, kind)
        if last["decision"] != "approve":
            raise _rejected(last)
        return last
    header, (document, approval, request) = opened
    approved = approval["decision"] == "approve"
    _set_status(ctx, request["request_id"], IN_REVIEW, APPROVED if approved else REJECTED, approval=document,
                decided_at=iso(now()), approval_package=header["package_id"])
    audit.append(ctx.paths, action="export.approved" if approved else "export.rejected", actor=approval["user"],
                 object=request["request_id"], outcome="approve" if approved else "reject",
                 details={"by": header["sender"], "comment": approval["comment"], "model": request["model"],
                          "digest": request["digest"], "package_id": header["package_id"]})
    record = {"package": header["package"], "package_id": header["package_id"], "kind": kind,
              "from": header["sender"], "request_id": request["request_id"], "decision": approval["decision"],
              "officer": approval["user"], "comment": approval["comment"], "model": request["model"],
              "digest": request["digest"], "destination": request["destination"], "variant": request["variant"],
              "thresholds": request["thresholds"], "end_use": request.get("end_use"),
              "restrictions": request.get("restrictions") or {}, "requested_by": request["requested_by"]}
    if approved:
        record["evidence_md"] = export_evidence(ctx, request["model"], request["destination"])
    _remember(ctx, "received", header["package_id"], record)
    if not approved:
        raise _rejected(record)
    print(f"request {request['request_id']} approved by {approval['user']} of {header['sender']}")
    return record


@step("release_export")
def release_export(ctx: StepContext, *, request: str | dict, approvals: Any, recipient: str, kind: str,
                   gate_name: str = GATE, required_role: str = OWNER_ROLE) -> dict[str, Any]:
    """Release an approved export request: its model, to its destination, with its variant and thresholds.

    The data owner's approval document stored with the request is verified again, and so are this
    run's signed gate `approvals`; the `model_release` export gate then decides. `recipient` must be
    the request's destination."""
    from pipelines.learning.artifacts import model_digest
    from pipelines.protection.membership import gate_audit

    record = export_request(ctx, request)
    request_id = record["request_id"]
    key = f"{kind}:{request_id}:{recipient}"
    if record["status"] == RELEASED and (sent := _already_sent(ctx, key)):
        return {**sent, "request_id": request_id}
    if record["status"] != APPROVED:
        raise StepError(f"export request {request_id} is {record['status']}; only a request its data owner "
                        "approved is released")
    if recipient != record["destination"]:
        raise StepError(f"export request {request_id} is for {record['destination']}, not {recipient}")
    owner_approval = _checked_document(ctx, record, record["approval"], gate_name=gate_name,
                                       required_role=required_role)
    if owner_approval["decision"] != "approve":
        raise StepError(f"export request {request_id} was not approved by {record['reviewer']}")
    own = _verified_approvals(ctx, gate_name, approvals, requested_by=record["requested_by"])
    ref = registry.resolve_model(ctx.paths, record["model"])
    if model_digest(ref.model_dir) != record["digest"]:
        raise StepError(f"{ref.uri} no longer has the digest export request {request_id} was approved for")
    # the owner's audit figures as its signed document (verified just now) carries them, as its own
    audited = gate_audit(record["approval"].get("membership_audit"), owner=record["reviewer"])
    sent = release_checked_model(ctx, ref, recipient=record["destination"], purpose=EXPORT, kind=kind, key=key,
                                 approvals=[owner_approval, *own], thresholds=record["thresholds"],
                                 requested_by=record["requested_by"], end_use=record.get("end_use"),
                                 metadata={"request_id": request_id, "end_use": record.get("end_use")},
                                 membership_audits=[audited] if audited else [])
    _set_status(ctx, request_id, APPROVED, RELEASED, release_package=sent["package_id"])
    return {**sent, "request_id": request_id}
