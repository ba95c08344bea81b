"""Unlearning: a new version of a model this site trained, without a withdrawn dataset.

`retrain_without` is what a withdrawal of a contribution calls at the trainer for each model whose
lineage reaches the dataset. A model trained in slices (pipelines.learning.slices) trains again only
the slices from the first that held the dataset, from the checkpoint before it; the result is the
model its schedule gives when the dataset was never there. A model trained unsliced, or whose base
model changes, is trained again in full (`full_retrain`). A model fine-tuned from a base that saw
the dataset is trained from a clean base: the base's own new version first (when this site trained
it), or the `clean_base` the flow names (a base trained by another site, replaced there). The new
version passes the same steps as any training run (evaluate, export with ONNX parity, register),
and its metadata (`unlearned`) and version tag (`factory.unlearned`) name the version it replaces
and the dataset withdrawn. Running it again returns the same new version (the run key decides).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipelines.config import load_config
from pipelines.learning import registry
from pipelines.steps import StepContext, StepError

UNLEARNED_TAG = "factory.unlearned"


def reaches(meta: dict[str, Any], dataset_id: str) -> bool:
    """Whether a model's lineage proof (metadata.json `lineage`, its base chain included) reaches the dataset."""
    return any(entry.get("dataset_id") == dataset_id for entry in meta.get("lineage") or [])


def models_reaching(ctx: StepContext, dataset_id: str) -> list[dict[str, Any]]:
    """Every model version this site holds whose lineage reaches `dataset_id`, oldest first:
    {"model": NAME/VERSION, "trained_here": bool (else received: its trainer makes the new version),
    "replaced_by": NAME/VERSION of its version without the dataset, or None}."""
    refs = registry.list_models(ctx.paths)
    replaced = {}
    for ref in refs:
        if UNLEARNED_TAG in ref.tags:
            record = json.loads(ref.tags[UNLEARNED_TAG])
            if record.get("dataset") == dataset_id:
                replaced[record["replaced"]] = ref.uri
    out = []
    for ref in sorted(refs, key=lambda r: (r.name, int(r.version))):
        meta = ref.metadata
        if reaches(meta, dataset_id):
            out.append({"model": ref.uri, "trained_here": meta.get("site") == ctx.site,
                        "replaced_by": replaced.get(ref.uri)})
    return out


def _withdrawn_inputs(ctx: StepContext, meta: dict[str, Any], dataset_id: str) -> list[str]:
    """The model's training datasets whose lineage reaches `dataset_id` (itself or an ancestor)."""
    from pipelines.data.lineage import lineage_entries

    hits = []
    for used in meta.get("datasets") or []:
        if used["id"] == dataset_id or any(e["dataset_id"] == dataset_id for e in lineage_entries(ctx.paths, [used["id"]])):
            hits.append(used["id"])
    return hits


def _stage_inputs(stage: str):
    try:
        return load_config().stages.inputs.model(stage)
    except KeyError as exc:
        raise StepError(f"no conf/stages.yaml inputs for {stage}: cannot evaluate its new version ({exc})") from None


def _clean_base(ctx: StepContext, meta: dict[str, Any], dataset_id: str, clean_base: str | None,
                chain: list[dict[str, Any]]) -> str | None:
    """The base model reference the new version fine-tunes: the same base when it never saw the
    dataset, else its replacement (retrained here first, when this site trained it)."""
    recorded = meta.get("base_model")
    if not recorded:
        return None
    base_ref = f"{recorded['name']}/{recorded['version']}"
    try:
        base = registry.resolve_model(ctx.paths, base_ref)
    except registry.ModelNotFound as exc:
        raise StepError(f"{meta['name']}: its base model {base_ref} is not held here: {exc}") from None
    base_meta = base.metadata
    if not reaches(base_meta, dataset_id):
        return base_ref
    if clean_base:
        replacement = registry.resolve_model(ctx.paths, clean_base)
        if reaches(replacement.metadata, dataset_id):
            raise StepError(f"the clean base {replacement.uri} named for {meta['name']} still reaches {dataset_id}")
        return replacement.uri
    if base_meta.get("site") != ctx.site:
        raise StepError(f"{meta['name']} was fine-tuned from {base_ref}, trained by {base_meta.get('site')} on "
                        f"data reaching {dataset_id}: that site's new version must arrive first (clean_base)")
    result = _retrain(ctx, base, dataset_id, clean_base=None, chain=chain)
    return result["model"]


