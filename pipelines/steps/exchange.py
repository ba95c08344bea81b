"""Steps that move data and models between sites: sanitize → validate → (approval) → gate → seal,
and on the other side open → verify → register.

Nothing leaves a site except through `release_dataset` / `release_checked_model`
(the `release_model` step, and stage 5's review and export release in
`pipelines.steps.review`), which evaluate the `data_release` / `model_release` gate
themselves right before sealing: there is no path from a model or dataset to another
site's outbox that skips a gate. (An approval document, a site's signed decision on a
partner's request, is the one other thing a site sends: `review.send_approval`.)
Both sides keep small JSON records in the site's state folder so a re-run of a
finished step returns what it did instead of sending or registering twice.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.carrier.outbox import PACKAGE_SUFFIX
from pipelines.config import load_config
from pipelines.data.schema import LABEL_COLUMN
from pipelines.fileio import atomic_path, read_json, update_json, write_json
from pipelines.learning import registry
from pipelines.steps import StepContext, StepError, step
from pipelines.workspace import UnsafeName, safe_name

MODEL_STAGES = frozenset(f"M{n}" for n in range(1, 9))
_ORDER = "recorded"  # position of a state record: what "the last one" means


def dataset_ref(value: str | dict) -> str:
    """Steps take a dataset as a catalog reference or as the output dict of an upstream step."""
    return value["dataset_id"] if isinstance(value, dict) else value


def _records(ctx: StepContext, name: str) -> dict[str, Any]:
    """A state record file, oldest first (JSON state is written key-sorted, so the order is kept apart)."""
    path = ctx.paths.state_dir / f"{name}.json"
    records = read_json(path) if path.exists() else {}
    ordered = sorted(records.items(), key=lambda item: item[1].get(_ORDER, 0))
    return {key: {k: v for k, v in value.items() if k != _ORDER} for key, value in ordered}


def _remember(ctx: StepContext, name: str, key: str, value: dict[str, Any]) -> None:
    with update_json(ctx.paths.state_dir / f"{name}.json", {}) as records:
        order = records[key].get(_ORDER) if key in records else None
        records[key] = {**value, _ORDER: order or 1 + max((r.get(_ORDER, 0) for r in records.values()), default=0)}


def _requester(ctx: StepContext) -> str:
    return ctx.actor or load_config().service_identities[ctx.site].id


# ---------------------------------------------------------------------------- datasets


@step("sanitize_dataset")
def sanitize_dataset(ctx: StepContext, *, dataset: str | dict, purpose: str) -> dict[str, Any]:
    """Sanitize a dataset for release; the result is a new catalog version whose parent is the input."""
    from pipelines.data.lineage import entry, lineage_entries
    from pipelines.data.sanitize import report_paths
    from pipelines.data.sanitize import sanitize_dataset as run_sanitization
    from pipelines.evidence import sanitization_md

    version, report = run_sanitization(ctx.paths, dataset_ref(dataset), purpose, actor=_requester(ctx))
    report_json, report_md = report_paths(ctx.paths.repo / "reports" / "sanitization", version.id)
    print(f"sanitized {version.parents[0]} -> {version.id}: {report['rows_in']} rows in, {report['rows_out']} out")
    evidence = sanitization_md(report, dataset=entry(version), lineage=lineage_entries(ctx.paths, [version.id]),
                               report_name=report_md.name)
    return {"dataset_id": version.id, "source_id": version.parents[0], "report": str(report_json),
            "passed": report["passed"], "remaining_sensitive_columns": report["remaining_sensitive_columns"],
            "evidence_md": evidence}


@step("validate_dataset")
def validate_dataset(ctx: StepContext, *, dataset: str | dict, suite: str = "training") -> dict[str, Any]:
    """Run a Great Expectations suite; a failing version is quarantined and the step fails naming why."""
    from pipelines.data.catalog import get
    from pipelines.data.validate import validate_dataset as run_suite
    from pipelines.evidence import validation_md

    version = get(ctx.paths, dataset_ref(dataset))
    result = run_suite(ctx.paths, version, suite, actor=_requester(ctx))
    print(f"{version.id}: suite {suite} passed")
    return {"dataset_id": version.id, "md5": version.md5, "suite": suite, "success": result.success,
            "evidence_md": validation_md(result.to_dict())}


@step("split_holdout")
def split_holdout(ctx: StepContext, *, dataset: str | dict, fraction: float = 1 / 3) -> dict[str, Any]:
    """Split a dataset into `<name>-train` and `<name>-holdout` (stratified, seeded)."""
    from sklearn.model_selection import train_test_split

    from pipelines.data.catalog import load_dataset, register_dataset

    frame, source = load_dataset(ctx.paths, dataset_ref(dataset))
    train, holdout = train_test_split(frame, test_size=fraction, random_state=load_config().stages.seed,
                                      stratify=frame[LABEL_COLUMN] if frame[LABEL_COLUMN].value_counts().min() > 1 else None)
    out = {}
    for part, rows in (("train", train), ("holdout", holdout)):
        target = source.path.with_name(f"{source.name}-{part}.parquet")
        with atomic_path(target) as tmp:
            rows.sort_index().to_parquet(tmp, index=False)
        version = register_dataset(ctx.paths, f"{source.name}-{part}", target, parents=[source.id],
                                   kind="derived", flags=source.flags)
        out[part] = version.id
    return {"dataset_id": out["train"], "train": out["train"], "holdout": out["holdout"]}


def _already_sent(ctx: StepContext, key: str) -> dict[str, Any] | None:
    """What an earlier run of this release sealed, if its package is still in the outbox."""
    record = _records(ctx, "sent").get(key)
    if record and Path(record["package"]).exists():
        print(f"already sent: {record['package']}")
        return record
    return None


def _seal_to_outbox(ctx: StepContext, recipient: str, src: Path, **seal_options: Any) -> tuple[dict, Path]:
    """Seal for `recipient` into this site's own outbox; a carrier delivers it (pipelines.carrier), at
    once from here where the deployment names the recipient's inbox (`push_now`)."""
    from pipelines.carrier.outbox import seal_to_outbox
    from pipelines.carrier.push import push_now

    header, delivery = seal_to_outbox(ctx.paths, recipient, src, **seal_options)
    if (pushed := push_now(ctx.paths, delivery["package_id"])) is not None:
        print(f"pushed to {recipient}: {pushed['state']}"
              + (f" ({pushed['reason'] or pushed['last_error']})" if pushed["state"] != "delivered" else ""))
    return header, ctx.paths.outbox / delivery["file"]


