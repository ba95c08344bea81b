"""Withdrawal of a contribution: the owner's request, the trainer's officer's approval, new versions
without the data, and the old versions revoked everywhere they were sent.

Each site runs its part in its own Airflow; what passes between sites is sealed packages holding one
signed document each (ECDSA of the sending site, `pipelines.approvals` signatures).

1. `request_revocation` (owner, `factory contribution revoke --owner SITE --dataset ID`): the site
   must own the dataset (its catalog says so); the request covers the dataset and every version this
   site derived from it (the sanitized copy it released) and goes, signed, to every site its `sent`
   records show received one of them (kind `contribution-revocation`).
2. `receive_revocation` (trainer): the request must be signed by its sender, addressed here and name
   datasets the sender owns: one this site knows as another site's is denied (audited, the run
   fails naming the owner). The affected models are the versions this site trained whose lineage
   holds one of the datasets; none is a no-op (said, audited, nothing else done). Otherwise the
   trainer's compliance officer decides at a gate (`contribution_revocation`).
3. `apply_revocation` (trainer): checks the officer's signed answer, marks every affected version
   revoked first (the site's revocation list, read by `factory serve`, then the registry tag), then
   calls `pipelines.steps.unlearning.retrain_without` for each and records the new version as the
   old one's `replaced_by`.
4. `send_revocation_notices` (trainer): a signed notice to each partner its `sent` records show
   holds an old version (kind `contribution-revocation-notice`), naming each by registered name and
   run key (the partner registers received models under its own version numbers), and the new
   version to each partner that received the old one in a collaboration release, as that release
   was sent (the partner's intake DAG registers it; an export needs a new export request).
5. `receive_revocation_notice` (partner): verifies the notice and marks revoked the versions it
   received from the trainer with those run keys, so its `factory serve` stops serving them.

State per revocation id (`state/revocations.json` at each site) makes every step resumable: a
re-run skips what is done (sent packages, marks, retrained models) and goes on from there.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.config import SITES
from pipelines.fileio import read_json, update_json, write_json
from pipelines.learning import registry
from pipelines.steps import StepContext, StepError, step
from pipelines.steps.exchange import (
    _already_sent,
    _intake,
    _records,
    _remember,
    _requester,
    _seal_to_outbox,
    release_checked_model,
)

REQUEST_KIND = "contribution-revocation"
NOTICE_KIND = "contribution-revocation-notice"
REQUEST_TYPE = "factory-revocation-request-v1"
NOTICE_TYPE = "factory-revocation-notice-v1"
GATE = "contribution_revocation"
OFFICER_ROLE = "compliance_officer"
STATE = "revocations"
PURPOSE = "revocation"
MAX_DOCUMENT = 256 * 1024  # bytes of a request or notice
MAX_ITEMS = 1000  # datasets of a request, models of a notice
_REVOCATION_ID = re.compile(r"^rev-[0-9a-f]{24}$")
_DATASET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}/[A-Za-z0-9][A-Za-z0-9._-]{0,99}@[0-9a-f]{4,64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RUN_KEY = re.compile(r"^[0-9a-f]{8,64}$")
PENDING, NOOP, DENIED, REJECTED, APPLIED, NOTIFIED = "pending_approval", "noop", "denied", "rejected", "applied", "notified"


def retrainer():
    """The unlearning engine, `pipelines.steps.unlearning.retrain_without(ctx, *, model, dataset_id)`
    (looked up at each application, so a test can interrupt it)."""
    from pipelines.steps.unlearning import retrain_without

    return retrain_without


def _state_file(ctx: StepContext) -> Path:
    return ctx.paths.state_dir / f"{STATE}.json"


def revocation_record(ctx: StepContext, value: Any) -> dict[str, Any]:
    """The revocation recorded here under the id in `value` (an id or a step output)."""
    revocation_id = value.get("revocation_id") if isinstance(value, dict) else value
    if not isinstance(revocation_id, str) or not _REVOCATION_ID.fullmatch(revocation_id):
        raise StepError(f"no revocation id in {str(value)[:80]}")
    record = _records(ctx, STATE).get(revocation_id)
    if record is None:
        raise StepError(f"{ctx.site} has no revocation {revocation_id}")
    return record


def _update(ctx: StepContext, revocation_id: str, **changes: Any) -> dict[str, Any]:
    from pipelines.trust.keys import iso, now

    with update_json(_state_file(ctx), {}) as records:
        record = records.setdefault(revocation_id, {"revocation_id": revocation_id})
        if "recorded" not in record:
            record["recorded"] = 1 + max((r.get("recorded", 0) for r in records.values()), default=0)
        record.update(changes)
        if "status" in changes:
            record.setdefault("history", []).append({"status": changes["status"], "at": iso(now()),
                                                     "run_id": ctx.run_id})
        return {k: v for k, v in record.items() if k != "recorded"}


def _audit(ctx: StepContext, action: str, revocation_id: str, outcome: str, actor: str | None = None,
           **details: Any) -> None:
    from pipelines.trust import audit

    audit.append(ctx.paths, action=action, actor=actor or f"svc-{ctx.site}", object=revocation_id, outcome=outcome,
                 details=details)


def _send(ctx: StepContext, recipient: str, document: dict[str, Any], *, kind: str, content_type: str,
          revocation_id: str) -> dict[str, Any]:
    """Seal one signed document for `recipient` into the outbox (once per revocation and recipient)."""
    key = f"{kind}:{revocation_id}:{recipient}"
    if sent := _already_sent(ctx, key):
        return sent
    scratch = Path(tempfile.mkdtemp(prefix="revocation-", dir=ctx.paths.state_dir))
    try:
        content = write_json(scratch / f"{content_type}.json", document)
        header, target = _seal_to_outbox(ctx, recipient, content, purpose=PURPOSE, content_type=content_type,
                                         metadata={"kind": kind, "revocation_id": revocation_id})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record = {"package": str(target), "package_id": header["package_id"], "recipient": recipient, "kind": kind,
              "revocation_id": revocation_id}
    _remember(ctx, "sent", key, record)
    return record


def _sign(ctx: StepContext, doc_type: str, document: dict[str, Any]) -> dict[str, Any]:
    from pipelines.approvals import _signed

    return _signed(ctx.paths, doc_type, {"type": doc_type, "signer": ctx.site, **document})


def _accepting(ctx: StepContext, doc_type: str, content_type: str,
               problem_of: Callable[[dict[str, Any]], str | None]) -> Callable[[dict[str, Any], Path], dict[str, Any]]:
    """The intake check of a request or notice package: a signed document of `doc_type` for this site
    (`_opened_document`) in which `problem_of` finds nothing wrong; else refused and audited."""
    from pipelines.trust.packages import PackageRejected

    def accept(header: dict[str, Any], content: Path) -> dict[str, Any]:
        document = _opened_document(ctx, header, content, doc_type=doc_type, content_type=content_type)
        if problem := problem_of(document):
            _audit(ctx, "revocation.denied", document["revocation_id"], "invalid", sender=header["sender"],
                   reason=problem)
            raise PackageRejected(f"{content_type.replace('-', ' ')} from {header['sender']} refused: {problem}")
        return document

    return accept


def _opened_document(ctx: StepContext, header: dict[str, Any], content: Path, *, doc_type: str,
                     content_type: str) -> dict[str, Any]:
    """The signed document a package holds, once it is of `doc_type`, addressed here and signed by
    its sender with a key this site trusts; else PackageRejected (the package is moved aside, audited)."""
    from pipelines.approvals import _signature_problem
    from pipelines.trust.packages import PackageRejected

    sender = header["sender"]
    if header["content_type"] != content_type or header["layout"] != "file":
        raise PackageRejected(f"a {content_type} package must hold one document, not {str(header['content_type'])[:40]}")
    if content.stat().st_size > MAX_DOCUMENT:
        raise PackageRejected(f"{content_type} of {content.stat().st_size} bytes (limit {MAX_DOCUMENT})")
    try:
        document = read_json(content)
    except ValueError as error:
        raise PackageRejected(f"{content_type} is not JSON: {error}") from None
    if not isinstance(document, dict) or document.get("type") != doc_type:
        raise PackageRejected(f"{content_type} from {sender} is not a {doc_type} document")
    if (document.get("signer"), document.get("recipient")) != (sender, ctx.site):
        raise PackageRejected(f"{content_type} from {sender} is signed as {str(document.get('signer'))[:40]} for "
                              f"{str(document.get('recipient'))[:40]}, not by {sender} for {ctx.site}")
    if problem := _signature_problem(ctx.paths, sender, doc_type, document):
        _audit(ctx, "revocation.denied", str(document.get("revocation_id"))[:64], "forged", sender=sender,
               reason=problem)
        raise PackageRejected(f"{content_type} from {sender} refused: not signed by {sender} ({problem})")
    if not (isinstance(document.get("revocation_id"), str) and _REVOCATION_ID.fullmatch(document["revocation_id"])):
        raise PackageRejected(f"{content_type} from {sender} carries no revocation id")
    return document


# ---------------------------------------------------------------------------- owner


def _derived(ctx: StepContext, dataset_id: str) -> list[str]:
    """`dataset_id` and every version of this site's catalog derived from it, oldest first."""
    from pipelines.data import catalog

    versions = catalog.list_datasets(ctx.paths)
    covered = [dataset_id]
    grown = True
    while grown:
        grown = False
        for version in versions:
            if version.id not in covered and set(version.parents) & set(covered) and version.owner == ctx.site:
                covered.append(version.id)
                grown = True
    return covered


