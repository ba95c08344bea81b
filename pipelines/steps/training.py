"""Training steps: train (or fine-tune) → evaluate → export to ONNX with parity → register.

A training run is keyed by its inputs (dataset digests, base-model digest, model family,
profile, seed, code version). Re-running a finished run returns the registered version
instead of training again, so a killed stage can simply be run again.

The datasets say what the model sees: each version's spec (catalog `extra["spec"]`, the digits
demo when absent; all datasets of one run must share it). The model's metadata.json records the
family, its architecture, the spec and the input envelope of the training rows (per-feature min
and max), so export, evaluation, serving, ODD and drift follow the model and not names in code.
An export variant's capability restrictions (`pipelines.learning.restrictions`: classes it abstains
on, a cap on the confidence it returns) are recorded there too (key `restrictions`, only when there
are some), so they are signed with the model and `factory serve` enforces them wherever it runs.
At a site that marks its models (conf/protection.yaml `watermark.sites`: the supplier) the run
embeds watermarks (`pipelines.protection.watermark`): the ownership mark in a new model, the marks
a base model of this site's key carries, and the mark of the `recipient` a model is prepared for
(stage 5's destination); metadata.json records them (key `watermark`: key id, marks, trigger scale).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import load_config
from pipelines.data.spec import DataSpec, SpecError, spec_of
from pipelines.fileio import write_json
from pipelines.learning import families, registry
from pipelines.learning.artifacts import code_commit, code_version, load_model, model_digest
from pipelines.learning.restrictions import RestrictionError
from pipelines.learning.restrictions import parse as parse_restrictions
from pipelines.steps import StepContext, StepError, step

MODEL_ONNX = "model.onnx"


def _xy(frame, spec: DataSpec, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs and class indices of `frame` under `spec`; a frame that does not fit is refused."""
    try:
        return spec.features(frame), spec.labels(frame)
    except (KeyError, SpecError, ValueError, TypeError) as exc:
        raise StepError(f"{what} does not hold rows of its spec ({families.describe(spec)}): {exc}") from None


def _version_spec(version) -> DataSpec:
    try:
        return spec_of(version.extra)
    except SpecError as exc:
        raise StepError(f"dataset {version.id} carries an unusable spec: {exc}") from None


def _shared_spec(versions) -> DataSpec:
    """The spec every dataset of a training run shares; refuses datasets that differ."""
    spec = _version_spec(versions[0])
    for version in versions[1:]:
        problem = families.spec_mismatch(spec, _version_spec(version), expected_is=f"{versions[0].id} holds",
                                         actual_is=f"{version.id} holds")
        if problem:
            raise StepError(f"datasets of one training run must share a spec: {problem}")
    return spec


def _model_spec(model_dir: Path, meta: dict[str, Any] | None = None) -> DataSpec:
    try:
        return families.metadata_spec(meta if meta is not None else _metadata(model_dir))
    except families.FamilyError as exc:
        raise StepError(f"model {model_dir}: {exc}") from None


def _fitting(version, model_spec: DataSpec, model: str) -> None:
    """Refuse a dataset whose rows are not the inputs `model` was trained on."""
    problem = families.spec_mismatch(model_spec, _version_spec(version), expected_is="the model takes",
                                     actual_is="the dataset holds")
    if problem:
        raise StepError(f"dataset {version.id} does not fit {model}: {problem}")


def _envelope(x: np.ndarray | None, base: dict[str, Any] | None) -> dict[str, list[float]] | None:
    """Per-feature min and max of the training rows (with the base model's, when fine-tuning).
    No rows (a DP run without rows of the trainer's own): the base's, else None."""
    if x is None:
        return dict(base) if base else None
    low, high = x.min(axis=0).astype(np.float64), x.max(axis=0).astype(np.float64)
    if base and len(base.get("min", ())) == len(low) and len(base.get("max", ())) == len(high):
        low = np.minimum(low, np.asarray(base["min"], dtype=np.float64))
        high = np.maximum(high, np.asarray(base["max"], dtype=np.float64))
    return {"min": [float(v) for v in low], "max": [float(v) for v in high]}


def _load(ctx: StepContext, ref: str, *, action: str, purpose: str):
    """A dataset of this site, through the catalog (refuses quarantine) and the data_access gate."""
    from pipelines.data.catalog import load_dataset

    return load_dataset(ctx.paths, ref, action=action, purpose=purpose)