def _verified_approvals(ctx: StepContext, gate: str, answers: Any, *,
                        requested_by: str | None = None) -> list[dict[str, Any]]:
    """The approvals for this release: each a signed gate answer of this run, checked here.

    A step never takes an approval on another task's word: each answer must carry its owner
    site's signature (checked with this site's trust store) and pass the `approval` policy here
    (pipelines.approvals); refusals are audited at this site."""
    from pipelines.approvals import ApprovalRefused, answer_owner, verify_answer
    from pipelines.trust import audit

    if not answers:
        return []
    approvals = []
    for answer in answers if isinstance(answers, list) else [answers]:
        try:
            owner = answer_owner(answer)
        except ApprovalRefused as refused:
            audit.append(ctx.paths, action="approval.answered", actor="unknown", object=gate, outcome="invalid",
                         details={"dag_id": ctx.dag_id, "run_id": ctx.run_id, "reason": str(refused)})
            raise
        approvals.append(verify_answer(answer, gate_name=gate, owner_site=owner,
                                       requested_by=requested_by or _requester(ctx), site_paths=ctx.paths,
                                       dag_id=ctx.dag_id, run_id=ctx.run_id))
    return approvals


def _gate(ctx: StepContext, gate: str, document: dict[str, Any]) -> None:
    from pipelines.policy import evaluate

    decision = evaluate(gate, document, site=ctx.site, home=ctx.paths.home)
    if not decision.allow:
        raise StepError(f"{gate} gate denied: " + "; ".join(decision.reasons))
    print(f"{gate} gate allowed")


