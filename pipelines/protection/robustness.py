"""Robustness at release: accuracy under FGSM and PGD attacks (Adversarial Robustness Toolbox).

Budgets (`conf/protection.yaml` `robustness`) are L-inf bounds given as a fraction of the data's
value range (for the digits demo, pixel intensities in [0, 1], so the fraction is the pixel budget);
adversarial inputs are clipped to that range. Results are keyed `clean`, `fgsm@<eps>`, `pgd@<eps>`
(the keys policy data `release_robustness` names), evaluated deterministically on up to `samples`
records of a site's own test set (a seeded draw; PGD starts at the input, no random restarts).

- `release_robustness`: the sealed directory on the releasing site's test set, cached by model
  digest and test set, logged to the model's MLflow run; the model_release gate reads it as
  `model.robustness`.
- `received_robustness`: a received model on the receiving site's own test set before it is
  adopted, recorded as tags of the registered version.
- `model_robustness`: the same figures for a staged model (evaluation step, model card).

Any failure yields `{"evaluated": false, "reason": ...}`, never an exception: a gate that requires
a minimum then denies for want of a figure.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.context import StepContext

CACHE_FILE = "robustness.json"
_MLFLOW_UNSAFE = re.compile(r"[^\w.\-/ ]")


def budget_key(attack: str, eps: float) -> str:
    return f"{attack}@{float(eps):g}"


def mlflow_name(key: str) -> str:
    """An MLflow metric or tag name for a robustness key ('@' is not allowed there): fgsm@0.1 ->
    robustness.fgsm_eps0.1."""
    return "robustness." + _MLFLOW_UNSAFE.sub("_", key.replace("@", "_eps"))


def budgets(conf: dict[str, Any] | None = None) -> dict[str, Any]:
    """The configured budgets (conf/protection.yaml `robustness`), with defaults filled in."""
    from pipelines.protection import settings

    conf = settings("robustness") if conf is None else conf
    return {"samples": int(conf.get("samples", 256)),
            "fgsm_eps": [float(e) for e in conf.get("fgsm_eps", [0.05, 0.1])],
            "pgd_eps": [float(e) for e in conf.get("pgd_eps", [0.05])],
            "pgd_steps": int(conf.get("pgd_steps", 10)),
            "seed": int(conf.get("seed", 0))}


def evaluate_robustness(model, x: np.ndarray, y: np.ndarray, *, fgsm_eps: Sequence[float] = (0.05, 0.1),
                        pgd_eps: Sequence[float] = (0.05,), pgd_steps: int = 10, samples: int = 256,
                        seed: int = 0, clip: tuple[float, float] | None = None) -> dict[str, Any]:
    """Accuracy of a torch classifier (flat rows in, logits out) on clean and attacked inputs.

    Returns {"clean": acc, "fgsm@<eps>": acc, ..., "pgd@<eps>": acc, "samples": n}. `eps` is a
    fraction of the value range `clip` (default: the min and max of `x`)."""
    import torch
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if x.ndim != 2 or len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need flat rows with one label each, got x {x.shape} and y {y.shape}")
    if samples < len(x):
        pick = np.sort(np.random.default_rng(seed).choice(len(x), size=samples, replace=False))
        x, y = x[pick], y[pick]
    low, high = (float(x.min()), float(x.max())) if clip is None else (float(clip[0]), float(clip[1]))
    span = max(high - low, 1e-12)
    model.eval()
    torch.manual_seed(seed)
    n_classes = int(getattr(model, "n_classes", 0)) or int(model(torch.from_numpy(x[:1])).shape[1])
    classifier = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(x.shape[1],),
                                   nb_classes=n_classes, clip_values=(low, high), device_type="cpu")

    def acc(inputs: np.ndarray) -> float:
        return round(float((classifier.predict(inputs, batch_size=512).argmax(1) == y).mean()), 6)

    result: dict[str, Any] = {"clean": acc(x)}
    for eps in fgsm_eps:
        attack = FastGradientMethod(classifier, norm=np.inf, eps=eps * span, batch_size=512)
        result[budget_key("fgsm", eps)] = acc(attack.generate(x=x))
    for eps in pgd_eps:
        attack = ProjectedGradientDescent(classifier, norm=np.inf, eps=eps * span, eps_step=2.5 * eps * span / pgd_steps,
                                          max_iter=pgd_steps, num_random_init=0, batch_size=512, verbose=False)
        result[budget_key("pgd", eps)] = acc(attack.generate(x=x))
    result["samples"] = int(len(x))
    return result


def _test_set(ctx: StepContext, meta: dict[str, Any], test_sets: dict[str, str] | None) -> tuple[str, str]:
    """(metric key, dataset) of the site's own test set: the stage's when this site trained the
    model, else those it evaluates received models on (conf/stages.yaml `inputs`)."""
    from pipelines.config import load_config

    if not test_sets:
        inputs = load_config().stages.inputs
        if meta.get("site") == ctx.site and meta.get("stage") in inputs.models:
            test_sets = dict(inputs.model(meta["stage"]).test_sets)
        else:
            test_sets = inputs.received_test_sets(ctx.site)
    if not test_sets:
        raise ValueError(f"{ctx.site} names no test set for model stage {meta.get('stage')}")
    return next(iter(test_sets.items()))


def _measure(ctx: StepContext, model_dir: Path, test_sets: dict[str, str] | None = None,
             conf: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measured robustness of `model_dir` on this site's test set; raises on any failure."""
    from pipelines.data.catalog import load_dataset
    from pipelines.data.spec import spec_of
    from pipelines.learning import families
    from pipelines.learning.artifacts import load_model

    meta = json.loads((model_dir / "metadata.json").read_text())
    key, ref = _test_set(ctx, meta, test_sets)
    spec = families.metadata_spec(meta)
    frame, version = load_dataset(ctx.paths, ref, action="read", purpose="evaluation")  # catalog and data_access gate
    problem = families.spec_mismatch(spec, spec_of(version.extra), expected_is="the model takes",
                                     actual_is="the test set holds")
    if problem:
        raise ValueError(f"test set {version.id} does not fit the model: {problem}")
    x, y = spec.features(frame), spec.labels(frame)
    settings = budgets(conf)
    accuracy = evaluate_robustness(load_model(model_dir), x, y, fgsm_eps=settings["fgsm_eps"],
                                   pgd_eps=settings["pgd_eps"], pgd_steps=settings["pgd_steps"],
                                   samples=settings["samples"], seed=settings["seed"])
    samples = accuracy.pop("samples")
    return {"evaluated": True, "accuracy": accuracy, "budgets": {**settings, "samples": samples},
            "test_set": key, "dataset": version.id}