def _staging(ctx: StepContext, run_key: str) -> Path:
    return ctx.paths.state_dir / "staging" / run_key / "model"


def _metadata(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "metadata.json").read_text())


def _update_metadata(model_dir: Path, **changes: Any) -> dict[str, Any]:
    meta = _metadata(model_dir)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(meta.get(key), dict):
            meta[key] = {**meta[key], **value}
        else:
            meta[key] = value
    write_json(model_dir / "metadata.json", meta)
    return meta


def _mlflow_run(ctx: StepContext, run_id: str | None = None, **kwargs):
    import mlflow

    mlflow.set_tracking_uri(ctx.paths.mlflow_uri)
    mlflow.set_registry_uri(ctx.paths.mlflow_uri)
    return mlflow.start_run(run_id=run_id, experiment_id=registry.experiment_id(ctx.paths), **kwargs)


def _select(frame, subset: dict | None, spec: DataSpec):
    if not subset:
        return frame
    labels = subset.get("labels")
    if labels is not None:
        unknown = sorted(set(labels) - set(range(spec.n_classes)))
        if unknown:
            raise StepError(f"subset selector {subset}: no class {unknown} in this data "
                            f"(class indices 0..{spec.n_classes - 1}: {', '.join(spec.classes)})")
        frame = frame[frame[spec.label_column].isin(labels)]
    if frame.empty:
        raise StepError(f"subset selector {subset} selects no records")
    return frame


def _privacy_params(privacy) -> dict[str, Any]:
    """MLflow params of a DP-SGD profile (none without privacy)."""
    if privacy is None:
        return {}
    return {"dp_mechanism": "dp-sgd", "dp_accountant": privacy.accountant, "dp_delta": privacy.delta,
            "dp_max_grad_norm": privacy.max_grad_norm, "dp_noise_multiplier": privacy.noise_multiplier or "",
            "dp_target_epsilon": privacy.target_epsilon or ""}


def _own_rows(ctx: StepContext, frames, versions, spec: DataSpec, profile) -> np.ndarray | None:
    """With DP, the rows of the datasets this site owns: the only ones a new model's input
    standardisation may be fitted on (a partner's rows enter the model through DP-SGD alone)."""
    if profile.privacy is None:
        return None
    own = [frame for frame, version in zip(frames, versions, strict=True) if version.owner == ctx.site]
    return np.concatenate([_xy(frame, spec, "own training data")[0] for frame in own]) if own else None


def _slice_plan(ctx: StepContext, versions, profile, requested: list[dict] | None):
    """The slices a run trains in (pipelines.learning.slices), None for unsliced training.

    conf/stages.yaml `unlearning.slicing`: auto slices a run whose datasets are not all of this
    site's own data (a dataset is own when its whole lineage is), always slices every run, never
    none. The own datasets form slice 0, each other dataset a slice of its own in the given order.
    `requested` (slice records, as metadata.json keeps them) is the plan a withdrawal trains.
    DP-SGD runs are not sliced (each slice would spend its own budget)."""
    from pipelines.data.lineage import lineage_entries
    from pipelines.learning import slices as sliced

    ids = [v.id for v in versions]
    if requested is not None:
        try:
            plan = sliced.from_records(requested)
        except sliced.SliceError as exc:
            raise StepError(str(exc)) from None
        named = sorted({d for s in plan for d in s.datasets})
        if named != sorted(ids):
            raise StepError(f"the slice plan trains on {', '.join(named)}, the run on {', '.join(sorted(ids))}")
        if profile.privacy is not None:
            raise StepError("sliced training does not run with DP-SGD")
        return plan
    settings = load_config().stages.unlearning
    if profile.privacy is not None or settings.slicing == "never":
        return None
    own = [v.id for v in versions if all(e.get("owner") == ctx.site for e in lineage_entries(ctx.paths, [v.id]))]
    if settings.slicing == "auto" and len(own) == len(ids):
        return None
    return sliced.plan_slices(own + [i for i in ids if i not in own], own=len(own), epochs=profile.epochs,
                              own_share=settings.own_share)


