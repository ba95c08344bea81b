"""Drift detection: recent inference inputs of a site against the serving model's reference data.

Detectors sit behind one interface, `DriftDetector` (fit on reference rows, test a window), because
the implementation used here, alibi-detect 0.13, is BSL-licensed (non-production use): swapping it
touches only this file. Two detectors run: a per-feature Kolmogorov-Smirnov test (Bonferroni
corrected over the model's input features) and a kernel MMD permutation test with the PyTorch
backend. MMD is quadratic in the number of rows, so both sides are subsampled to `mmd_max_samples`.

The served model's metadata spec says what a row is: the stored inputs are read at its width and
the reference rows are its training data's features (`DataSpec.features`).

`check_drift` logs every check to the site's MLflow (experiment `drift-<site>`) and audit log
(`drift.checked`) and leaves the latest result in `state_dir/drift/latest.json` for `/metrics`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.data.spec import DIGITS, DataSpec, SpecError, spec_of
from pipelines.fileio import write_json
from pipelines.serving.odd import serving_conf
from pipelines.serving.store import InputStore
from pipelines.workspace import SitePaths


class DriftError(RuntimeError):
    """A drift check cannot run (no reference data, malformed window); the message says what is missing."""


@dataclass(frozen=True)
class DriftResult:
    detector: str
    drift: bool
    p_value: float
    threshold: float
    score: float  # the test statistic: largest per-feature KS distance, or MMD^2


class DriftDetector(ABC):
    """Fit once on reference rows, then test windows of rows (n, features) for drift."""

    name: str

    @abstractmethod
    def fit(self, reference: np.ndarray) -> DriftDetector: ...

    @abstractmethod
    def test(self, window: np.ndarray) -> DriftResult: ...


class KSDetector(DriftDetector):
    name = "ks"

    def __init__(self, p_val: float = 0.01, correction: str = "bonferroni") -> None:
        self.p_val, self.correction, self._cd = p_val, correction, None

    def fit(self, reference: np.ndarray) -> KSDetector:
        from alibi_detect.cd import KSDrift

        self._cd = KSDrift(reference, p_val=self.p_val, correction=self.correction)
        return self

    def test(self, window: np.ndarray) -> DriftResult:
        out = self._cd.predict(window, drift_type="batch", return_p_val=True, return_distance=True)["data"]
        return DriftResult(self.name, bool(out["is_drift"]), float(np.min(out["p_val"])), float(out["threshold"]),
                           float(np.max(out["distance"])))


class MMDDetector(DriftDetector):
    name = "mmd"

    def __init__(self, p_val: float = 0.01, n_permutations: int = 100, max_samples: int = 500, seed: int = 0) -> None:
        self.p_val, self.n_permutations, self.max_samples, self.seed = p_val, n_permutations, max_samples, seed
        self._cd = None

    def _subsample(self, x: np.ndarray, salt: int) -> np.ndarray:
        if len(x) <= self.max_samples:
            return x
        rng = np.random.default_rng([self.seed, salt])
        return x[np.sort(rng.choice(len(x), self.max_samples, replace=False))]

    def fit(self, reference: np.ndarray) -> MMDDetector:
        from alibi_detect.cd import MMDDrift

        self._cd = MMDDrift(self._subsample(reference, 0), p_val=self.p_val, backend="pytorch",
                            n_permutations=self.n_permutations, device="cpu")
        return self

    def test(self, window: np.ndarray) -> DriftResult:
        import torch

        torch.manual_seed(self.seed)  # the permutation test is then reproducible
        out = self._cd.predict(self._subsample(window, 1), return_p_val=True, return_distance=True)["data"]
        return DriftResult(self.name, bool(out["is_drift"]), float(out["p_val"]), float(out["threshold"]),
                           float(out["distance"]))


def make_detectors(conf: dict[str, Any] | None = None) -> list[DriftDetector]:
    conf = conf if conf is not None else serving_conf().get("drift", {})
    p_val = float(conf.get("p_val", 0.01))
    return [
        KSDetector(p_val, conf.get("ks_correction", "bonferroni")),
        MMDDetector(p_val, int(conf.get("mmd_permutations", 100)), int(conf.get("mmd_max_samples", 500)),
                    int(conf.get("seed", 0))),
    ]


def detect(reference: np.ndarray, window: np.ndarray, detectors: list[DriftDetector] | None = None,
           decision: str = "all") -> dict[str, Any]:
    """Run every detector; drift when all (or any, `decision="any"`) of them report it."""
    if window.ndim != 2 or window.shape[1] != reference.shape[1]:
        raise DriftError(f"window has shape {window.shape}; reference rows have {reference.shape[1]} features")
    if decision not in ("all", "any"):
        raise DriftError(f"drift decision must be 'all' or 'any', got {decision!r}")
    results = {}
    for detector in detectors if detectors is not None else make_detectors():
        started = time.perf_counter()
        result = detector.fit(reference).test(window)
        results[detector.name] = {**asdict(result), "seconds": round(time.perf_counter() - started, 4)}
    votes = [r["drift"] for r in results.values()]
    return {"drift": all(votes) if decision == "all" else any(votes), "decision": decision, "detectors": results}


def _features(frame, spec: DataSpec) -> np.ndarray:
    missing = [c for c in spec.feature_columns if c not in frame.columns]
    if missing:
        raise DriftError(f"reference data lacks feature columns {missing[:3]}{'...' if len(missing) > 3 else ''}")
    try:
        return spec.features(frame)
    except (SpecError, ValueError, TypeError) as exc:
        raise DriftError(f"reference data does not hold rows of {spec.n_features} features: {exc}") from None


def read_rows(path: Path, spec: DataSpec = DIGITS) -> np.ndarray:
    """Rows of `spec` (default: the digits demo) from a .npy array or a Parquet file."""
    if path.suffix == ".npy":
        rows = np.load(path, allow_pickle=False).astype(np.float32)
        if rows.ndim != 2 or rows.shape[1] != spec.n_features:
            raise DriftError(f"{path.name} holds rows of shape {rows.shape[1:]}, not {spec.n_features} features")
        return rows
    import pandas as pd

    return _features(pd.read_parquet(path), spec)


def model_spec(model_ref: Any) -> DataSpec:
    """The spec the model was trained on (its metadata; the digits demo for models without one)."""
    from pipelines.learning.families import FamilyError, metadata_spec

    try:
        return metadata_spec(model_ref.metadata or {})
    except FamilyError as exc:
        raise DriftError(f"{model_ref.name}/{model_ref.version}: {exc}") from None


def reference_rows(paths: SitePaths, model_ref: Any) -> tuple[np.ndarray, list[str]]:
    """The model's drift reference (`metadata.reference_data`: paths or dataset ids) held at this site.

    A model trained elsewhere (M8 at origin) may name datasets this site does not hold; then the
    site's own partitions in `drift.reference_fallback` stand in, and the sources say so."""
    from pipelines.learning.families import spec_mismatch

    metadata = model_ref.metadata or {}
    spec = model_spec(model_ref)
    entries = metadata.get("reference_data") or []
    entries = [entries] if isinstance(entries, str) else list(entries)
    parts, sources, problems = [], [], []
    for entry in entries:
        candidates = [Path(entry)] if Path(entry).is_absolute() else [
            Path(model_ref.model_dir) / entry, paths.repo / entry, paths.data_dir / entry]
        found = next((c for c in candidates if c.is_file()), None)
        try:
            if found is not None:
                parts.append(read_rows(found, spec))
            else:
                from pipelines.data.catalog import load_dataset

                frame, version = load_dataset(paths, entry)
                problem = spec_mismatch(spec, spec_of(version.extra), expected_is="the model takes",
                                        actual_is="the dataset holds")
                if problem:
                    raise DriftError(problem)
                parts.append(_features(frame, spec))
            sources.append(str(entry))
        except Exception as exc:  # not held here, quarantined, or unreadable: try the next one
            problems.append(f"{entry}: {exc}")
    if not parts:
        for partition in serving_conf().get("drift", {}).get("reference_fallback", []):
            path = paths.data_dir / f"{partition}.parquet"
            if path.is_file():
                try:
                    parts.append(read_rows(path, spec))
                except DriftError as exc:  # the partition is not the model's kind of data
                    problems.append(f"{paths.site}/{partition}: {exc}")
                    continue
                sources.append(f"{paths.site}/{partition} (fallback)")
    if not parts:
        raise DriftError(
            f"no reference data for {model_ref.name}/{model_ref.version} at {paths.site}: "
            + ("; ".join(problems) or "metadata.reference_data is empty and no fallback partition exists")
        )
    return np.vstack(parts), sources