@step("release_dataset")
def release_dataset(ctx: StepContext, *, dataset: str | dict, recipient: str, purpose: str, kind: str,
                    approvals: Any = None, validation: dict | None = None) -> dict[str, Any]:
    """data_release gate, then seal the dataset for `recipient` into its inbox."""
    from pipelines.data.catalog import content_path, load_dataset
    from pipelines.data.lineage import lineage_entries
    from pipelines.data.sanitize import read_report

    kept_by = load_config().stages.kept_home().get((recipient, kind))  # kind: the name it gets at the recipient
    if kept_by is not None:
        raise StepError(f"stage {kept_by} is federated: {ctx.site}'s data stays home and is not released to "
                        f"{recipient} ({kind}); conf/stages.yaml collaboration")
    frame, version = load_dataset(ctx.paths, dataset_ref(dataset), action="share", purpose=purpose)
    key = f"{kind}:{version.md5}:{recipient}"
    if sent := _already_sent(ctx, key):
        return sent
    report = read_report(ctx.paths.repo / "reports" / "sanitization", version.id)
    document = {
        "dataset": {
            "id": version.id, "owner": version.owner, "classification": version.flags["classification"],
            "local_only": version.flags["local_only"],
            "sanitization": {"passed": bool(report and report["passed"]),
                             "remaining_sensitive_columns": report["remaining_sensitive_columns"] if report else ["unknown: no sanitization report"]},
            "validation": {"success": bool(validation and validation.get("success")
                                           and validation.get("dataset_id") == version.id)},
        },
        "recipient": recipient, "purpose": purpose, "requested_by": _requester(ctx),
        "approvals": _verified_approvals(ctx, "data_release", approvals),
    }
    _gate(ctx, "data_release", document)
    header, target = _seal_to_outbox(
        ctx, recipient, content_path(ctx.paths, version), purpose=purpose, content_type="dataset",
        metadata={"kind": kind, "dataset": version.id, "md5": version.md5, "flags": version.flags,
                  "owner": version.owner, "rows": len(frame), "approvals": document["approvals"],
                  "lineage": lineage_entries(ctx.paths, [version.id])})
    record = {"package": str(target), "package_id": header["package_id"], "dataset_id": version.id,
              "recipient": recipient, "kind": kind}
    _remember(ctx, "sent", key, record)
    print(f"sealed {version.id} for {recipient}: {target.name}")
    return record


def _pending_packages(ctx: StepContext, kind: str) -> list[Path]:
    """Unopened packages of `kind` in the inbox, newest first."""
    done = {r["package"] for r in _records(ctx, "received").values()}
    named = re.compile(rf"^{re.escape(kind)}-[0-9a-f]{{12,32}}{re.escape(PACKAGE_SUFFIX)}$")
    return sorted((p for p in ctx.paths.inbox.iterdir() if named.match(p.name) and str(p) not in done),
                  key=lambda p: p.stat().st_mtime, reverse=True) if ctx.paths.inbox.is_dir() else []


def _reject(ctx: StepContext, package: Path, reason: str) -> None:
    """Move a refused package to `inbox/rejected/` with its reason, so it blocks nothing and is kept for review."""
    from pipelines.trust import audit

    rejected = ctx.paths.inbox / "rejected"
    rejected.mkdir(parents=True, exist_ok=True)
    write_json(rejected / f"{package.name}.reason.json", {"package": package.name, "reason": reason})
    os.replace(package, rejected / package.name)
    audit.append(ctx.paths, action="package.quarantined", actor=f"svc-{ctx.site}", object=package.name,
                 outcome="rejected", details={"reason": reason, "moved_to": str(rejected / package.name)})
    print(f"rejected {package.name}: {reason}")


def _intake(ctx: StepContext, kind: str, accept: Callable[[dict[str, Any], Path], Any]) -> tuple[dict, Any] | None:
    """Open the newest acceptable package of `kind`: `accept(header, content)` checks and places the
    content (raising PackageRejected for content that must be refused). Every package that fails is
    moved to `inbox/rejected/` and the next one is tried. None when no package is pending."""
    from pipelines.trust.packages import PackageRejected, open_package

    for package in _pending_packages(ctx, kind):
        scratch = Path(tempfile.mkdtemp(prefix="open-", dir=ctx.paths.state_dir))
        try:
            header = open_package(ctx.paths, package, scratch / "out")
            placed = accept(header, Path(header["path"]))
        except PackageRejected as refused:
            _reject(ctx, package, refused.reason)
            continue
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return header | {"package": str(package)}, placed
    return None