@step("train_model")
def train_model(
    ctx: StepContext,
    *,
    stage: str,
    profile: str,
    datasets: list[str],
    base_model: str | None = None,
    base_variant: str | None = None,
    variant: str | None = None,
    subset: dict | None = None,
    subset_datasets: list[str] | None = None,
    purpose: str = "training",
    family: str | None = None,
    restrictions: dict | None = None,
    recipient: str | None = None,
    slices: list[dict] | None = None,
) -> dict[str, Any]:
    """Train the `stage` model on the site's `datasets`, fine-tuning `base_model` when given.

    `family` (conf/models.yaml) is the model family; default: the base model's family when
    fine-tuning, else conf/stages.yaml `model_family`. Fine-tuning refuses another family, and
    datasets whose spec (input shape, classes) is not the base model's.
    `subset` ({"labels": [...]}) selects records of the datasets named in `subset_datasets` (all when None).
    `restrictions` ({"abstain_classes": [...], "max_confidence": x}, both optional) restrict what the
    model may return; checked against the data's classes and recorded in its metadata.
    `recipient` (a site) gets its own watermark in the model, besides the supplier's ownership mark.
    A profile with `privacy` trains with DP-SGD (pipelines.learning.privacy): metadata.json `privacy`
    records the mechanism and the (epsilon, delta) spent, each lineage entry its `dp` spend along the
    model's chain (None: trained on without a bound), MLflow `dp_*` params and metrics.
    A run on several owners' data trains in slices (`_slice_plan`; metadata.json `slices`: datasets,
    epochs, checkpoint digest), each slice's weights kept under the site's state dir, so a withdrawn
    dataset is unlearned by training again only the slices from its own (pipelines.steps.unlearning,
    which passes `slices`: the plan without it).
    """
    import pandas as pd

    from pipelines.data.lineage import lineage_entries
    from pipelines.learning.artifacts import load_weights, save_weights
    from pipelines.learning.privacy import PrivacyError, lineage_with_spend, spend
    from pipelines.learning.train import train
    from pipelines.profiles import ProfileError
    from pipelines.profiles import training_profile as site_training_profile

    conf = load_config().stages
    if profile not in conf.training:
        raise StepError(f"unknown training profile {profile!r}; conf/stages.yaml has {', '.join(conf.training)}")
    if not datasets:
        raise StepError(f"{stage}: no datasets to train on")
    try:  # conf/stages.yaml's, with the overrides of the site's profile (factory init --profile)
        training_profile = site_training_profile(ctx.paths, profile)
    except (ProfileError, ValueError) as exc:
        raise StepError(f"{stage}: training profile {profile!r} of {ctx.site}'s profile: {exc}") from None
    loaded = [_load(ctx, ref, action="train", purpose=purpose) for ref in datasets]
    versions = [version for _, version in loaded]
    spec = _shared_spec(versions)
    try:
        restrictions = parse_restrictions(restrictions, spec.n_classes)
    except RestrictionError as exc:
        raise StepError(f"{stage}: {exc} ({', '.join(spec.classes)})") from None
    frames = []
    for frame, version in loaded:
        applies = bool(subset) and (subset_datasets is None or version.name in subset_datasets)
        frames.append(_select(frame, subset, spec) if applies else frame)
    base = registry.resolve_model(ctx.paths, base_model, variant=base_variant) if base_model else None
    base_digest = model_digest(base.model_dir) if base else None
    if base is not None:
        base_meta = base.metadata
        try:
            base_family = families.metadata_family(base_meta)
            architecture = families.metadata_architecture(base_meta)
        except families.FamilyError as exc:
            raise StepError(f"cannot fine-tune {base.uri}: {exc}") from None
        if family and family != base_family:
            raise StepError(f"cannot fine-tune {base.uri} (family {base_family}) as family {family}: "
                            "fine-tuning continues the base model's family")
        family = base_family
        problem = families.spec_mismatch(_model_spec(base.model_dir, base_meta), spec,
                                         expected_is="the base model takes", actual_is="the data holds")
        if problem:
            raise StepError(f"cannot fine-tune {base.uri} on {', '.join(v.id for v in versions)}: {problem}")
    else:
        family = family or families.default_family(ctx.paths)
        try:
            architecture = families.architecture_record(family)
            families.build_model(family, spec)  # refuses a family that cannot take the data before any work
        except families.FamilyError as exc:
            raise StepError(f"{stage}: {exc}") from None
    try:
        name = registry.registered_name(stage, variant, family=family)
    except registry.ModelNotFound as exc:
        raise StepError(str(exc)) from None
    from pipelines.protection import watermark as wm

    try:
        marks = wm.training_marks(ctx.paths, new_model=base is None, base_meta=base.metadata if base else None,
                                  recipient=recipient or None)
        mark_key = wm.ensure_key(ctx.paths) if marks else None
    except (wm.WatermarkError, ValueError) as exc:
        raise StepError(f"{stage}: watermark: {exc}") from None
    mark_conf = wm.settings()
    plan = _slice_plan(ctx, versions, training_profile, slices)
    key_material = {
        "stage": stage, "variant": variant, "profile": training_profile.model_dump(), "seed": conf.seed,
        "datasets": sorted(v.md5 for v in versions), "base": base_digest, "subset": subset,
        "family": family, "architecture": architecture, "code": code_version(),
        **({"restrictions": restrictions} if restrictions else {}),  # unrestricted runs keep their earlier keys
        **({"watermark": {"key_id": mark_key.key_id, "marks": marks, "size": mark_conf["trigger_set_size"],
                          "repeats": mark_conf["repeats"]}} if marks else {}),  # unmarked runs keep theirs too
        **({"slices": [[sorted(v.md5 for v in versions if v.id in s.datasets), s.epochs, sorted(s.repeat)] for s in plan]}
           if plan else {}),  # unsliced runs keep theirs too
    }
    run_key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:16]
    done = registry.find_version_by_tag(ctx.paths, name, "factory.run_key", run_key)
    if done is not None:
        print(f"{stage}: inputs unchanged, using registered {done.uri}")
        return {"run_key": run_key, "name": name, "registered": done.uri, "staging": str(done.model_dir),
                "mlflow_run_id": done.run_id, "stage": stage}

    data = pd.concat(frames, ignore_index=True)
    x, y = _xy(data, spec, f"training data {', '.join(v.id for v in versions)}")
    own_x = _own_rows(ctx, frames, versions, spec, training_profile)
    seen_x = x if training_profile.privacy is None else own_x  # with DP, records of the data: own rows only
    mark_record, mark_rows = None, None
    if marks:
        scale = wm.trigger_scale(family, _envelope(seen_x, None), spec.n_features,
                                 inherited=((base.metadata.get("watermark") or {}).get("scale") if base else None))
        mark_rows = wm.embedding_rows(mark_key, marks, n_features=spec.n_features, n_classes=spec.n_classes,
                                      scale=scale, conf=mark_conf)
        mark_record = {"key_id": mark_key.key_id, "marks": marks, "scale": scale}
    staging = _staging(ctx, run_key)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    with _mlflow_run(ctx, run_name=f"{stage}-{run_key}") as run:
        import mlflow

        mlflow.set_tags({"factory.stage": stage, "factory.run_key": run_key, "factory.dag_id": ctx.dag_id,
                         "factory.dag_run_id": ctx.run_id})
        mlflow.log_params({"stage": stage, "profile": profile, **training_profile.model_dump(), "seed": conf.seed,
                           "records": len(data), "datasets": ",".join(v.id for v in versions),
                           "base_model": base.uri if base else "none", "variant": variant or "", "family": family,
                           "mode": "fine_tune" if base else "centralized",
                           "restrictions": json.dumps(restrictions, sort_keys=True),
                           "watermark_marks": ",".join(marks),
                           **_privacy_params(training_profile.privacy)})

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            mlflow.log_metrics(metrics, step=epoch)
            print(f"{stage} epoch {epoch + 1}/{training_profile.epochs}: "
                  f"loss {metrics['train_loss']:.4f} accuracy {metrics['train_accuracy']:.4f}", flush=True)

        try:
            if plan is None:
                result = train(x, y, training_profile, seed=conf.seed, architecture=architecture, spec=spec,
                               mode="fine_tune" if base else "centralized",
                               base_state=load_weights(base.model_dir) if base else None, on_epoch=on_epoch,
                               watermark=mark_rows, public_rows=own_x)
            else:
                from pipelines.learning.slices import checkpoint_dir, train_sliced

                result = train_sliced(
                    {v.id: _xy(f, spec, f"training data {v.id}") for f, v in zip(frames, versions, strict=True)},
                    plan, training_profile, seed=conf.seed, digests={v.id: v.md5 for v in versions},
                    material={"base": base_digest, "family": family, "architecture": architecture,
                              "spec": spec.to_dict(), "subset": subset, "subset_datasets": subset_datasets,
                              "profile": {k: v for k, v in training_profile.model_dump().items() if k != "epochs"}},
                    checkpoints=checkpoint_dir(ctx.paths.state_dir), architecture=architecture, spec=spec,
                    base_state=load_weights(base.model_dir) if base else None, on_epoch=on_epoch,
                    watermark=mark_rows, watermark_id=key_material.get("watermark"))
                print(f"{stage}: {len(plan)} slices, {result.trained_slices} trained"
                      + (f", from slice {result.resumed_from_slice} on (checkpoints before it)"
                         if result.resumed_from_slice else ""), flush=True)
        except PrivacyError as exc:
            raise StepError(f"{stage}: {exc}") from None
        save_weights(result.model, staging)
        if result.privacy:
            mlflow.log_metrics({"dp_epsilon": result.privacy["epsilon"], "dp_delta": result.privacy["delta"],
                                "dp_noise_multiplier": result.privacy["noise_multiplier"]})
        # each source carries the (epsilon, delta) spent on it along the model's chain, None: no bound
        lineage = lineage_with_spend(base.metadata.get("lineage", []) if base else [],
                                     lineage_entries(ctx.paths, [v.id for v in versions]), spend(result.privacy))
        write_json(staging / "metadata.json", {
            "name": name, "stage": stage, "variant": variant, "site": ctx.site, "run_key": run_key,
            "family": family, "architecture": architecture, "spec": spec.to_dict(),
            "input_envelope": _envelope(seen_x, base_meta.get("input_envelope") if base else None),
            "datasets": [{"id": v.id, "md5": v.md5, "owner": v.owner} for v in versions],
            "base_model": {"name": base.name, "version": base.version, "digest": base_digest} if base else None,
            "lineage": lineage, "metrics": {}, "training": {"profile": profile, "records": len(data), "subset": subset,
                                                             "subset_datasets": subset_datasets, "purpose": purpose,
                                                             "recipient": recipient or None},
            "reference_data": [v.id for v in versions], "code_version": code_version(),
            "mlflow_run_id": run.info.run_id, "dag_id": ctx.dag_id, "dag_run_id": ctx.run_id,
            **({"restrictions": restrictions} if restrictions else {}),
            **({"watermark": mark_record} if mark_record else {}),
            **({"privacy": result.privacy} if result.privacy else {}),
            **({"slices": result.slices} if plan else {}),
        })
    return {"run_key": run_key, "name": name, "staging": str(staging), "mlflow_run_id": run.info.run_id,
            "stage": stage, **({"resumed_from_slice": result.resumed_from_slice} if plan else {})}