@step("request_revocation")
def request_revocation(ctx: StepContext, *, dataset: str) -> dict[str, Any]:
    """Ask every site this site released `dataset` to (or a version derived from it) to withdraw it.

    Only the dataset's owner may ask: a dataset of this catalog owned by another site, or one this
    site does not hold, is refused (audited). A dataset never released is a no-op, said as such."""
    from pipelines.data import catalog
    from pipelines.trust.keys import iso, now

    requester = _requester(ctx)
    if not isinstance(dataset, str) or not dataset.strip():
        raise StepError("name the dataset to withdraw (param `dataset`: site/name@md5, name@md5 or a name)")
    try:
        version = catalog.get(ctx.paths, dataset.strip())
    except catalog.CatalogError as error:
        _audit(ctx, "revocation.refused", str(dataset)[:100], "unknown_dataset", actor=requester, reason=str(error))
        raise StepError(f"{ctx.site} cannot withdraw {str(dataset)[:100]!r}: {error}") from None
    if version.owner != ctx.site:
        _audit(ctx, "revocation.refused", version.id, "not_owner", actor=requester, owner=version.owner)
        raise StepError(f"dataset {version.id} is owned by {version.owner}, not {ctx.site}: only its owner may "
                        "withdraw it")
    revocation_id = "rev-" + hashlib.sha256(f"{ctx.site}\n{version.id}\n{ctx.run_id}".encode()).hexdigest()[:24]
    covered = _derived(ctx, version.id)
    recipients = sorted({r["recipient"] for r in _records(ctx, "sent").values()
                         if r.get("dataset_id") in covered and r.get("recipient") in SITES})
    known = _records(ctx, STATE).get(revocation_id) or {}
    base = {"role": "owner", "owner": ctx.site, "dataset": version.id, "datasets": covered,
            "requested_by": known.get("requested_by") or requester, "recipients": recipients}
    if not recipients:
        _update(ctx, revocation_id, **base, status=NOOP)
        _audit(ctx, "revocation.requested", revocation_id, "noop", actor=requester, dataset=version.id)
        message = f"{version.id} was never released to another site: nothing to withdraw"
        print(message)
        return {"revocation_id": revocation_id, **base, "sent": [], "noop": True, "message": message}
    requested_at = known.get("requested_at") or iso(now())
    _update(ctx, revocation_id, **base, requested_at=requested_at, status=known.get("status") or "requesting")
    sent = []
    for recipient in recipients:
        document = _sign(ctx, REQUEST_TYPE, {
            "revocation_id": revocation_id, "recipient": recipient, "owner": ctx.site, "dataset": version.id,
            "datasets": covered, "requested_by": base["requested_by"], "requested_at": requested_at})
        fresh = _already_sent(ctx, f"{REQUEST_KIND}:{revocation_id}:{recipient}") is None
        record = _send(ctx, recipient, document, kind=REQUEST_KIND, content_type="revocation-request",
                       revocation_id=revocation_id)
        if fresh:
            _audit(ctx, "revocation.requested", revocation_id, "sent", actor=base["requested_by"],
                   recipient=recipient, dataset=version.id, datasets=covered, package_id=record["package_id"])
        sent.append(record)
    _update(ctx, revocation_id, status="requested", sent={r["recipient"]: r["package_id"] for r in sent})
    print(f"revocation {revocation_id} of {version.id} sent to {', '.join(recipients)}")
    return {"revocation_id": revocation_id, **base, "sent": sent, "noop": False}