def _log_mlflow(paths: SitePaths, result: dict[str, Any]) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    paths.mlflow_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=paths.mlflow_uri)
    name = f"drift-{paths.site}"
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        paths.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
        experiment_id = client.create_experiment(name, artifact_location=(paths.mlflow_artifacts / name).as_uri())
    else:
        experiment_id = experiment.experiment_id
    model = result["model"]
    run = client.create_run(experiment_id, run_name=f"drift-{model['name']}-{model['version']}",
                            tags={"factory.site": paths.site, "factory.model": f"{model['name']}/{model['version']}",
                                  "factory.drift": str(result["drift"]).lower()})
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    values = {"drift": float(result["drift"])}
    for det_name, det in result["detectors"].items():
        values.update({f"{det_name}_{key}": float(det[key]) for key in ("drift", "p_value", "score", "threshold", "seconds")})
    client.log_batch(
        run_id,
        metrics=[Metric(key, value, now, 0) for key, value in values.items()],
        params=[Param("window", str(result["window"])), Param("reference_rows", str(result["reference"]["rows"])),
                Param("status", result["status"])],
    )
    client.log_dict(run_id, result, "drift.json")
    client.set_terminated(run_id)
    return run_id


def check_drift(paths: SitePaths, model_ref: Any, *, window: int | None = None,
                detectors: list[DriftDetector] | None = None, record: bool = True) -> dict[str, Any]:
    """Test the newest `window` stored inputs against the model's reference data.

    Returns `{"site", "model", "status": "checked"|"insufficient_data", "drift", "window", "reference",
    "detectors": {name: {drift, p_value, threshold, score, seconds}}, "checked_at", "mlflow_run_id"}`."""
    conf = serving_conf().get("drift", {})
    window = int(window or conf.get("window", 500))
    min_samples = int(conf.get("min_samples", 100))
    from pipelines.serving.app import model_info

    n_features = model_spec(model_ref).n_features
    recent = InputStore.for_site(paths, serving_conf().get("store"), n_features=n_features).recent(window)
    result: dict[str, Any] = {"site": paths.site, "model": model_info(model_ref), "window": int(len(recent)),
                              "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "checked_at_unix": int(time.time())}
    if len(recent) < min_samples:
        result.update(status="insufficient_data", drift=False, detectors={}, reference={"rows": 0, "sources": []},
                      detail=f"{len(recent)} stored inputs, fewer than the {min_samples} a verdict needs")
    else:
        reference, sources = reference_rows(paths, model_ref)
        result.update(status="checked", reference={"rows": int(len(reference)), "sources": sources},
                      **detect(reference, recent, detectors, conf.get("decision", "all")))
    if record:
        result["mlflow_run_id"] = _log_mlflow(paths, result)
        from pipelines.trust import audit

        audit.append(paths, action="drift.checked", actor=f"drift-monitor:{paths.site}",
                     object=f"{result['model']['name']}/{result['model']['version']}",
                     outcome="drift" if result["drift"] else result["status"] if result["status"] != "checked"
                     else "no_drift",
                     details={k: result[k] for k in ("window", "reference", "detectors", "mlflow_run_id")})
        write_json(paths.state_dir / "drift" / "latest.json", result)
    return result


def default_model(paths: SitePaths, ref: str | None = None):
    """The model a site serves: `ref`, else the first of `default_models[site]` the site holds."""
    from pipelines.learning.registry import ModelNotFound, resolve_model

    if ref:
        return resolve_model(paths, ref)
    candidates = serving_conf().get("default_models", {}).get(paths.site, [])
    problems = []
    for candidate in candidates:
        try:
            return resolve_model(paths, candidate)
        except ModelNotFound as exc:
            problems.append(str(exc))
    raise DriftError(f"site {paths.site} serves no model: " + ("; ".join(problems) or "no default_models entry"))


def drift_event_extra(result: dict[str, Any]) -> dict[str, Any] | None:
    """The asset-event extra for `factory://<site>/drift` (the evidence), or None when there is no drift."""
    if not result.get("drift"):
        return None
    return {
        "site": result["site"], "model": result["model"], "window": result["window"],
        "reference": result["reference"], "checked_at": result["checked_at"],
        "mlflow_run_id": result.get("mlflow_run_id"),
        "detectors": {name: {k: d[k] for k in ("drift", "p_value", "score", "threshold")}
                      for name, d in result["detectors"].items()},
    }