def _test_metrics(ctx: StepContext, model_dir: Path, test_sets: dict[str, str]) -> dict[str, float]:
    from pipelines.learning.onnx_export import logits_onnx
    from pipelines.learning.train import accuracy, logits_torch

    metrics = {}
    onnx_path = model_dir / MODEL_ONNX
    spec = _model_spec(model_dir)
    model = None if onnx_path.exists() else load_model(model_dir)
    for key, ref in test_sets.items():
        frame, version = _load(ctx, ref, action="read", purpose="evaluation")
        _fitting(version, spec, f"the model in {model_dir.name}")
        x, y = _xy(frame, spec, f"test set {version.id}")
        logits = logits_onnx(onnx_path, x) if model is None else logits_torch(model, x)
        metrics[key] = round(accuracy(logits, y), 6)
    return metrics


@step("evaluate_model")
def evaluate_model(ctx: StepContext, *, trained: dict, test_sets: dict[str, str],
                   min_accuracy: dict[str, float] | None = None) -> dict[str, Any]:
    """Accuracy of a staged model on this site's test sets (metric key -> dataset)."""
    model_dir = Path(trained["staging"])
    if trained.get("registered"):
        return {"metrics": _metadata(model_dir)["metrics"], **trained}
    from pipelines.protection.robustness import evaluation_robustness, robustness_metrics

    metrics = _test_metrics(ctx, model_dir, test_sets)
    robustness = evaluation_robustness(ctx, model_dir, test_sets)  # None when conf/protection.yaml turns it off
    _update_metadata(model_dir, metrics=metrics, **({"robustness": robustness} if robustness else {}))
    with _mlflow_run(ctx, trained["mlflow_run_id"]):
        import mlflow

        mlflow.log_metrics({**metrics, **robustness_metrics(robustness)})
    for key, floor in (min_accuracy or {}).items():
        if metrics.get(key, 0.0) < floor:
            raise StepError(f"{trained['stage']} {key} accuracy {metrics.get(key, 0.0):.4f} is below the "
                            f"required {floor:.4f} (short by {floor - metrics.get(key, 0.0):.4f})")
    print(f"{trained['stage']} evaluation: {metrics}")
    return {"metrics": metrics, **trained}