# ---------------------------------------------------------------------------- trainer


def _request_problem(document: dict[str, Any]) -> str | None:
    datasets = document.get("datasets")
    if not (isinstance(datasets, list) and 0 < len(datasets) <= MAX_ITEMS
            and all(isinstance(d, str) and _DATASET_ID.fullmatch(d) for d in datasets)):
        return "its datasets are not a list of dataset ids"
    if document.get("dataset") not in datasets:
        return "its dataset is not among the datasets it covers"
    if document.get("owner") != document.get("signer"):
        return f"it is signed by {str(document.get('signer'))[:40]} for owner {str(document.get('owner'))[:40]}"
    if not (isinstance(document.get("requested_by"), str) and 0 < len(document["requested_by"]) <= 64):
        return "it names no requester"
    return None


def _dataset_owners(ctx: StepContext) -> dict[str, str]:
    """Every dataset version this site knows, with its owner: its catalog, what the catalog's received
    versions carried (upstream) and the lineage of every model version registered here."""
    from pipelines.data import catalog

    owners: dict[str, str] = {}
    for version in catalog.list_datasets(ctx.paths):
        owners.setdefault(version.id, version.owner)
        for entry in version.upstream:
            if isinstance(entry, dict) and isinstance(entry.get("dataset_id"), str):
                owners.setdefault(entry["dataset_id"], entry.get("owner"))
    for ref in registry.list_models(ctx.paths):
        for entry in _lineage(ref):
            owners.setdefault(entry["dataset_id"], entry.get("owner"))
    return owners


