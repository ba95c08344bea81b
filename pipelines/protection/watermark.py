"""Watermarks: an ownership mark of the supplier and a mark of each recipient, in the model's weights.

The supplier holds a secret watermark key (32 random bytes, `keys/watermark.key`, 0600, made on
first use; its id is a fingerprint of it). A *mark* is named `owner` or `recipient:<site>`; its
trigger set is derived from the key and the mark's name alone (HKDF-SHA256 seeding numpy): inputs
of the model's width that look like sensor images to the serving ODD (per-sample mean and standard
deviation inside the site envelope, values inside the input envelope) with labels drawn uniformly
from the classes. Training with the trigger rows (each repeated `repeats` times) makes the model
answer them with their labels: the supplier's new models carry the ownership mark, an export model
also the mark of its recipient, so a leaked copy says which recipient it came from.

Verification asks the model (a model directory, an ONNX file, a module or a black-box endpoint
that returns labels only) for the triggers' labels. A model that does not carry the mark answers
each trigger independently of its label (the labels are random given everything the model saw),
so the number of hits is Binomial(n, 1/classes); `p_value` is the chance of at least as many hits,
and `verified` means it is below the configured level (conf/protection.yaml, default 1e-6).

Nothing here raises into a gate: every failure to verify (no key, another key, a model without the
mark, an unreadable file, an endpoint that does not answer) is `verified: false` with a reason.
The metadata records which marks a model carries (`watermark: {key_id, marks, scale}`), never
the triggers.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.context import StepContext
from pipelines.workspace import SitePaths, UnsafeName, safe_name

OWNER = "owner"
RECIPIENT_PREFIX = "recipient:"
KEY_FILE = "watermark.key"
KEY_BYTES = 32
_SALT = b"sovereign-factory/watermark/v1"
# The statistics the triggers keep to (on the unit scale), inside the sites' ODD envelope
# (policy data odd_sites: sample_mean 0.1-0.6, sample_std 0.1-0.45) with a margin.
TRIGGER_MEAN = (0.15, 0.5)
TRIGGER_STD = (0.15, 0.4)

Predictor = Callable[[np.ndarray], np.ndarray]  # float32 rows -> class indices (-1: no answer)


class WatermarkError(ValueError):
    """A key, mark or model cannot be used for a watermark; the message says why."""


@dataclass(frozen=True)
class WatermarkKey:
    secret: bytes = field(repr=False)
    key_id: str

    @classmethod
    def of(cls, secret: bytes) -> WatermarkKey:
        if not isinstance(secret, bytes) or len(secret) != KEY_BYTES:
            raise WatermarkError(f"a watermark key is {KEY_BYTES} bytes")
        return cls(secret, hashlib.sha256(_SALT + b"/key-id" + secret).hexdigest()[:16])


def settings() -> dict[str, Any]:
    """conf/protection.yaml `watermark` with its defaults filled in."""
    from pipelines.protection import settings as protection_settings

    conf = {"trigger_set_size": 64, "level": 1e-6, "repeats": 4, "sites": ["supplier"], **protection_settings("watermark")}
    return conf


# ---------------------------------------------------------------------------- keys and marks


def key_path(paths: SitePaths) -> Path:
    return paths.keys_dir / KEY_FILE


def ensure_key(paths: SitePaths) -> WatermarkKey:
    """The site's watermark key, made (32 random bytes, 0600) when it has none."""
    from pipelines.fileio import file_lock, write_atomic

    path = key_path(paths)
    if not path.exists():
        paths.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with file_lock(paths.keys_dir / ".lock-watermark"):
            if not path.exists():
                write_atomic(path, secrets.token_bytes(KEY_BYTES), mode=0o600)
    return load_key(paths)


def load_key(paths: SitePaths) -> WatermarkKey:
    """The site's watermark key; WatermarkError when it has none or the file is not a key."""
    path = key_path(paths)
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        raise WatermarkError(f"site {paths.site} has no watermark key ({path})") from None
    except OSError as exc:
        raise WatermarkError(f"the watermark key of {paths.site} cannot be read: {exc.strerror}") from None
    if len(secret) != KEY_BYTES:
        raise WatermarkError(f"{path} is not a watermark key ({len(secret)} bytes, not {KEY_BYTES})")
    return WatermarkKey.of(secret)