def retrain_without(ctx: StepContext, *, model: str, dataset_id: str, clean_base: str | None = None) -> dict[str, Any]:
    """A new registered version of `model` (a registry reference: M1..M8, NAME/VERSION, NAME@ALIAS)
    trained without `dataset_id` (a catalog id, `site/name@md5`, as lineage entries name it).

    Returns {"replaced": NAME/VERSION, "model": NAME/NEWVERSION, "resumed_from_slice": k or None,
    "seconds": s, "train_seconds": s, "full_retrain": bool, "dataset": id, "chain": [...]}: `resumed_from_slice` is the
    first slice trained again (those before came from their checkpoints), `chain` every new version
    made, base models first (the last is this one). A model whose lineage does not reach the dataset
    is left alone: {"replaced": None, "model": NAME/VERSION, "noop": True, "reason": ...}.
    `clean_base`: the replacement of a base model trained by another site."""
    try:
        ref = registry.resolve_model(ctx.paths, model)
    except registry.ModelNotFound as exc:
        raise StepError(str(exc)) from None
    meta = ref.metadata
    if not reaches(meta, dataset_id):
        reason = f"the lineage of {ref.uri} does not reach {dataset_id}: nothing to unlearn"
        print(reason)
        return {"replaced": None, "model": ref.uri, "dataset": dataset_id, "noop": True, "reason": reason,
                "resumed_from_slice": None, "seconds": 0.0, "full_retrain": False, "chain": []}
    if meta.get("site") != ctx.site:
        raise StepError(f"{ref.uri} was trained by {meta.get('site')}, not {ctx.site}: only its trainer can "
                        "train it again without the dataset")
    chain: list[dict[str, Any]] = []
    result = _retrain(ctx, ref, dataset_id, clean_base=clean_base, chain=chain)
    return {**result, "chain": chain}


def _retrain(ctx: StepContext, ref, dataset_id: str, *, clean_base: str | None,
             chain: list[dict[str, Any]]) -> dict[str, Any]:
    from pipelines.learning.slices import SliceError, from_records, without
    from pipelines.steps import training as steps
    from pipelines.trust import audit

    started = time.monotonic()
    meta = ref.metadata
    stage, training = meta["stage"], meta.get("training") or {}
    base_ref = _clean_base(ctx, meta, dataset_id, clean_base, chain)
    withdrawn = _withdrawn_inputs(ctx, meta, dataset_id)
    remaining = [d["id"] for d in meta["datasets"] if d["id"] not in withdrawn]
    if not remaining:
        raise StepError(f"every dataset {ref.uri} trained on reaches {dataset_id}: nothing is left to train on")
    plan = None
    if meta.get("slices"):
        try:
            plan = from_records(meta["slices"])
            for dataset in withdrawn:
                plan = without(plan, dataset)
        except SliceError as exc:
            raise StepError(f"{ref.uri}: {exc}") from None
    recipient = training.get("recipient") or next(  # models trained before the recipient was recorded
        (m.split(":", 1)[1] for m in (meta.get("watermark") or {}).get("marks", []) if m.startswith("recipient:")),
        None)
    training_started = time.monotonic()
    trained = steps.train_model(
        ctx, stage=stage, profile=training["profile"], datasets=remaining, base_model=base_ref,
        variant=meta.get("variant"), subset=training.get("subset"), subset_datasets=training.get("subset_datasets"),
        purpose=training.get("purpose") or "training", family=meta.get("family"),
        restrictions=meta.get("restrictions"), recipient=recipient,
        slices=[s.to_dict() for s in plan] if plan else None)
    train_seconds = time.monotonic() - training_started
    resumed = trained.get("resumed_from_slice")
    unlearned = {"replaced": ref.uri, "dataset": dataset_id, "withdrawn_inputs": withdrawn,
                 "base_model": base_ref, "resumed_from_slice": resumed, "full_retrain": resumed is None}
    if trained.get("registered"):  # made before (a second run): how it was made is in its metadata
        unlearned = steps._metadata(Path(trained["staging"])).get("unlearned") or unlearned
        resumed = unlearned.get("resumed_from_slice")
    else:  # before the signature: the record travels signed with the model
        steps._update_metadata(Path(trained["staging"]), unlearned=unlearned)
    inputs = _stage_inputs(stage)
    evaluated = steps.evaluate_model(ctx, trained=trained, test_sets=dict(inputs.test_sets))
    exported = steps.export_model(ctx, trained=evaluated, parity_set=inputs.parity_set)
    registered = steps.register_model(ctx, trained=exported)
    new = f"{registered['name']}/{registered['version']}"
    registry.client(ctx.paths).set_model_version_tag(registered["name"], registered["version"], UNLEARNED_TAG,
                                                    json.dumps(unlearned, sort_keys=True))
    result = {"replaced": ref.uri, "model": new, "dataset": dataset_id, "resumed_from_slice": resumed,
              "seconds": round(time.monotonic() - started, 3), "train_seconds": round(train_seconds, 3),
              "full_retrain": resumed is None, "already_done": bool(registered.get("skipped"))}
    if not registered.get("skipped"):
        audit.append(ctx.paths, action="model.unlearned", actor=ctx.actor or f"svc-{ctx.site}", object=new,
                     outcome="success", details={**unlearned, "dag_run_id": ctx.run_id})
    print(f"{ref.uri} without {dataset_id}: {new} "
          + ("(trained in full)" if resumed is None else f"(slices from {resumed} trained again)"))
    chain.append(result)
    return result