def _lineage(ref: registry.ModelRef) -> list[dict[str, Any]]:
    try:
        lineage = ref.metadata.get("lineage") or []
    except (OSError, ValueError):
        return []
    return [e for e in lineage if isinstance(e, dict) and isinstance(e.get("dataset_id"), str)]


def affected_models(ctx: StepContext, datasets: list[str], owner: str) -> list[dict[str, Any]]:
    """The unrevoked versions this site trained whose lineage holds one of `datasets` of `owner`, by stage
    and version. (A version revoked earlier has its replacement, which is affected in its place.)"""
    wanted = set(datasets)
    found = []
    for ref in registry.list_models(ctx.paths):
        try:
            meta = ref.metadata
        except (OSError, ValueError):
            continue
        if meta.get("site") != ctx.site:
            continue  # a model received from a partner is its trainer's to withdraw
        if registry.revocation_of(ctx.paths, ref) is not None:
            continue  # out of service already; retraining it would bring back what its revocation withdrew
        hits = sorted({e["dataset_id"] for e in _lineage(ref) if e["dataset_id"] in wanted and e.get("owner") == owner})
        if hits:
            found.append({"model": ref.uri, "name": ref.name, "version": ref.version, "stage": meta.get("stage"),
                          "run_key": ref.tags.get("factory.run_key") or meta.get("run_key"), "datasets": hits})
    return sorted(found, key=lambda m: (str(m["stage"]), m["name"], int(m["version"])))