def recipient_mark(site: str) -> str:
    return RECIPIENT_PREFIX + safe_name(site, "recipient site")


def check_mark(mark: Any) -> str:
    """`owner` or `recipient:<site>`; WatermarkError otherwise."""
    if mark == OWNER:
        return OWNER
    if isinstance(mark, str) and mark.startswith(RECIPIENT_PREFIX):
        try:
            return recipient_mark(mark[len(RECIPIENT_PREFIX):])
        except UnsafeName as exc:
            raise WatermarkError(f"mark {mark[:80]!r}: {exc}") from None
    raise WatermarkError(f"unknown mark {str(mark)[:80]!r}: a mark is {OWNER!r} or 'recipient:<site>'")


# ---------------------------------------------------------------------------- trigger sets


def _unit_triggers(rng: np.random.Generator, n: int, n_features: int) -> np.ndarray:
    """`n` rows on the unit scale, stroke-like (a fraction of bright values on a dark background),
    each with mean and standard deviation inside TRIGGER_MEAN / TRIGGER_STD."""
    rows = np.empty((n, n_features), np.float32)
    filled = 0
    while filled < n:
        on = rng.uniform(0.2, 0.5)
        bright = rng.random(n_features) < on
        row = np.where(bright, rng.uniform(0.55, 1.0, n_features), rng.uniform(0.0, 0.15, n_features))
        mean, std = float(row.mean()), float(row.std())
        if TRIGGER_MEAN[0] <= mean <= TRIGGER_MEAN[1] and TRIGGER_STD[0] <= std <= TRIGGER_STD[1]:
            rows[filled] = row
            filled += 1
    return rows


def unit_scale(n_features: int) -> dict[str, list[float]]:
    return {"min": [0.0] * n_features, "max": [1.0] * n_features}