def _failure(error: BaseException) -> dict[str, Any]:
    text = str(error).strip() or type(error).__name__
    return {"evaluated": False, "reason": f"robustness not evaluated: {text[:300]}"}


def model_robustness(ctx: StepContext, model_dir: Path, test_sets: dict[str, str] | None = None) -> dict[str, Any]:
    """The robustness figures of a model directory on this site's test set; never raises."""
    try:
        return _measure(ctx, Path(model_dir), test_sets)
    except Exception as error:  # a failure is a result (`evaluated: false`), never an allow
        return _failure(error)


def _cache_key(ctx: StepContext, model_dir: Path) -> str:
    """The model's digest, the budgets and the test set it is measured on (a figure is reused
    only for the same weights measured the same way)."""
    from pipelines.learning.artifacts import model_digest

    digest = model_digest(model_dir)  # first: a directory without weights fails here
    test_set = _test_set(ctx, json.loads((model_dir / "metadata.json").read_text()), None)
    material = {"digest": digest, "budgets": budgets(), "test_set": list(test_set)}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def _log_to_run(ctx: StepContext, run_id: str | None, accuracy: dict[str, float]) -> None:
    """The figures as metrics of the model's MLflow run (a model received from elsewhere has none here)."""
    if not run_id:
        return
    from pipelines.learning import registry

    try:
        client = registry.client(ctx.paths)
        for key, value in accuracy.items():
            client.log_metric(run_id, mlflow_name(key), value)
    except Exception as error:  # the measurement stands; only its copy in MLflow is missing
        print(f"robustness figures not logged to MLflow run {run_id}: {error}")