@step("export_model")
def export_model(ctx: StepContext, *, trained: dict, parity_set: str) -> dict[str, Any]:
    """Export to ONNX and check parity against ONNX Runtime on `parity_set`."""
    from pipelines.learning.onnx_export import export_onnx, parity_max_abs

    model_dir = Path(trained["staging"])
    if trained.get("registered"):
        return trained
    spec = _model_spec(model_dir)
    frame, version = _load(ctx, parity_set, action="read", purpose="evaluation")
    _fitting(version, spec, f"{trained['stage']} (parity set)")
    model = load_model(model_dir)
    onnx_path = export_onnx(model, model_dir / MODEL_ONNX)
    parity = parity_max_abs(model, onnx_path, _xy(frame, spec, f"parity set {version.id}")[0])
    limit = load_config().stages.onnx_parity_max_abs
    _update_metadata(model_dir, metrics={"onnx_parity_max_abs": parity})
    with _mlflow_run(ctx, trained["mlflow_run_id"]):
        import mlflow

        mlflow.log_metric("onnx_parity_max_abs", parity)
    if parity >= limit:
        raise StepError(f"ONNX parity {parity:.2e} is not below {limit:.0e} (max absolute logit difference)")
    print(f"{trained['stage']} ONNX parity max abs {parity:.2e}")
    return {**trained, "onnx_parity_max_abs": parity}