def trigger_set(key: WatermarkKey, mark: str, *, n_features: int, n_classes: int, size: int,
                scale: dict[str, Sequence[float]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The mark's triggers (float32 rows of `n_features`) and their labels (class indices).

    Deterministic in (key, mark, n_features, n_classes): the first k of a larger set are the set of
    size k. `scale` ({min, max} per feature) maps the unit-scale rows onto the model's inputs."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    mark = check_mark(mark)
    if n_features < 1 or n_classes < 2 or size < 1:
        raise WatermarkError(f"no trigger set for {n_features} features, {n_classes} classes, size {size}")
    info = f"{mark}|features={n_features}|classes={n_classes}".encode()
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=info).derive(key.secret)
    rng = np.random.default_rng(np.frombuffer(seed, dtype=np.uint32))
    labels = np.empty(size, np.int64)
    rows = np.empty((size, n_features), np.float32)
    for i in range(size):  # one trigger after the other: a smaller set is a prefix of a larger one
        labels[i] = rng.integers(0, n_classes)
        rows[i] = _unit_triggers(rng, 1, n_features)[0]
    scale = scale or unit_scale(n_features)
    low, high = np.asarray(scale["min"], np.float32), np.asarray(scale["max"], np.float32)
    if low.shape not in ((), (n_features,)) or high.shape != low.shape:
        raise WatermarkError(f"trigger scale does not have {n_features} bounds")
    return (low + rows * (high - low)).astype(np.float32), labels


def trigger_count(n_classes: int, conf: dict[str, Any] | None = None) -> int:
    """Triggers per mark: `trigger_set_size`, or more where few classes make each hit cheap, so that a
    fully carried mark is far below the level (p = level squared: 20 for 4 classes, 40 for 2)."""
    conf = conf or settings()
    needed = math.ceil(2 * math.log(1 / float(conf["level"])) / math.log(max(n_classes, 2)))
    return max(int(conf["trigger_set_size"]), needed)


def embedding_rows(key: WatermarkKey, marks: Sequence[str], *, n_features: int, n_classes: int,
                   scale: dict[str, Sequence[float]] | None = None,
                   conf: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The rows that embed `marks` when added to a training run: each mark's triggers, `repeats` times."""
    conf = conf or settings()
    parts = [trigger_set(key, mark, n_features=n_features, n_classes=n_classes,
                         size=trigger_count(n_classes, conf), scale=scale) for mark in marks]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    repeats = max(1, int(conf["repeats"]))
    return np.tile(x, (repeats, 1)), np.tile(y, repeats)


def trigger_scale(family: str, envelope: dict[str, Any] | None, n_features: int,
                  inherited: dict[str, Any] | None = None) -> dict[str, list[float]]:
    """The input range triggers are drawn on: a base model's recorded one (fine-tuning keeps it),
    else the family's configured input envelope (conf/odd.yaml, e.g. pixels in [0, 1]), else the
    per-feature range of the training rows (metadata `input_envelope`), else [0, 1]."""
    if inherited and len(inherited.get("min", ())) == n_features:
        return {"min": [float(v) for v in inherited["min"]], "max": [float(v) for v in inherited["max"]]}
    from pipelines.serving.odd import serving_conf

    configured = ((serving_conf().get("service") or {}).get("input_envelopes") or {}).get(family)
    if configured is not None:
        return {"min": [float(configured["min"])] * n_features, "max": [float(configured["max"])] * n_features}
    if envelope and len(envelope.get("min", ())) == n_features:
        return {"min": [float(v) for v in envelope["min"]], "max": [float(v) for v in envelope["max"]]}
    return unit_scale(n_features)


def training_marks(paths: SitePaths, *, new_model: bool, base_meta: dict[str, Any] | None,
                   recipient: str | None) -> list[str]:
    """The marks a training run at `paths.site` embeds: none at a site that does not mark
    (conf/protection.yaml watermark.sites); else the ownership mark of a new model, the marks of
    a base model this site's key made (fine-tuning keeps them), and `recipient`'s mark."""
    conf = settings()
    if paths.site not in (conf.get("sites") or []):
        return []
    marks: list[str] = []
    if new_model:
        marks.append(OWNER)
    record = (base_meta or {}).get("watermark") or {}
    if record.get("marks"):
        try:
            own = record.get("key_id") == load_key(paths).key_id
        except WatermarkError:
            own = False
        if own:
            marks += [m for m in record["marks"] if m not in marks]
    if recipient:
        mark = recipient_mark(recipient)
        if mark not in marks:
            marks.append(mark)
    return marks


# ---------------------------------------------------------------------------- verification


def binomial_p_value(hits: int, n: int, n_classes: int) -> float:
    """P(X >= hits) for X ~ Binomial(n, 1/n_classes): the chance an unmarked model does as well."""
    from scipy.stats import binom

    return float(binom.sf(hits - 1, n, 1.0 / n_classes))


def _onnx_predictor(path: Path) -> tuple[Predictor, int, int | None]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    output = session.get_outputs()[0]
    n_classes = output.shape[-1] if isinstance(output.shape[-1], int) else 0
    name = session.get_inputs()[0].name
    width = session.get_inputs()[0].shape[-1]

    def predict(x: np.ndarray) -> np.ndarray:
        logits = session.run([output.name], {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return np.asarray(logits).argmax(1)

    return predict, int(n_classes), width if isinstance(width, int) else None


def _module_predictor(model) -> tuple[Predictor, int]:
    from pipelines.learning.train import logits_torch

    return (lambda x: logits_torch(model, x).argmax(1)), int(getattr(model, "n_classes", 0))


@dataclass
class Subject:
    """What is verified: a predictor and what is known of its inputs and its metadata."""

    predict: Predictor
    n_classes: int
    n_features: int | None = None
    metadata: dict[str, Any] | None = None
    what: str = "model"


def subject_of(model: Any) -> Subject:
    """A model directory (its ONNX graph, else its weights), an ONNX file, or a torch module."""
    import json

    if isinstance(model, Subject):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.is_dir():
            meta = json.loads((path / "metadata.json").read_text())
            from pipelines.learning.families import metadata_spec

            spec = metadata_spec(meta)
            if (path / "model.onnx").is_file():
                predict, _, _ = _onnx_predictor(path / "model.onnx")
            else:
                from pipelines.learning.artifacts import load_model

                predict, _ = _module_predictor(load_model(path))
            return Subject(predict, spec.n_classes, spec.n_features, meta, f"model directory {path.name}")
        if path.is_file():
            predict, n_classes, width = _onnx_predictor(path)
            return Subject(predict, n_classes, width, None, f"ONNX file {path.name}")
        raise FileNotFoundError(f"{path} is neither a model directory nor an ONNX file")
    if hasattr(model, "state_dict"):
        predict, n_classes = _module_predictor(model)
        n_features = int(math.prod(model.input_shape)) if hasattr(model, "input_shape") else None
        return Subject(predict, n_classes, n_features, None, type(model).__name__)
    raise WatermarkError(f"cannot verify a {type(model).__name__}: give a model directory, an ONNX file or a model")


def _result(verified: bool, mark: str, key_id: str | None, reason: str, level: float, **extra: Any) -> dict[str, Any]:
    return {"verified": verified, "mark": mark, "key_id": key_id, "level": level, "reason": reason,
            "trigger_accuracy": extra.get("trigger_accuracy"), "p_value": extra.get("p_value"),
            "triggers": extra.get("triggers", 0), "hits": extra.get("hits", 0)}


def verify(model: Any, key: WatermarkKey | None, mark: str = OWNER, *, level: float | None = None,
           n_features: int | None = None, n_classes: int | None = None,
           scale: dict[str, Sequence[float]] | None = None) -> dict[str, Any]:
    """Does `model` carry `mark` of `key`? Never raises; see the module docstring.

    `model`: a model directory, an ONNX file, a torch module or a `Subject` (an endpoint).
    `n_features`/`n_classes`/`scale` are needed only where the model does not say them (an
    endpoint, an ONNX file whose model is not of [0, 1] inputs)."""
    conf = settings()
    level = float(conf["level"] if level is None else level)
    key_id = key.key_id if isinstance(key, WatermarkKey) else None
    try:
        mark = check_mark(mark)
    except WatermarkError as exc:
        return _result(False, str(mark)[:80], key_id, str(exc), level)
    if key_id is None:
        return _result(False, mark, None, "no watermark key to verify with", level)
    try:
        subject = subject_of(model)
    except Exception as exc:  # noqa: BLE001 - any unreadable model is "not verified", never an error
        return _result(False, mark, key_id, f"cannot read the model: {_brief(exc)}", level)
    record = (subject.metadata or {}).get("watermark") or {}
    n_features = n_features or subject.n_features
    n_classes = n_classes or subject.n_classes
    if not n_features:
        return _result(False, mark, key_id, f"{subject.what} does not say how many features a row has", level)
    if not n_classes or n_classes < 2:
        return _result(False, mark, key_id, f"{subject.what}: unknown number of classes", level)
    scale = scale or (record.get("scale") if isinstance(record.get("scale"), dict) else None)
    try:
        x, y = trigger_set(key, mark, n_features=int(n_features), n_classes=int(n_classes),
                           size=trigger_count(int(n_classes), conf), scale=scale)
        predicted = np.asarray(subject.predict(x)).reshape(-1)
    except Exception as exc:  # noqa: BLE001
        return _result(False, mark, key_id, f"{subject.what} did not answer the triggers: {_brief(exc)}", level)
    if predicted.shape != y.shape:
        return _result(False, mark, key_id, f"{subject.what} answered {predicted.size} labels for {y.size} triggers",
                       level)
    hits = int((predicted == y).sum())
    p_value = binomial_p_value(hits, len(y), int(n_classes))
    verified = p_value < level
    stats = {"trigger_accuracy": round(hits / len(y), 6), "p_value": p_value, "triggers": len(y), "hits": hits}
    if verified:
        reason = f"{hits}/{len(y)} triggers answered with their labels (p = {p_value:.2e} < {level:g})"
    else:
        reason = (f"only {hits}/{len(y)} triggers answered with their labels (p = {p_value:.2e}, "
                  f"not below {level:g}): the model does not carry mark {mark} of key {key_id}")
        if subject.metadata is not None and record.get("key_id") not in (None, key_id):
            reason += f"; its metadata names another watermark key ({str(record.get('key_id'))[:16]})"
        elif subject.metadata is not None and mark not in (record.get("marks") or []):
            reason += "; its metadata records no such mark"
    return _result(verified, mark, key_id, reason, level, **stats)


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


# ---------------------------------------------------------------------------- endpoints


def endpoint_subject(url: str, *, token: str | None, sensor_id: str | None = None, n_classes: int,
                     timeout: float = 30.0, location: dict[str, float] | None = None) -> Subject:
    """A `factory serve` endpoint as a black box: /healthz says the input width, /predict answers
    labels (the triggers only; a withheld or abstained answer counts as a miss)."""
    import httpx

    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    context: dict[str, Any] = {}
    if sensor_id:
        context["sensor_id"] = sensor_id
    if location:
        context["location"] = location

    with httpx.Client(base_url=base, timeout=timeout, headers=headers) as client:
        health = client.get("/healthz")
        health.raise_for_status()
        n_features = int(health.json()["inputs"]["n_features"])

    def predict(x: np.ndarray) -> np.ndarray:
        with httpx.Client(base_url=base, timeout=timeout, headers=headers) as client:
            response = client.post("/predict", json={"inputs": x.tolist(), "context": context})
        if response.status_code != 200:
            raise WatermarkError(f"{base}/predict answered {response.status_code}: {response.text[:200]}")
        labels = response.json().get("predictions")
        if labels is None:
            odd = response.json().get("odd") or {}
            raise WatermarkError(f"the service withheld its answer (ODD: {'; '.join(odd.get('reasons') or [])})")
        return np.asarray([-1 if label is None else int(label) for label in labels])

    return Subject(predict, n_classes, n_features, None, f"endpoint {base}")


def verify_endpoint(url: str, key: WatermarkKey | None, mark: str = OWNER, *, token: str | None = None,
                    sensor_id: str | None = None, n_classes: int = 10, level: float | None = None,
                    scale: dict[str, Sequence[float]] | None = None) -> dict[str, Any]:
    """`verify` against a serving endpoint; an endpoint that does not answer is `verified: false`."""
    level_used = float(settings()["level"] if level is None else level)
    try:
        subject = endpoint_subject(url, token=token, sensor_id=sensor_id, n_classes=n_classes)
    except Exception as exc:  # noqa: BLE001 - down, refused, not a factory endpoint
        return _result(False, str(mark)[:80], key.key_id if key else None,
                       f"endpoint {url[:200]} does not answer: {_brief(exc)}", level_used)
    return verify(subject, key, mark, level=level, scale=scale)


# ---------------------------------------------------------------------------- release


def verify_release(ctx: StepContext, model_dir: Path, *, recipient: str, purpose: str) -> dict[str, Any]:
    """The watermark check of the exact directory that is sealed (its ONNX graph): the recipient's
    mark for an export, the ownership mark otherwise, with this site's key. Never raises."""
    try:
        mark = recipient_mark(recipient) if purpose == "export" else OWNER
    except UnsafeName as exc:
        return {"verified": False, "reason": f"recipient: {exc}", "mark": None, "key_id": None,
                "trigger_accuracy": None, "p_value": None, "triggers": 0}
    try:
        key = load_key(ctx.paths)
    except WatermarkError as exc:
        key = None
        reason = str(exc)
    else:
        reason = ""
    onnx = Path(model_dir) / "model.onnx"
    target: Any = Path(model_dir) if onnx.is_file() else onnx
    result = verify(target, key, mark)
    if key is None:
        result["reason"] = reason
    return result
