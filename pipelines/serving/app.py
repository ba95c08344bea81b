"""The site's inference service: a FastAPI app around one signed ONNX model.

`create_app(site_paths, model_ref)` verifies the model directory's signature before anything is
loaded (a bad or missing signature refuses to start: `ServingError`), and refuses to start while no
client holds a token (`factory serve token add`) unless authentication is switched off. It serves

- `POST /predict` `{"inputs": [[n floats], ...], "context": {"sensor_id", "location":
  {"lat", "lon"}, "latency_budget_ms"}}` →
  `{"predictions": [label, ...] | null, "outputs": [{"label", "confidence", "abstained"}, ...] | null,
  "restrictions": {...}, "model": {...}, "request_id", "odd": {"allow", "mode", "reasons", "flagged"}}`
  (see "Capability restrictions" below);
  every request is checked against the site's ODD (`policies/odd`), a breach answers in safe mode
  and is written to the audit log as `odd.breach` with the client's name (at most
  `audit.breaches_per_client` per client and window; the rest are counted and summarised in one
  `serving.audit_suppressed` entry); only inputs the ODD allowed go to the site's input store;
- `GET /metrics` (Prometheus text format), both behind a bearer token per client;
- `GET /healthz`, open (says the input width the model takes).

A model version revoked at the site (a withdrawn contribution, `pipelines.learning.revocations`) is
refused at start (`ServingError`), and once the site's revocation list names it while it is served,
`/predict` answers 410 naming the revocation (no restart; the list is re-read only when it changed).

The model's metadata (signed with it) says what a row is: its spec gives the width n (rows of
another width are refused with 422 naming n), its family the input envelope every value must lie
in (`odd.input_envelope`; outside it: 422).

Capability restrictions. An export variant may carry `restrictions` in its (signed) metadata
(`pipelines.learning.restrictions`: `{"abstain_classes": [3, 7], "max_confidence": 0.9}`, both
optional); the service refuses to start when they are malformed or name a class the model does not
have, and enforces them on every answer:

- `predictions[i]` is the class index of row i (the most probable class), or `null` when that class
  is one the model abstains on;
- `outputs[i]` is `{"label": int, "confidence": float, "abstained": false}` — `confidence` is the
  softmax probability of `label`, at most `max_confidence` — or, for an abstention,
  `{"label": null, "confidence": null, "abstained": true}`: nothing about the abstained class leaves;
- `restrictions` is the enforced restriction (`{}` for an unrestricted model, whose `predictions`
  are the plain argmax and whose confidences are uncapped).

A request the ODD withholds gets `"predictions": null, "outputs": null`.

`ServiceGuard` (guard.py) authenticates and bounds the body before FastAPI parses anything; the
context is a closed schema (known keys, bounded strings, ranged numbers), so an audit entry holds
only bounded data.

Extraction (`pipelines.protection.extraction`, conf/protection.yaml `extraction`): each row is a
query of the authenticated client. A client over its query budget, or throttled after a detection,
gets 429 with `Retry-After` and a message saying which; answered rows feed the client's PRADA
detector, and a detection is audited once per episode as `serving.extraction_suspected`.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.concurrency import run_in_threadpool

from pipelines.learning import restrictions as capability
from pipelines.learning.revocations import RevocationWatch
from pipelines.learning.revocations import describe as describe_revocation
from pipelines.protection.extraction import Detection, ExtractionConfError, ExtractionMonitor
from pipelines.serving.clients import AuthResult, ClientRegistry
from pipelines.serving.guard import ANONYMOUS, CLIENT_SCOPE_KEY, AuditLimiter, ServiceGuard, Suppressed
from pipelines.serving.odd import (
    InputEnvelope,
    OddGate,
    batch_stats,
    gate_input,
    input_envelope,
    serving_conf,
)
from pipelines.serving.store import InputStore
from pipelines.workspace import SitePaths

INPUT_NAME, OUTPUT_NAME = "input", "logits"
JSON_BYTES_PER_VALUE = 24  # a float as JSON text with its separator, at most about this long
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


SENSOR_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class Location(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    lat: float = Field(ge=-90.0, le=90.0)
    lon: float = Field(ge=-180.0, le=180.0)


class RequestContext(BaseModel):
    """What a client may say about its request; the ODD reads these and nothing else."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    sensor_id: Annotated[str, StringConstraints(pattern=SENSOR_ID)] | None = None
    location: Location | None = None
    latency_budget_ms: float | None = None  # range from conf: service.client_latency_budget_ms


class PredictRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    inputs: list[list[float]]
    context: RequestContext = RequestContext()


class InvalidInput(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def model_info(model_ref: Any) -> dict[str, Any]:
    return {"name": model_ref.name, "version": str(model_ref.version), "stage": model_ref.stage}


def verify_model(paths: SitePaths, model_ref: Any) -> dict[str, Any]:
    """Verify the model directory's signature against the trust store of the serving site and
    return its metadata (covered by the signature).

    The signer is the site that trained the model (`metadata.site`); fails closed on any error."""
    from pipelines.trust.signing import verify_model_dir

    model_dir = Path(model_ref.model_dir)
    try:
        metadata = json.loads((model_dir / "metadata.json").read_text())
        signer = metadata.get("site") or paths.site
        verify_model_dir(model_dir, paths=paths, signer_site=signer)
    except Exception as exc:
        raise ServingError(f"refusing to serve {model_ref.name}/{model_ref.version}: {exc}") from exc
    return metadata


@dataclass(frozen=True)
class ModelInputs:
    """What a request row of the served model is: its width, shape and the envelope its values lie in;
    and what it may answer: its number of classes and its capability restrictions ({}: none)."""

    n_features: int
    input_shape: tuple[int, ...]
    envelope: InputEnvelope
    n_classes: int = 0
    restrictions: dict[str, Any] = field(default_factory=dict)


def model_inputs(model_ref: Any, metadata: dict[str, Any], service: dict[str, Any]) -> ModelInputs:
    """The inputs of the served model, from its (verified) metadata; ServingError when unusable
    (restrictions that are malformed or name a class the model does not have included)."""
    from pipelines.learning.families import FamilyError, metadata_family, metadata_spec

    try:
        spec = metadata_spec(metadata)
        envelope = input_envelope(metadata_family(metadata), metadata, spec.n_features, service)
        restrictions = capability.parse(metadata.get("restrictions"), spec.n_classes)
    except (FamilyError, ValueError) as exc:  # RestrictionError is a ValueError
        raise ServingError(f"refusing to serve {model_ref.name}/{model_ref.version}: {exc}") from exc
    return ModelInputs(spec.n_features, tuple(spec.input_shape), envelope, spec.n_classes, restrictions)


class Metrics:
    """Counters and a latency histogram rendered in the Prometheus text exposition format."""

    def __init__(self, site: str, model: dict[str, Any], suppressed: dict[str, AuditLimiter] | None = None,
                 extraction: ExtractionMonitor | None = None) -> None:
        self.labels = f'site="{site}",model="{model["name"]}",version="{model["version"]}"'
        self.extraction = extraction
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.breaches: dict[str, int] = {}
        self.auth_failures: dict[str, int] = {}
        self.suppressed = suppressed or {}  # audit event -> its limiter (counts the events left out)
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

    def auth_failure(self, reason: str) -> None:
        with self._lock:
            self.auth_failures[reason] = self.auth_failures.get(reason, 0) + 1

    def render(self, drift: dict[str, Any] | None) -> str:
        lab = self.labels
        suppressed = sorted((event, key, n) for event, limiter in self.suppressed.items()
                            for key, n in limiter.suppressed_counts().items())
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
                "# HELP factory_serving_auth_failures_total Requests refused for their credential, by reason.",
                "# TYPE factory_serving_auth_failures_total counter",
                *(f'factory_serving_auth_failures_total{{{lab},reason="{r}"}} {n}'
                  for r, n in sorted(self.auth_failures.items())),
                "# HELP factory_serving_audit_suppressed_total Security events counted but not audited one by one"
                " (over the rate limit; summarised in serving.audit_suppressed entries).",
                "# TYPE factory_serving_audit_suppressed_total counter",
                *(f'factory_serving_audit_suppressed_total{{{lab},event="{e}",key="{k}"}} {n}'
                  for e, k, n in suppressed),
            ]
        if self.extraction is not None:
            monitor = self.extraction
            lines += [
                "# HELP factory_serving_extraction_suspected_total Clients detected as extracting the model"
                " (episodes opened).",
                "# TYPE factory_serving_extraction_suspected_total counter",
                f"factory_serving_extraction_suspected_total{{{lab}}} {monitor.detections_total}",
                "# HELP factory_serving_extraction_throttled_clients Clients throttled now.",
                "# TYPE factory_serving_extraction_throttled_clients gauge",
                f"factory_serving_extraction_throttled_clients{{{lab}}} {len(monitor.throttled())}",
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


def _bound(value: float) -> float:
    return float(f"{value:.6g}")


def _validate(body: PredictRequest, max_batch: int, inputs: ModelInputs,
              budget_range: tuple[float, float]) -> np.ndarray:
    budget = body.context.latency_budget_ms
    if budget is not None and not budget_range[0] <= budget <= budget_range[1]:
        raise InvalidInput(422, f"context.latency_budget_ms = {budget!r} is outside the range a client may ask for, "
                                f"[{budget_range[0]}, {budget_range[1]}] ms")
    n = len(body.inputs)
    if n == 0:
        raise InvalidInput(422, "inputs is empty: send at least one row")
    if n > max_batch:
        raise InvalidInput(413, f"batch of {n} rows exceeds the limit of {max_batch}")
    for i, row in enumerate(body.inputs):
        if len(row) != inputs.n_features:
            raise InvalidInput(422, f"inputs[{i}] has {len(row)} values; each row needs {inputs.n_features} "
                                    f"(the model's input shape {list(inputs.input_shape)})")
    x = np.asarray(body.inputs, dtype=np.float32)
    bad = ~np.isfinite(x) | inputs.envelope.outside(x)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        low, high = _bound(inputs.envelope.low[j]), _bound(inputs.envelope.high[j])
        raise InvalidInput(
            422, f"inputs[{i}][{j}] = {body.inputs[i][j]!r} is outside the range [{low}, {high}] "
                 f"({int(bad.sum())} such values; envelope: {inputs.envelope.source})"
        )
    return x


def _audit_breach(paths: SitePaths, model: dict[str, Any], decision, request_id: str, client: str,
                  context: dict) -> None:
    from pipelines.trust import audit

    audit.append(
        paths, action="odd.breach", actor=f"client:{client}", object=f"{model['name']}/{model['version']}",
        outcome=decision.mode,
        details={"request_id": request_id, "client": client, "reasons": decision.reasons,
                 "sensor_id": context.get("sensor_id"), "batch_size": decision.input["stats"]["batch_size"],
                 "security_event": True},
    )


def _audit_denied(paths: SitePaths, model: dict[str, Any], result: AuthResult, path: str, remote: str | None) -> None:
    from pipelines.trust import audit

    audit.append(
        paths, action="serving.auth_denied", actor=f"client:{result.client}" if result.client else "unknown",
        object=f"{model['name']}/{model['version']}", outcome="denied",
        details={"reason": result.reason, "path": path if path in ("/predict", "/metrics") else "other",
                 "remote": (remote or "")[:64], "security_event": True},
    )


def _audit_suppressed(paths: SitePaths, model: dict[str, Any], event: str, summary: Suppressed) -> None:
    from pipelines.trust import audit

    audit.append(
        paths, action="serving.audit_suppressed", actor=f"serving:{paths.site}",
        object=f"{model['name']}/{model['version']}", outcome="suppressed",
        details={"event": event, "key": summary.key, "count": summary.count, "window_start": summary.window_start,
                 "window_seconds": summary.window_seconds, "security_event": True},
    )


def _audit_extraction(paths: SitePaths, model: dict[str, Any], detection: Detection) -> None:
    from pipelines.trust import audit

    audit.append(
        paths, action="serving.extraction_suspected", actor=f"client:{detection.client}",
        object=f"{model['name']}/{model['version']}", outcome="throttled",
        details={**detection.as_dict(), "detector": "prada", "security_event": True},
    )


def create_app(site_paths: SitePaths, model_ref: Any, *, conf: dict[str, Any] | None = None,
               auth: bool = True, extraction: dict[str, Any] | None = None) -> FastAPI:
    """The inference app for `model_ref` at `site_paths.site`; raises ServingError if it may not serve.

    `auth=False` (local development only) lets every caller in as `anonymous`. `extraction` replaces
    conf/protection.yaml's `extraction` section (budgets, detector, throttle)."""
    import onnxruntime as ort

    conf = conf or serving_conf()
    service = conf.get("service", {})
    max_batch = int(service.get("max_batch_size", 256))
    budget_lo, budget_hi = (float(v) for v in service.get("client_latency_budget_ms", (1.0, 60000.0)))
    limits = service.get("audit", {})
    window_s = float(limits.get("window_s", 60))

    # A version a withdrawn contribution revoked here is never loaded, and stops answering (410) as soon
    # as the site's revocation list names it: one stat of the list per request while it is unchanged.
    revocation = RevocationWatch(site_paths, model_ref.name, str(model_ref.version))
    if revoked := (getattr(model_ref, "revoked", None) or revocation.check()):
        raise ServingError(f"refusing to serve {model_ref.name}/{model_ref.version}: it is {describe_revocation(revoked)}")
    metadata = verify_model(site_paths, model_ref)
    inputs = model_inputs(model_ref, metadata, service)
    max_body = int(service.get("max_body_bytes", 1 << 20))
    if max_body < inputs.n_features * JSON_BYTES_PER_VALUE + 1024:
        raise ServingError(
            f"service.max_body_bytes {max_body} cannot hold one request row of {model_ref.name}/{model_ref.version} "
            f"({inputs.n_features} values, up to about {inputs.n_features * JSON_BYTES_PER_VALUE + 1024} bytes of "
            "JSON): raise it in conf/odd.yaml")
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
    width = session.get_inputs()[0].shape[-1]
    if isinstance(width, int) and width != inputs.n_features:
        raise ServingError(f"{onnx_path} takes rows of {width} features; its metadata spec says {inputs.n_features}")
    classes = session.get_outputs()[0].shape[-1]
    if inputs.restrictions and isinstance(classes, int) and classes != inputs.n_classes:
        raise ServingError(f"{onnx_path} answers {classes} classes; its metadata spec says {inputs.n_classes}, "
                           "so its restrictions cannot be enforced")

    registry = None
    if auth:
        registry = ClientRegistry.for_site(site_paths)
        if not registry.active():
            raise ServingError(
                f"no client may call the service of {site_paths.site}"
                f"{': ' + registry.problem if registry.problem else ''}; add one with `factory serve token add "
                f"--site {site_paths.site} --client NAME` (or pass --no-auth for local development)"
            )

    model = model_info(model_ref)
    try:
        monitor = ExtractionMonitor.for_site(site_paths, inputs.n_features, extraction)
    except ExtractionConfError as exc:
        raise ServingError(f"refusing to serve {model_ref.name}/{model_ref.version}: {exc}") from exc
    gate = OddGate(site_paths)
    store = InputStore.for_site(site_paths, conf.get("store"), n_features=inputs.n_features)
    limiters = {"odd.breach": AuditLimiter(int(limits.get("breaches_per_client", 10)), window_s),
                "serving.auth_denied": AuditLimiter(int(limits.get("auth_failures", 10)), window_s)}
    metrics = Metrics(site_paths.site, model, limiters, monitor)
    drift_file = site_paths.state_dir / "drift" / "latest.json"

    def write_summaries(flush_all: bool = False) -> None:
        for event, limiter in limiters.items():
            for summary in limiter.due(flush_all=flush_all):
                _audit_suppressed(site_paths, model, event, summary)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await run_in_threadpool(write_summaries, True)

    async def on_denied(result: AuthResult, scope: dict) -> None:
        metrics.auth_failure(result.reason)
        remote = (scope.get("client") or (None,))[0]
        audited = limiters["serving.auth_denied"].admit("unauthenticated")
        await run_in_threadpool(write_summaries)
        if audited:
            await run_in_threadpool(_audit_denied, site_paths, model, result, scope["path"], remote)

    app = FastAPI(title=f"factory inference ({site_paths.site})", version=model["version"], lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(ServiceGuard, registry=registry, max_body_bytes=max_body,
                       on_denied=on_denied, on_too_large=lambda: metrics.observe("too_large"))
    app.state.gate, app.state.store, app.state.metrics, app.state.model = gate, store, metrics, model
    app.state.inputs = inputs
    app.state.registry = registry
    app.state.extraction = monitor

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.observe("invalid")
        problems = ["{}: {}".format(".".join(str(p) for p in e["loc"] if p != "body") or "body", e["msg"])
                    for e in exc.errors()[:5]]
        return JSONResponse(status_code=422, content={"detail": "; ".join(problems)})

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        revoked = revocation.check()
        return {"status": "revoked" if revoked else "ok", "site": site_paths.site, "model": model,
                **({"revocation": revoked} if revoked else {}), "stored_inputs": store.count(),
                "inputs": {"n_features": inputs.n_features, "input_shape": list(inputs.input_shape)}}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics_endpoint() -> PlainTextResponse:
        try:
            drift = json.loads(drift_file.read_text())
        except (FileNotFoundError, ValueError):
            drift = None
        return PlainTextResponse(metrics.render(drift), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/predict")
    def predict(body: PredictRequest, request: Request) -> JSONResponse:
        started = time.perf_counter()
        if revoked := revocation.check():
            metrics.observe("revoked")
            return JSONResponse(status_code=410, content={
                "detail": f"{model['name']}/{model['version']} is {describe_revocation(revoked)}; it no longer answers",
                "revocation": revoked})
        client = request.scope.get(CLIENT_SCOPE_KEY, ANONYMOUS)
        try:
            x = _validate(body, max_batch, inputs, (budget_lo, budget_hi))
        except InvalidInput as exc:
            metrics.observe("invalid")
            return JSONResponse(status_code=exc.status, content={"detail": str(exc)})
        refusal = monitor.admit(client, len(x))
        if refusal is not None:
            metrics.observe(refusal.reason)
            return JSONResponse(status_code=429, content={"detail": refusal.detail, "reason": refusal.reason},
                                headers={"Retry-After": str(refusal.retry_after_s)})
        request_id = uuid.uuid4().hex
        context = body.context.model_dump(exclude_none=True)
        t0 = time.perf_counter()
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        latency_ms = (time.perf_counter() - t0) * 1000.0
        stats = batch_stats(inputs.envelope.scaled(x))  # the ODD's statistics on the envelope's [0, 1] scale
        decision = gate.decide(gate_input(site_paths.site, model, context, stats, latency_ms))
        if decision.allow:  # inputs outside the ODD never reach the drift input store
            store.append(x)
        flagged = not decision.allow and decision.mode == "flag"
        predictions = outputs = None
        detection = None
        if decision.allow or flagged:
            detection = monitor.observe(client, x, logits.argmax(axis=1))
            answered = capability.apply(logits, inputs.restrictions)
            predictions = answered.labels
            outputs = [{"label": label, "confidence": confidence, "abstained": abstained}
                       for label, confidence, abstained in zip(answered.labels, answered.confidences,
                                                               answered.abstained, strict=True)]
        audited = not decision.allow and limiters["odd.breach"].admit(client)
        write_summaries()  # of windows that ended with events left out: before this window's first entry
        if audited:
            _audit_breach(site_paths, model, decision, request_id, client, context)
        if detection is not None:
            _audit_extraction(site_paths, model, detection)
        metrics.observe("ok" if decision.allow else "odd_breach", time.perf_counter() - started, len(x),
                        None if decision.allow else decision.mode)
        return JSONResponse({
            "predictions": predictions, "outputs": outputs, "restrictions": inputs.restrictions,
            "model": model, "request_id": request_id,
            "odd": {**decision.as_dict(), "flagged": flagged, "latency_ms": round(latency_ms, 3)},
        })

    return app