def _last_received(ctx: StepContext, kind: str) -> dict[str, Any]:
    """What the last intake of `kind` gave: a re-run of a finished intake returns it instead of failing."""
    records = [r for r in _records(ctx, "received").values() if r["kind"] == kind]
    if records:
        return records[-1]
    raise StepError(f"no acceptable {kind} package in the {ctx.site} inbox ({ctx.paths.inbox})")


@step("receive_dataset")
def receive_dataset(ctx: StepContext, *, kind: str, name: str) -> dict[str, Any]:
    """Open the newest package of `kind` from the inbox and register it as dataset `name`."""
    from pipelines.data.catalog import register_dataset

    target = ctx.paths.data_dir / "received" / f"{safe_name(name, 'dataset name')}.parquet"

    def place(header: dict[str, Any], content: Path) -> None:
        with atomic_path(target) as tmp:
            shutil.copyfile(content, tmp)

    opened = _intake(ctx, kind, place)
    if opened is None:
        return _last_received(ctx, kind)
    header, _ = opened
    meta = header["metadata"]
    version = register_dataset(ctx.paths, name, target, parents=[meta["dataset"]], kind="received",
                               flags=meta["flags"], owner=meta["owner"], upstream=meta["lineage"])
    record = {"package": header["package"], "package_id": header["package_id"], "kind": kind,
              "dataset_id": version.id, "from": header["sender"]}
    _remember(ctx, "received", header["package_id"], record)
    print(f"received {meta['dataset']} from {header['sender']} as {version.id}")
    return record


# ---------------------------------------------------------------------------- models


def release_document(ctx: StepContext, ref: registry.ModelRef, *, recipient: str, purpose: str,
                     approvals: Any = None) -> dict[str, Any]:
    """The model_release gate input for a registered model (design section 6), its approvals
    (signed gate answers of this run) checked here."""
    return _release_input(ctx, ref, recipient=recipient, purpose=purpose,
                          approvals=_verified_approvals(ctx, "model_release", approvals))


def _release_input(ctx: StepContext, ref: registry.ModelRef, *, recipient: str, purpose: str,
                   approvals: list[dict[str, Any]], requested_by: str | None = None,
                   end_use: str | None = None) -> dict[str, Any]:
    from pipelines.trust.signing import verify_model_dir

    meta = ref.metadata
    try:
        verify_model_dir(ref.model_dir, paths=ctx.paths, signer_site=meta["site"])
        signature_ok = True
    except Exception as error:  # any failure is a denial reason, recorded by the gate
        print(f"signature of {ref.uri} does not verify: {error}")
        signature_ok = False
    metrics = {k: float(v) for k, v in meta.get("metrics", {}).items()}
    return {
        "model": {"id": ref.uri, "site": ctx.site, "stage": meta["stage"], "metrics": metrics,
                  # release_checked_model replaces it with the check of the directory it seals
                  "watermark": {"verified": False, "reason": "not checked"},
                  "signature": {"verified": signature_ok}, "lineage": meta.get("lineage", []),
                  # capability restrictions as the signed metadata records them; checked against the licence
                  "restrictions": meta.get("restrictions") or {},
                  # a version a withdrawn contribution revoked here is released to no one (revocation.rego)
                  "revoked": registry.revocation_of(ctx.paths, ref)},
        "recipient": recipient, "purpose": purpose, "requested_by": requested_by or _requester(ctx),
        "approvals": approvals,
        **({"end_use": end_use} if end_use is not None else {}),  # checked against the recipient's licence
    }