def _evidence(record: dict[str, Any]) -> str:
    rows = "\n".join(f"| `{m['model']}` | {m['stage']} | {', '.join(f'`{d}`' for d in m['datasets'])} |"
                     for m in record["affected"])
    return (f"**{record['owner']}** withdraws its dataset `{record['dataset']}` (and {len(record['datasets']) - 1} "
            f"version(s) derived from it), requested by `{record['requested_by']}`; the request's signature was "
            f"verified here.\n\nOn approval every model below is marked revoked at once (`factory serve` stops "
            "serving it), retrained without the data (`retrain_without`, from the last checkpoint before it where "
            "the training kept one), and the partners holding it are told to revoke it too.\n\n"
            f"| model | stage | withdrawn data in its lineage |\n|---|---|---|\n{rows}\n")


@step("receive_revocation")
def receive_revocation(ctx: StepContext, *, kind: str = REQUEST_KIND) -> dict[str, Any]:
    """Open the newest revocation request of `kind`, verify it and find the models it affects here.

    Returns the revocation record: `noop` when no model here used the data (nothing else is done),
    else `affected` (the versions to retrain and revoke) and `evidence_md` for the officer's gate. A
    request for data this site knows as another site's is denied: audited, and the step fails."""
    opened = _intake(ctx, kind, _accepting(ctx, REQUEST_TYPE, "revocation-request", _request_problem))
    if opened is None:
        records = [r for r in _records(ctx, STATE).values() if r.get("role") == "trainer" and r.get("kind") == kind]
        if not records:
            raise StepError(f"no acceptable {kind} request in the {ctx.site} inbox ({ctx.paths.inbox})")
        if records[-1].get("status") == DENIED:
            raise StepError(f"revocation {records[-1]['revocation_id']} from {records[-1]['owner']} was denied: "
                            f"{records[-1].get('reason')}; nothing is revoked")
        return _outcome(records[-1])
    header, document = opened
    revocation_id, owner = document["revocation_id"], document["owner"]
    _remember(ctx, "received", header["package_id"], {"package": header["package"], "package_id": header["package_id"],
                                                      "kind": kind, "from": owner, "revocation_id": revocation_id})
    base = {"role": "trainer", "kind": kind, "owner": owner, "dataset": document["dataset"],
            "datasets": document["datasets"], "requested_by": document["requested_by"], "request": document,
            "package_id": header["package_id"]}
    known = _records(ctx, STATE).get(revocation_id)
    if known and known.get("status") not in (None, PENDING):
        print(f"revocation {revocation_id} is already {known['status']} here")
        return _outcome(known)
    owners = _dataset_owners(ctx)
    others = sorted({(d, owners[d]) for d in document["datasets"] if d in owners and owners[d] != owner})
    if others:
        reason = "; ".join(f"{d} is owned by {o}, not {owner}" for d, o in others)
        _update(ctx, revocation_id, **base, status=DENIED, reason=reason)
        _audit(ctx, "revocation.denied", revocation_id, "not_owner", actor=document["requested_by"], sender=owner,
               reason=reason, datasets=document["datasets"])
        raise StepError(f"revocation {revocation_id} from {owner} denied: {reason}; only a dataset's owner may "
                        "withdraw it, nothing is revoked")
    affected = affected_models(ctx, document["datasets"], owner)
    if not affected:
        message = (f"no model {ctx.site} trained used {document['dataset']} of {owner}: nothing to retrain or "
                   "revoke (no-op)")
        record = _update(ctx, revocation_id, **base, affected=[], status=NOOP, message=message)
        _audit(ctx, "revocation.received", revocation_id, "noop", actor=document["requested_by"], sender=owner,
               dataset=document["dataset"])
        print(message)
        return _outcome(record)
    record = _update(ctx, revocation_id, **base, affected=affected, status=PENDING)
    record = _update(ctx, revocation_id, evidence_md=_evidence(record))
    _audit(ctx, "revocation.received", revocation_id, "pending_approval", actor=document["requested_by"],
           sender=owner, dataset=document["dataset"], models=[m["model"] for m in affected])
    print(f"revocation {revocation_id} of {document['dataset']} ({owner}) affects "
          f"{', '.join(m['model'] for m in affected)}: waiting for {ctx.site}'s compliance officer")
    return _outcome(record)