def release_robustness(ctx: StepContext, model_dir: Path, *, recipient: str, purpose: str) -> dict[str, Any]:
    """The robustness of the exact directory that is sealed, on the releasing site's own test set:
    {"evaluated": true, "accuracy": {key: acc}, "budgets": {...}, ...} or {"evaluated": false,
    "reason"}. Cached by model digest (a re-run, or a release of the same model to another
    recipient or purpose, does not measure again); logged to the model's MLflow run."""
    from pipelines.fileio import read_json, update_json

    model_dir = Path(model_dir)
    try:
        key = _cache_key(ctx, model_dir)
        cache = ctx.paths.state_dir / CACHE_FILE
        cached = (read_json(cache) if cache.exists() else {}).get(key)
        if cached:
            result = {**cached, "cached": True}
        else:
            result = _measure(ctx, model_dir)
            _log_to_run(ctx, json.loads((model_dir / "metadata.json").read_text()).get("mlflow_run_id"),
                        result["accuracy"])
            with update_json(cache, {}) as records:
                records[key] = result
    except Exception as error:  # a failure is a result (`evaluated: false`), never an allow
        result = _failure(error)
    print(f"robustness of {model_dir.name} for {purpose} to {recipient}: "
          + (json.dumps(result["accuracy"]) if result["evaluated"] else result["reason"])
          + (" (measured before)" if result.get("cached") else ""))
    return result


def received_robustness(ctx: StepContext, record: dict[str, Any], test_sets: dict[str, str]) -> dict[str, Any]:
    """Robustness of a received, registered model (`receive_model`'s record: name, version) on this
    site's own test sets, recorded as `robustness.*` tags of the registered version and in the
    audit log before the model is adopted; never raises."""
    from pipelines.learning import registry
    from pipelines.trust import audit

    try:
        ref = registry.resolve_model(ctx.paths, f"{record['name']}/{record['version']}")
        result = _measure(ctx, ref.model_dir, test_sets)
        client = registry.client(ctx.paths)
        for key, value in result["accuracy"].items():
            client.set_model_version_tag(ref.name, ref.version, f"factory.{mlflow_name(key)}", str(value))
        audit.append(ctx.paths, action="model.robustness", actor=f"svc-{ctx.site}", object=ref.uri,
                     outcome="success", details={"accuracy": result["accuracy"], "dataset": result["dataset"]})
    except Exception as error:  # recorded, not raised: intake goes on; a policy minimum decides
        result = _failure(error)
    print(f"robustness of received {record.get('name')}/{record.get('version')} at {ctx.site}: "
          + (json.dumps(result["accuracy"]) if result["evaluated"] else result["reason"]))
    return result


def evaluation_robustness(ctx: StepContext, model_dir: Path, test_sets: dict[str, str]) -> dict[str, Any] | None:
    """The evaluation step's robustness figures (model card, metadata, MLflow) on the first of its
    test sets; None when conf/protection.yaml `robustness.at_evaluation` is false."""
    from pipelines.protection import settings

    if not settings("robustness").get("at_evaluation", True):
        return None
    return model_robustness(ctx, model_dir, dict(list(test_sets.items())[:1]))


def robustness_metrics(robustness: dict[str, Any] | None) -> dict[str, float]:
    """MLflow metrics of a robustness result ({} when not evaluated)."""
    if not robustness or not robustness.get("evaluated"):
        return {}
    return {mlflow_name(key): float(value) for key, value in robustness["accuracy"].items()}