@contextlib.contextmanager
def _release_dir(ctx: StepContext, ref: registry.ModelRef, approvals: list[dict[str, Any]]):
    """The directory that is sealed: the registered one, or a copy whose provenance records the approvals
    (signed again, so the signature covers that provenance)."""
    from pipelines.steps.training import write_model_provenance
    from pipelines.trust.signing import sign_model_dir

    if not approvals:
        yield ref.model_dir
        return
    scratch = Path(tempfile.mkdtemp(prefix="release-", dir=ctx.paths.state_dir))
    try:
        release = scratch / ref.model_dir.name
        shutil.copytree(ref.model_dir, release)
        write_model_provenance(ctx, release, approvals=approvals)
        sign_model_dir(ctx.paths, release)
        yield release
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@step("release_model")
def release_model(ctx: StepContext, *, model: str | dict, recipient: str, purpose: str, kind: str,
                  variant: str | None = None, approvals: Any = None,
                  thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """model_release gate, then seal the signed model directory for `recipient` into this site's outbox."""
    ref = registry.resolve_model(ctx.paths, model if isinstance(model, str) else f"{model['name']}/{model['version']}",
                                 variant=variant)
    key = f"{kind}:{ref.uri}:{recipient}"
    if sent := _already_sent(ctx, key):
        return sent
    return release_checked_model(ctx, ref, recipient=recipient, purpose=purpose, kind=kind, key=key,
                                 approvals=_verified_approvals(ctx, "model_release", approvals), thresholds=thresholds)


def release_checked_model(ctx: StepContext, ref: registry.ModelRef, *, recipient: str, purpose: str, kind: str,
                          key: str, approvals: list[dict[str, Any]], thresholds: dict[str, float] | None = None,
                          requested_by: str | None = None, metadata: dict[str, Any] | None = None,
                          end_use: str | None = None,
                          membership_audits: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The run's thresholds and the model_release gate, then seal `ref` for `recipient` into the outbox.

    `approvals` must already be verified by the caller (`_verified_approvals`, or
    `pipelines.approvals.verified_document` for a partner's signed decision); `requested_by`
    (default: who runs this step) is who asked for the release; `metadata` travels in the package
    header beside the model's; `key` names the release in the site's `sent` records (a re-run of a
    finished release returns what it sealed); `end_use` (an export's) goes to the gate, which checks
    it against the recipient's licence; `membership_audits` (`pipelines.protection.membership.gate_audit`
    entries, each from a verified signed document of its owner) go to the gate with the digest of
    the directory sealed, which a data owner's audit must name (owner_audit.rego)."""
    from pipelines.learning.artifacts import model_digest
    from pipelines.protection.release import release_checks
    from pipelines.trust import audit

    if sent := _already_sent(ctx, key):
        return sent
    document = _release_input(ctx, ref, recipient=recipient, purpose=purpose, approvals=approvals,
                              requested_by=requested_by, end_use=end_use)
    for metric, floor in (thresholds or {}).items():  # a run may raise a threshold, never lower it
        value = document["model"]["metrics"].get(metric)
        if value is None or value < floor:
            raise StepError(f"{ref.uri} {metric} {value} is below this run's threshold {floor}")
    with _release_dir(ctx, ref, document["approvals"]) as release:
        # watermark and robustness of the exact directory that is sealed (the signature was checked above)
        document["model"].update(release_checks(ctx, release, recipient=recipient, purpose=purpose))
        document["model"].update(digest=model_digest(release), membership_audits=list(membership_audits or []))
        _gate(ctx, "model_release", document)
        header, target = _seal_to_outbox(
            ctx, recipient, release, purpose=purpose, content_type="model",
            metadata={**(metadata or {}), "kind": kind, "model": ref.uri, "stage": ref.metadata["stage"],
                      "variant": ref.metadata.get("variant"), "approvals": document["approvals"]})
    audit.append(ctx.paths, action="model.released", actor=document["requested_by"], object=ref.uri,
                 outcome="success", details={"recipient": recipient, "purpose": purpose,
                                             "package_id": header["package_id"], "approvals": document["approvals"],
                                             **({"end_use": end_use} if end_use is not None else {})})
    record = {"package": str(target), "package_id": header["package_id"], "model": ref.uri,
              "recipient": recipient, "kind": kind, "purpose": purpose}
    _remember(ctx, "sent", key, record)
    print(f"sealed {ref.uri} for {recipient}: {target.name}")
    return record


def _checked_model(ctx: StepContext, header: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """The received model's metadata, once its signature, provenance and BOM verify against the
    sender's trusted key and the names it carries are safe to use here."""
    from pipelines.trust import bom, keys, provenance
    from pipelines.trust.packages import PackageRejected
    from pipelines.trust.signing import SignatureError, verify_model_dir

    sender = header["sender"]
    try:
        verify_model_dir(model_dir, paths=ctx.paths, signer_site=sender)
        statement = provenance.verify_provenance(model_dir / provenance.PROVENANCE_FILE,
                                                 keys.public_signing_key(ctx.paths, sender))
        bom.validate_bom(model_dir / bom.BOM_FILE)
        meta = read_json(model_dir / "metadata.json")
        safe_name(meta.get("name"), "model name")
    except (SignatureError, provenance.ProvenanceError, bom.BomError, UnsafeName, OSError, ValueError) as error:
        raise PackageRejected(f"model from {sender} refused: {error}") from None
    if meta.get("stage") not in MODEL_STAGES:
        raise PackageRejected(f"model from {sender} names unknown stage {str(meta.get('stage'))[:20]!r}")
    return {"meta": meta, "provenance": statement}


@step("receive_model")
def receive_model(ctx: StepContext, *, kind: str, test_sets: dict[str, str]) -> dict[str, Any]:
    """Open the newest model package of `kind`, verify signature, provenance and BOM, register it and
    evaluate it on this site's test data."""
    from pipelines.protection.membership import received_audit
    from pipelines.protection.robustness import received_robustness

    received = receive_model_package(ctx, kind=kind, test_sets=test_sets)
    if received is not None:  # its robustness on this site's own test data, recorded before it is adopted
        received[0]["robustness"] = received_robustness(ctx, received[0], test_sets)
        # where it holds this site's released data: this site's membership-inference audit of it (figures only)
        received[0]["membership"] = received_audit(ctx, received[0], test_sets)
        _remember(ctx, "received", received[0]["package_id"], received[0])
    return _last_received(ctx, kind) if received is None else received[0]


def receive_model_package(ctx: StepContext, *, kind: str, test_sets: dict[str, str],
                          check: Callable[[dict[str, Any], dict[str, Any], Path], None] | None = None,
                          ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Open, verify, register and evaluate the newest acceptable model package of `kind`: the
    intake record (also kept in the site's `received` records) and the package header, or None
    when no package is pending. `check(header, meta, model_dir)` may refuse a verified model for
    reasons of its own (raising PackageRejected: the package is moved aside and the next one tried)."""
    from pipelines.data.repo import commit_tracked, site_lock
    from pipelines.learning import revocations
    from pipelines.steps.training import _test_metrics
    from pipelines.trust import audit
    from pipelines.trust.packages import PackageRejected

    def place(header: dict[str, Any], model_dir: Path) -> tuple[dict[str, Any], Path]:
        meta = _checked_model(ctx, header, model_dir)["meta"]
        if revoked := revocations.revoked_run(ctx.paths, meta["name"], meta.get("run_key")):
            raise PackageRejected(f"model {meta['name']} (run {meta.get('run_key')}) from {header['sender']} refused: "
                                  f"{ctx.site} holds it as {revocations.describe(revoked)}")
        if check is not None:
            check(header, meta, model_dir)
        target = ctx.paths.models_dir / meta["name"] / f"received-{header['package_id'][:12]}"
        with site_lock(ctx.paths):
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(model_dir, target)
        return meta, target

    opened = _intake(ctx, kind, place)
    if opened is None:
        return None
    header, (meta, target) = opened
    metrics = _test_metrics(ctx, target, test_sets)
    with site_lock(ctx.paths):
        commit_tracked(ctx.paths, [target], f"Receive {meta['name']} from {header['sender']}")
        ref = registry.register(ctx.paths, meta["name"], target, run_id=None, tags={
            "factory.stage": meta["stage"], "factory.site": ctx.site, "factory.received_from": header["sender"],
            "factory.package_id": header["package_id"], "factory.run_key": meta["run_key"],
            "factory.variant": meta.get("variant") or "",
            **{f"factory.metric.{k}": str(v) for k, v in metrics.items()},
        })
    audit.append(ctx.paths, action="model.registered", actor=f"svc-{ctx.site}", object=ref.uri, outcome="success",
                 details={"received_from": header["sender"], "package_id": header["package_id"], "metrics": metrics})
    record = {"package": header["package"], "package_id": header["package_id"], "kind": kind, "name": ref.name,
              "version": ref.version, "stage": meta["stage"], "metrics": metrics, "from": header["sender"]}
    _remember(ctx, "received", header["package_id"], record)
    print(f"received {meta['name']} from {header['sender']}; here: {metrics}")
    return record, header