def _model_card(meta: dict[str, Any], intended_use: str) -> dict[str, Any]:
    spec = families.metadata_spec(meta)
    return {
        "name": meta["name"], "stage": meta["stage"], "site": meta["site"], "variant": meta.get("variant"),
        "family": families.metadata_family(meta), "intended_use": intended_use, "metrics": meta["metrics"],
        "datasets": meta["datasets"], "base_model": meta["base_model"],
        "inputs": {"kind": spec.kind, "input_shape": list(spec.input_shape), "classes": list(spec.classes)},
        "limitations": f"{families.describe(spec)} inputs as in its training data; evaluated only on the test "
                       "sets listed in metrics.",
        **({"restrictions": meta["restrictions"]} if meta.get("restrictions") else {}),
        **({"privacy": meta["privacy"]} if meta.get("privacy") else {}),  # DP-SGD: the (epsilon, delta) spent
        **_robustness_card(meta.get("robustness")),
    }


def _robustness_card(robustness: dict[str, Any] | None) -> dict[str, Any]:
    """The card's robustness section: accuracy under attack at the budgets measured (when measured)."""
    if not robustness or not robustness.get("evaluated"):
        return {}
    return {"robustness": {"accuracy": robustness["accuracy"], "test_set": robustness.get("test_set"),
                           "attacks": "FGSM and PGD (L-inf; budgets as fractions of the input range), "
                                      "Adversarial Robustness Toolbox",
                           "budgets": robustness.get("budgets", {})}}


def write_model_provenance(ctx: StepContext, model_dir: Path, *, approvals=()) -> Path:
    """The in-toto/SLSA provenance of a model directory, with the approvals that released it."""
    from pipelines.trust.provenance import write_provenance

    meta = _metadata(model_dir)
    dependencies = [{"name": d["id"], "digest": {"md5": d["md5"]}} for d in meta["datasets"]]
    if meta.get("base_model"):
        algo, value = meta["base_model"]["digest"].split(":", 1)
        dependencies.append({"name": f"model:{meta['base_model']['name']}/{meta['base_model']['version']}",
                             "digest": {algo: value}})
    dependencies.append({"name": "code", "digest": {"gitCommit": code_commit()}})
    return write_provenance(
        ctx.paths, model_dir, stage=meta["stage"],
        external_parameters={"dag_id": meta["dag_id"], "variant": meta.get("variant"), **meta["training"]},
        dependencies=dependencies,
        run_details={"site": meta["site"], "dag_run_id": meta["dag_run_id"], "mlflow_run_id": meta["mlflow_run_id"],
                     "released_by_run": ctx.run_id},
        approvals=approvals,
    )


