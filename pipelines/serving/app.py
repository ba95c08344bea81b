"""The site's inference service: a FastAPI app around one signed ONNX model.

`create_app(site_paths, model_ref)` verifies the model directory's signature before anything is
loaded (a bad or missing signature refuses to start: `ServingError`), then serves

- `POST /predict` `{"inputs": [[64 floats in [0, 1]], ...], "context": {...}}` →
  `{"predictions": [...] | null, "model": {...}, "odd": {"allow", "mode", "reasons", "flagged"}}`;
  every request is checked against the site's ODD (`policies/odd`), a breach answers in safe mode
  and is written to the audit log as `odd.breach`; validated inputs go to the site's input store;
- `GET /metrics` (Prometheus text format), `GET /healthz`.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict

from pipelines.data.schema import N_FEATURES
from pipelines.serving.odd import OddGate, batch_stats, gate_input, serving_conf
from pipelines.serving.store import InputStore
from pipelines.workspace import SitePaths

INPUT_NAME, OUTPUT_NAME = "input", "logits"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServingError(RuntimeError):
    """The service cannot start (bad signature, missing model file); the message says why."""


@dataclass(frozen=True)
class ServedModel:
    """What the service needs of a model version (the registry's ModelRef has the same fields)."""

    name: str
    version: str
    stage: str | None
    model_dir: Path
    metadata: dict[str, Any] = field(default_factory=dict)


class PredictRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    inputs: list[list[float]]
    context: dict[str, Any] = {}


class InvalidInput(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def model_info(model_ref: Any) -> dict[str, Any]:
    return {"name": model_ref.name, "version": str(model_ref.version), "stage": model_ref.stage}


def verify_model(paths: SitePaths, model_ref: Any) -> None:
    """Verify the model directory's signature against the trust store of the serving site.

    The signer is the site that trained the model (`metadata.site`); fails closed on any error."""
    from pipelines.trust.signing import verify_model_dir

    model_dir = Path(model_ref.model_dir)
    try:
        metadata = json.loads((model_dir / "metadata.json").read_text())
        signer = metadata.get("site") or paths.site
        verify_model_dir(model_dir, paths=paths, signer_site=signer)
    except Exception as exc:
        raise ServingError(f"refusing to serve {model_ref.name}/{model_ref.version}: {exc}") from exc


class Metrics:
    """Counters and a latency histogram rendered in the Prometheus text exposition format."""

    def __init__(self, site: str, model: dict[str, Any]) -> None:
        self.labels = f'site="{site}",model="{model["name"]}",version="{model["version"]}"'
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.breaches: dict[str, int] = {}
        self.samples = 0
        self.buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0

    def observe(self, outcome: str, seconds: float | None = None, samples: int = 0, mode: str | None = None) -> None:
        with self._lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1
            self.samples += samples
            if mode is not None:
                self.breaches[mode] = self.breaches.get(mode, 0) + 1
            if seconds is not None:
                self.latency_sum += seconds
                self.latency_count += 1
                for i, bound in enumerate(LATENCY_BUCKETS):
                    if seconds <= bound:
                        self.buckets[i] += 1

    def render(self, drift: dict[str, Any] | None) -> str:
        lab = self.labels
        with self._lock:
            lines = [
                "# HELP factory_serving_requests_total Prediction requests by outcome.",
                "# TYPE factory_serving_requests_total counter",
                *(f'factory_serving_requests_total{{{lab},outcome="{k}"}} {v}' for k, v in sorted(self.requests.items())),
                "# HELP factory_serving_samples_total Samples predicted or withheld.",
                "# TYPE factory_serving_samples_total counter",
                f"factory_serving_samples_total{{{lab}}} {self.samples}",
                "# HELP factory_serving_odd_breaches_total Requests outside the ODD, by safe mode.",
                "# TYPE factory_serving_odd_breaches_total counter",
                *(f'factory_serving_odd_breaches_total{{{lab},mode="{m}"}} {self.breaches.get(m, 0)}'
                  for m in ("flag", "withhold")),
                "# HELP factory_serving_request_latency_seconds Time to answer a valid prediction request.",
                "# TYPE factory_serving_request_latency_seconds histogram",
                *(f'factory_serving_request_latency_seconds_bucket{{{lab},le="{b}"}} {c}'
                  for b, c in zip(LATENCY_BUCKETS, self.buckets, strict=True)),
                f'factory_serving_request_latency_seconds_bucket{{{lab},le="+Inf"}} {self.latency_count}',
                f"factory_serving_request_latency_seconds_sum{{{lab}}} {self.latency_sum:.6f}",
                f"factory_serving_request_latency_seconds_count{{{lab}}} {self.latency_count}",
            ]
        if drift:
            site_lab = lab.split(",model=")[0]
            lines += [
                "# HELP factory_drift_detected Whether the last drift check found drift (1) or not (0).",
                "# TYPE factory_drift_detected gauge",
                f"factory_drift_detected{{{site_lab}}} {int(bool(drift.get('drift')))}",
                "# HELP factory_drift_score Test statistic of each drift detector at the last check.",
                "# TYPE factory_drift_score gauge",
                *(f'factory_drift_score{{{site_lab},detector="{name}"}} {d["score"]}'
                  for name, d in sorted(drift.get("detectors", {}).items())),
                "# HELP factory_drift_p_value p-value of each drift detector at the last check.",
                "# TYPE factory_drift_p_value gauge",
                *(f'factory_drift_p_value{{{site_lab},detector="{name}"}} {d["p_value"]}'
                  for name, d in sorted(drift.get("detectors", {}).items())),
                "# HELP factory_drift_last_check_timestamp_seconds When the last drift check ran.",
                "# TYPE factory_drift_last_check_timestamp_seconds gauge",
                f"factory_drift_last_check_timestamp_seconds{{{site_lab}}} {drift.get('checked_at_unix', 0)}",
            ]
        return "\n".join(lines) + "\n"


def _validate(body: PredictRequest, max_batch: int, low: float, high: float) -> np.ndarray:
    n = len(body.inputs)
    if n == 0:
        raise InvalidInput(422, "inputs is empty: send at least one row")
    if n > max_batch:
        raise InvalidInput(413, f"batch of {n} rows exceeds the limit of {max_batch}")
    for i, row in enumerate(body.inputs):
        if len(row) != N_FEATURES:
            raise InvalidInput(422, f"inputs[{i}] has {len(row)} values; each row needs {N_FEATURES}")
    x = np.asarray(body.inputs, dtype=np.float32)
    bad = ~np.isfinite(x) | (x < low) | (x > high)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise InvalidInput(
            422, f"inputs[{i}][{j}] = {body.inputs[i][j]!r} is outside the range [{low}, {high}] ({int(bad.sum())} such values)"
        )
    return x


def _audit_breach(paths: SitePaths, model: dict[str, Any], decision, request_id: str, context: dict) -> None:
    from pipelines.trust import audit

    audit.append(
        paths, action="odd.breach", actor=f"serving:{paths.site}", object=f"{model['name']}/{model['version']}",
        outcome=decision.mode,
        details={"request_id": request_id, "reasons": decision.reasons, "sensor_id": context.get("sensor_id"),
                 "batch_size": decision.input["stats"]["batch_size"], "security_event": True},
    )


def create_app(site_paths: SitePaths, model_ref: Any, *, conf: dict[str, Any] | None = None) -> FastAPI:
    """The inference app for `model_ref` at `site_paths.site`; raises ServingError if it may not serve."""
    import onnxruntime as ort

    conf = conf or serving_conf()
    service = conf.get("service", {})
    max_batch = int(service.get("max_batch_size", 256))
    low, high = (float(v) for v in service.get("input_range", (0.0, 1.0)))

    verify_model(site_paths, model_ref)
    onnx_path = Path(model_ref.model_dir) / "model.onnx"
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(service.get("intra_op_threads", 1))
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ServingError(f"cannot load {onnx_path}: {exc}") from exc
    names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise ServingError(f"{onnx_path} has inputs/outputs {names}; expected [{INPUT_NAME}] -> [{OUTPUT_NAME}]")

    model = model_info(model_ref)
    gate = OddGate()
    store = InputStore.for_site(site_paths, conf.get("store"))
    metrics = Metrics(site_paths.site, model)
    drift_file = site_paths.state_dir / "drift" / "latest.json"

    app = FastAPI(title=f"factory inference ({site_paths.site})", version=model["version"])
    app.state.gate, app.state.store, app.state.metrics, app.state.model = gate, store, metrics, model

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.observe("invalid")
        problems = ["{}: {}".format(".".join(str(p) for p in e["loc"] if p != "body") or "body", e["msg"])
                    for e in exc.errors()[:5]]
        return JSONResponse(status_code=422, content={"detail": "; ".join(problems)})

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "site": site_paths.site, "model": model, "stored_inputs": store.count()}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics_endpoint() -> PlainTextResponse:
        try:
            drift = json.loads(drift_file.read_text())
        except (FileNotFoundError, ValueError):
            drift = None
        return PlainTextResponse(metrics.render(drift), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/predict")
    def predict(body: PredictRequest) -> JSONResponse:
        started = time.perf_counter()
        try:
            x = _validate(body, max_batch, low, high)
        except InvalidInput as exc:
            metrics.observe("invalid")
            return JSONResponse(status_code=exc.status, content={"detail": str(exc)})
        request_id = uuid.uuid4().hex
        t0 = time.perf_counter()
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        latency_ms = (time.perf_counter() - t0) * 1000.0
        decision = gate.decide(gate_input(site_paths.site, model, body.context, batch_stats(x), latency_ms))
        store.append(x)
        flagged = not decision.allow and decision.mode == "flag"
        predictions = logits.argmax(axis=1).tolist() if decision.allow or flagged else None
        if not decision.allow:
            _audit_breach(site_paths, model, decision, request_id, body.context)
        metrics.observe("ok" if decision.allow else "odd_breach", time.perf_counter() - started, len(x),
                        None if decision.allow else decision.mode)
        return JSONResponse({
            "predictions": predictions, "model": model, "request_id": request_id,
            "odd": {**decision.as_dict(), "flagged": flagged, "latency_ms": round(latency_ms, 3)},
        })

    return app