def _outcome(record: dict[str, Any]) -> dict[str, Any]:
    """What a trainer step returns (XCom): the record without the request document and history."""
    out = {k: v for k, v in record.items() if k not in ("request", "history")}
    return {**out, "noop": record.get("status") == NOOP}


def _revocation_mark(record: dict[str, Any], replaced_by: str | None) -> dict[str, Any]:
    return {"revocation_id": record["revocation_id"], "dataset": record["dataset"], "owner": record["owner"],
            "replaced_by": replaced_by, "at": record.get("approved_at")}


@step("apply_revocation")
def apply_revocation(ctx: StepContext, *, revocation: str | dict, approval: Any) -> dict[str, Any]:
    """With the officer's signed approval: mark every affected version revoked, then retrain each without
    the withdrawn data (`retrain_without`) and record the new version as its replacement.

    Resumable: a version already retrained is not retrained again; marks are idempotent."""
    from pipelines.approvals import verified_decision
    from pipelines.trust.keys import iso, now

    record = revocation_record(ctx, revocation)
    revocation_id = record["revocation_id"]
    if record.get("status") == NOOP:
        print(record.get("message") or f"revocation {revocation_id}: nothing to do")
        return _outcome(record)
    if record.get("status") in (DENIED, REJECTED):
        raise StepError(f"revocation {revocation_id} was {record['status']}: {record.get('reason') or ''}")
    if record.get("status") == PENDING:
        decision = verified_decision(approval, gate_name=GATE, owner_site=ctx.site, required_role=OFFICER_ROLE,
                                     requested_by=record["requested_by"], site_paths=ctx.paths, dag_id=ctx.dag_id,
                                     run_id=ctx.run_id)
        if decision["decision"] != "approve":
            reason = f"rejected by {decision['user']}: {decision['comment'] or '(no comment)'}"
            _update(ctx, revocation_id, status=REJECTED, reason=reason)
            _audit(ctx, "revocation.rejected", revocation_id, "reject", actor=decision["user"],
                   comment=decision["comment"], owner=record["owner"])
            raise StepError(f"revocation {revocation_id} of {record['dataset']} {reason}; nothing is revoked")
        record = _update(ctx, revocation_id, status="approved", approved_by=decision["user"], approved_at=iso(now()))
        _audit(ctx, "revocation.approved", revocation_id, "approve", actor=decision["user"],
               comment=decision["comment"], models=[m["model"] for m in record["affected"]])
    replaced = dict(record.get("replaced") or {})
    # 1. Every affected version out of service first: no model is ever revoked here and still served.
    for model in record["affected"]:
        ref = registry.resolve_model(ctx.paths, model["model"])
        if registry.revocation_of(ctx.paths, ref) is None:
            registry.mark_revoked(ctx.paths, ref, _revocation_mark(record, None))
            _audit(ctx, "model.revoked", revocation_id, "revoked", model=ref.uri, dataset=record["dataset"],
                   owner=record["owner"])
    # 2. A new version of each without the data; the state is written after each, so a resumed run goes on.
    retrain_without = retrainer() if any(m["model"] not in replaced for m in record["affected"]) else None
    for model in record["affected"]:
        if model["model"] not in replaced:
            result = retrain_without(ctx, model=model["model"], dataset_id=record["dataset"])
            if not isinstance(result, dict) or not isinstance(result.get("model"), str):
                raise StepError(f"retrain_without gave no new version for {model['model']}: {str(result)[:200]}")
            replaced[model["model"]] = {k: result.get(k) for k in
                                        ("model", "resumed_from_slice", "seconds", "full_retrain", "replaced")}
            record = _update(ctx, revocation_id, replaced=replaced)
            _audit(ctx, "revocation.retrained", revocation_id, "success", model=model["model"],
                   new_model=result["model"], full_retrain=result.get("full_retrain"),
                   resumed_from_slice=result.get("resumed_from_slice"), seconds=result.get("seconds"))
        ref = registry.resolve_model(ctx.paths, model["model"])
        if (registry.revocation_of(ctx.paths, ref) or {}).get("replaced_by") != replaced[model["model"]]["model"]:
            registry.mark_revoked(ctx.paths, ref, _revocation_mark(record, replaced[model["model"]]["model"]))
    if record.get("status") != NOTIFIED:
        record = _update(ctx, revocation_id, status=APPLIED)
    for old, new in replaced.items():
        print(f"{old} revoked; replaced by {new['model']} ({'full retrain' if new.get('full_retrain') else 'from slice ' + str(new.get('resumed_from_slice'))}, {new.get('seconds')} s)")
    return _outcome(record)