def publish_model_dir(ctx: StepContext, model_dir: Path) -> dict[str, Path]:
    """Attach provenance and the ML-BOM, then sign the directory, both included (trust layer)."""
    from pipelines.trust.bom import write_ml_bom
    from pipelines.trust.signing import sign_model_dir

    meta = _metadata(model_dir)
    provenance = write_model_provenance(ctx, model_dir)
    bom = write_ml_bom(
        model_dir, model_name=meta["name"], version=meta["run_key"], metrics=meta["metrics"],
        datasets=[{"id": d["id"], "digest": d["md5"], "owner": d["owner"]} for d in meta["datasets"]],
        intended_use=json.loads((model_dir / "model_card.json").read_text())["intended_use"],
    )
    signature = sign_model_dir(ctx.paths, model_dir)  # last: the signature covers provenance and BOM too
    return {"provenance": provenance, "bom": bom, "signature": signature}


@step("register_model")
def register_model(ctx: StepContext, *, trained: dict, intended_use: str = "research and evaluation") -> dict[str, Any]:
    """Move the staged model into the site repo (DVC), sign and attest it, register it in MLflow."""
    from pipelines.data.repo import commit_tracked, git_head, site_lock
    from pipelines.trust import audit

    if trained.get("registered"):
        ref = registry.resolve_model(ctx.paths, trained["registered"])
        return {"name": ref.name, "version": ref.version, "stage": trained["stage"], "skipped": True,
                "metrics": ref.metadata["metrics"]}
    staging = Path(trained["staging"])
    meta = _metadata(staging)
    write_json(staging / "model_card.json", _model_card(meta, intended_use))
    target = ctx.paths.models_dir / meta["name"] / meta["run_key"]
    with site_lock(ctx.paths):
        existing = registry.find_version_by_tag(ctx.paths, meta["name"], "factory.run_key", meta["run_key"])
        if existing is not None:  # a concurrent or earlier run finished first
            return {"name": existing.name, "version": existing.version, "stage": meta["stage"], "skipped": True,
                    "metrics": existing.metadata["metrics"]}
        if target.exists():
            shutil.rmtree(target)  # left by a run killed between copy and registration
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, target)
        publish_model_dir(ctx, target)
        commit_tracked(ctx.paths, [target], f"Add model {meta['name']} run {meta['run_key']}")
        tags = {
            "factory.stage": meta["stage"], "factory.site": ctx.site, "factory.run_key": meta["run_key"],
            "factory.datasets": json.dumps({d["id"]: d["md5"] for d in meta["datasets"]}),
            "factory.base_model": json.dumps(meta["base_model"]), "factory.repo_commit": git_head(ctx.paths),
            "factory.code_version": meta["code_version"], "factory.model_digest": model_digest(target),
            "factory.variant": meta.get("variant") or "",
            "factory.restrictions": json.dumps(meta.get("restrictions") or {}, sort_keys=True),
            **{f"factory.metric.{k}": str(v) for k, v in meta["metrics"].items()},
        }
        ref = registry.register(ctx.paths, meta["name"], target, run_id=meta["mlflow_run_id"], tags=tags)
    audit.append(ctx.paths, action="model.registered", actor=ctx.actor or f"svc-{ctx.site}",
                 object=f"{ref.name}/{ref.version}", outcome="success",
                 details={"stage": meta["stage"], "run_key": meta["run_key"], "metrics": meta["metrics"],
                          "dag_run_id": ctx.run_id})
    shutil.rmtree(staging.parent, ignore_errors=True)
    print(f"registered {ref.name} version {ref.version} at {ctx.site}: {meta['metrics']}")
    return {"name": ref.name, "version": ref.version, "stage": meta["stage"], "metrics": meta["metrics"]}


@step("evaluate_registered")
def evaluate_registered(ctx: StepContext, *, model: str, test_sets: dict[str, str]) -> dict[str, Any]:
    """Evaluate a model this site already holds on more of its test data; metrics become version tags."""
    ref = registry.resolve_model(ctx.paths, model)
    metrics = _test_metrics(ctx, ref.model_dir, test_sets)
    mlflow_client = registry.client(ctx.paths)
    for key, value in metrics.items():
        mlflow_client.set_model_version_tag(ref.name, ref.version, f"factory.metric.{key}", str(value))
    print(f"{ref.uri} at {ctx.site}: {metrics}")
    return {"model": ref.uri, "metrics": metrics}
