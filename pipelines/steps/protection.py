"""Model-protection steps: screening received contributions for poisoning before training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.fileio import read_json, update_json, write_json
from pipelines.steps import StepContext, StepError, step

SCREENING_REPORTS = ("reports", "screening")  # under the site repo, beside reports/sanitization
QUARANTINE_PREFIX = "poisoning screen"


def screening_report_path(ctx: StepContext, version) -> Path:
    """Where the screen of a dataset version is reported (its catalog name and md5, both the site's own)."""
    return ctx.paths.repo.joinpath(*SCREENING_REPORTS, f"{version.name}-{version.md5[:12]}.json")


def _actor(ctx: StepContext) -> str:
    from pipelines.config import load_config

    return ctx.actor or load_config().service_identities[ctx.site].id


def _refuse(version, report: dict[str, Any]) -> StepError:
    classes = ", ".join(str(c) for c in report["flagged_classes"])
    return StepError(
        f"dataset {version.id} is quarantined: the poisoning screen found {len(report['suspicious_rows'])} "
        f"suspicious record(s) (a learnt trigger pattern labelled as class {classes}); nothing trains on it. "
        f"Report: {report['report']}")


@step("screen_dataset")
def screen_dataset(ctx: StepContext, *, dataset: str | dict, model: str) -> dict[str, Any]:
    """Screen a received dataset version for a backdoor with the current `model` (M1..M8 or a registry
    reference) before anything trains on it (`pipelines.protection.poisoning`).

    A poisoned version is quarantined in the catalog (kept, never usable again), its suspicious records
    (row indices and record ids) are reported under the site repo's reports/screening and audited, and
    the step fails naming the dataset and the count, so the run stops before train_model. A clean one
    passes with the per-class statistics. Re-running returns the recorded screen of the same version
    and model (or fails again for a quarantined one) without screening twice.
    """
    from pipelines.data.catalog import get, load_dataset, quarantine
    from pipelines.data.spec import SpecError, spec_of
    from pipelines.learning import families, registry
    from pipelines.learning.artifacts import load_model, model_digest
    from pipelines.protection import settings
    from pipelines.protection.poisoning import ScreenSettings
    from pipelines.protection.poisoning import screen as run_screen
    from pipelines.steps.exchange import dataset_ref
    from pipelines.trust import audit

    version = get(ctx.paths, dataset_ref(dataset))
    report_path = screening_report_path(ctx, version)
    if version.status == "quarantined":
        if report_path.exists() and (version.quarantine_reason or "").startswith(QUARANTINE_PREFIX):
            raise _refuse(version, read_json(report_path))
        load_dataset(ctx.paths, version)  # raises DatasetQuarantined naming the quarantine
    try:
        ref = registry.resolve_model(ctx.paths, model)
    except registry.ModelNotFound as exc:
        raise StepError(f"cannot screen {version.id}: {exc}") from None
    digest = model_digest(ref.model_dir)
    key = f"{version.md5}:{digest}"
    state = ctx.paths.state_dir / "screened.json"
    done = (read_json(state) if state.exists() else {}).get(key)
    if done is not None and report_path.exists():
        print(f"{version.id}: already screened with {done['model']}: clean")
        return done
    try:
        conf = ScreenSettings.of(settings("screening"))
    except (TypeError, ValueError) as exc:
        raise StepError(f"conf/protection.yaml screening: {exc}") from None
    frame, version = load_dataset(ctx.paths, version, action="train", purpose="training")
    try:
        spec = families.metadata_spec(ref.metadata)
        data_spec = spec_of(version.extra)
        problem = families.spec_mismatch(spec, data_spec, expected_is=f"{ref.uri} takes",
                                         actual_is=f"{version.id} holds")
        if problem:
            raise StepError(f"cannot screen {version.id} with {ref.uri}: {problem}")
        x, y = data_spec.features(frame), data_spec.labels(frame)
    except (SpecError, families.FamilyError, KeyError, ValueError) as exc:
        raise StepError(f"cannot screen {version.id}: its rows do not fit its spec: {exc}") from None
    result = run_screen(load_model(ref.model_dir), x, y, n_classes=spec.n_classes, settings=conf)
    ids = frame[data_spec.id_column].astype(str).tolist() if data_spec.id_column in frame else None
    suspicious = [{"row": row, **({"id": ids[row]} if ids else {}), "label": int(y[row])}
                  for row in result.suspicious_rows]
    report = {"dataset_id": version.id, "md5": version.md5, "owner": version.owner, "model": ref.uri,
              "model_digest": digest, "report": str(report_path), **result.to_dict(),
              "suspicious_records": suspicious, "screened_by": _actor(ctx), "dag_run_id": ctx.run_id}
    write_json(report_path, report)
    summary = {"dataset_id": version.id, "model": ref.uri, "rows": result.rows, "poisoned": result.poisoned,
               "suspicious": len(result.suspicious_rows), "flagged_classes": result.flagged_classes,
               "method": result.method, "seconds": round(result.seconds, 3), "report": str(report_path)}
    audit.append(ctx.paths, action="dataset.screened", actor=_actor(ctx), object=version.id,
                 outcome="poisoned" if result.poisoned else "clean",
                 details={**summary, "suspicious_ids": [r.get("id", r["row"]) for r in suspicious][:200]})
    if result.poisoned:
        reason = (f"{QUARANTINE_PREFIX}: {len(suspicious)} suspicious record(s) in class(es) "
                  f"{json.dumps(result.flagged_classes)} screened with {ref.uri}; see {report_path.name}")
        quarantine(ctx.paths, version, reason, actor=_actor(ctx))
        raise _refuse(version, report)
    out = {**summary, "per_class": report["per_class"]}
    with update_json(state, {}) as records:
        records[key] = out
    print(f"{version.id}: screened with {ref.uri} in {result.seconds:.2f}s: clean ({result.rows} rows)")
    return out