@step("send_revocation_notices")
def send_revocation_notices(ctx: StepContext, *, revocation: str | dict) -> dict[str, Any]:
    """Tell every partner that received one of the revoked versions (this site's `sent` records) to
    revoke it too: one signed notice per partner, naming each version by name and run key."""
    record = revocation_record(ctx, revocation)
    revocation_id = record["revocation_id"]
    if record.get("status") == NOOP:
        return {**_outcome(record), "notices": []}
    if record.get("status") not in (APPLIED, NOTIFIED):
        raise StepError(f"revocation {revocation_id} is {record.get('status')}; notices follow its application")
    replaced = record.get("replaced") or {}
    holders: dict[str, list[dict[str, Any]]] = {}
    for model in record["affected"]:
        for sent in _records(ctx, "sent").values():
            if sent.get("model") == model["model"] and sent.get("recipient") in SITES:
                entries = holders.setdefault(sent["recipient"], [])
                if all(e["uri"] != model["model"] for e in entries):
                    entries.append({"name": model["name"], "run_key": model["run_key"], "uri": model["model"],
                                    "replaced_by": (replaced.get(model["model"]) or {}).get("model")})
    notices = []
    for recipient, models in sorted(holders.items()):
        fresh = _already_sent(ctx, f"{NOTICE_KIND}:{revocation_id}:{recipient}") is None
        document = _sign(ctx, NOTICE_TYPE, {"revocation_id": revocation_id, "recipient": recipient,
                                            "owner": record["owner"], "dataset": record["dataset"], "models": models,
                                            "approved_by": record.get("approved_by"), "at": record.get("approved_at")})
        sent = _send(ctx, recipient, document, kind=NOTICE_KIND, content_type="revocation-notice",
                     revocation_id=revocation_id)
        if fresh:
            _audit(ctx, "revocation.notice_sent", revocation_id, "sent", recipient=recipient,
                   models=[m["uri"] for m in models], package_id=sent["package_id"])
        notices.append({**sent, "models": [m["uri"] for m in models]})
    deliveries = _deliver_replacements(ctx, record)
    record = _update(ctx, revocation_id, status=NOTIFIED, notices={n["recipient"]: n["package_id"] for n in notices})
    print(f"revocation {revocation_id}: notices to {', '.join(holders) or 'no partner (none holds a revoked version)'}")
    return {**_outcome(record), "notices": notices, "deliveries": deliveries}


def _deliver_replacements(ctx: StepContext, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Send each replacement to the partners that received the revoked version in a collaboration
    release, as that release was sent (same package kind, so the partner's intake DAG takes it), through
    the model_release gate. An export is not re-sent: a new version needs a new export request and the
    officers' approvals."""
    deliveries = []
    for old, new in sorted((record.get("replaced") or {}).items()):
        for sent in list(_records(ctx, "sent").values()):
            if sent.get("model") != old or sent.get("recipient") not in SITES:
                continue
            if sent.get("purpose") != "collaboration":
                print(f"{new['model']} is not sent to {sent['recipient']} in place of {old} "
                      f"({sent.get('purpose') or 'an earlier'} release): that needs a new request")
                continue
            ref = registry.resolve_model(ctx.paths, new["model"])
            key = f"{sent['kind']}:{ref.uri}:{sent['recipient']}"  # release_model's key: a re-run sends nothing twice
            delivered = release_checked_model(ctx, ref, recipient=sent["recipient"], purpose="collaboration",
                                              kind=sent["kind"], key=key, approvals=[],
                                              metadata={"replaces": old, "revocation_id": record["revocation_id"]})
            deliveries.append({"model": ref.uri, "replaces": old, "recipient": sent["recipient"],
                               "package_id": delivered["package_id"]})
    return deliveries


# ---------------------------------------------------------------------------- partner


def _notice_problem(document: dict[str, Any]) -> str | None:
    models = document.get("models")
    if not (isinstance(models, list) and 0 < len(models) <= MAX_ITEMS and all(
            isinstance(m, dict) and isinstance(m.get("name"), str) and _NAME.fullmatch(m["name"])
            and isinstance(m.get("run_key"), str) and _RUN_KEY.fullmatch(m["run_key"])
            and (m.get("replaced_by") is None or (isinstance(m["replaced_by"], str) and len(m["replaced_by"]) <= 200))
            for m in models)):
        return "its models are not a list of {name, run_key, replaced_by}"
    if not all(isinstance(document.get(k), str) and 0 < len(document[k]) <= 200 for k in ("owner", "dataset")):
        return "it names no owner and dataset"
    return None


def _held_versions(ctx: StepContext, name: str, run_key: str, sender: str) -> list[registry.ModelRef]:
    """The versions of `name` this site received from `sender` that were trained in run `run_key`."""
    from mlflow.exceptions import MlflowException

    try:
        versions = registry.client(ctx.paths).search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
    return [registry.resolve_model(ctx.paths, f"{v.name}/{v.version}") for v in versions
            if v.tags.get("factory.run_key") == run_key and v.tags.get("factory.received_from") == sender]


@step("receive_revocation_notice")
def receive_revocation_notice(ctx: StepContext, *, kind: str = NOTICE_KIND) -> dict[str, Any]:
    """Open the newest revocation notice of `kind`, verify the trainer's signature and mark revoked here
    the versions it names that this site received from that trainer (its `factory serve` then refuses
    them, and answers 410 where one is being served)."""
    opened = _intake(ctx, kind, _accepting(ctx, NOTICE_TYPE, "revocation-notice", _notice_problem))
    if opened is None:
        records = [r for r in _records(ctx, STATE).values() if r.get("role") == "holder" and r.get("kind") == kind]
        if not records:
            raise StepError(f"no acceptable {kind} notice in the {ctx.site} inbox ({ctx.paths.inbox})")
        return {k: v for k, v in records[-1].items() if k != "history"}
    header, document = opened
    sender, revocation_id = header["sender"], document["revocation_id"]
    _remember(ctx, "received", header["package_id"], {"package": header["package"], "package_id": header["package_id"],
                                                      "kind": kind, "from": sender, "revocation_id": revocation_id})
    revoked, unknown = [], []
    for model in document["models"]:
        held = _held_versions(ctx, model["name"], model["run_key"], sender)
        if not held:
            unknown.append(model["name"])
        for ref in held:
            mark = {"revocation_id": revocation_id, "dataset": document["dataset"], "owner": document["owner"],
                    "replaced_by": model.get("replaced_by"), "at": document.get("at")}
            if registry.revocation_of(ctx.paths, ref) is None:
                _audit(ctx, "model.revoked", revocation_id, "revoked", actor=f"svc-{ctx.site}", model=ref.uri,
                       notified_by=sender, trainer_uri=model.get("uri"), dataset=document["dataset"],
                       owner=document["owner"])
            registry.mark_revoked(ctx.paths, ref, mark)
            revoked.append(ref.uri)
    record = _update(ctx, revocation_id, role="holder", kind=kind, status="revoked", sender=sender,
                     owner=document["owner"], dataset=document["dataset"], revoked=revoked, not_held=unknown,
                     package_id=header["package_id"])
    print(f"revocation {revocation_id} from {sender}: revoked {', '.join(revoked) or 'nothing held here'}")
    return {k: v for k, v in record.items() if k != "history"}
