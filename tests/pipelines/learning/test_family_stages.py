"""Model families through the training steps, the registry, the inference service and drift, on
datasets of other shapes and class counts than the digits (a 7-feature, 4-class table and 3x12x12,
3-class pixel images), registered in the origin's catalog with their spec. Real MLflow, DVC,
signing, ONNX Runtime and drift detectors; no Airflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from family_data import IMAGE, TABULAR, frame, prototypes, to_units

from pipelines.config import load_config
from pipelines.learning import registry
from pipelines.steps import StepContext, StepError, run_step
from pipelines.workspace import SitePaths

FLAGS = {"classification": "secret", "local_only": True, "export_authorized": False, "releasable_to": [],
         "purposes": ["training", "evaluation"]}
SENSOR = "ORG-SN-0003"
CASES = {"tabular-mlp": ("sensors", TABULAR), "resnet-small": ("tiles", IMAGE)}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    from pipelines.init import init_workspace

    home = tmp_path_factory.mktemp("factory")
    init_workspace(home)
    return home


def _ctx(home: Path) -> StepContext:
    return StepContext(site="origin", paths=SitePaths.of("origin", home), run_id="test-run", dag_id="test")


@pytest.fixture(scope="module")
def datasets(home) -> dict[str, object]:
    """The origin's own table and image datasets, train and test split of each."""
    from pipelines.data.catalog import register_dataset

    paths = SitePaths.of("origin", home)
    versions = {}
    for name, spec, rows, seed in [("sensors", TABULAR, 400, 11), ("sensors_test", TABULAR, 200, 12),
                                   ("tiles", IMAGE, 300, 21), ("tiles_test", IMAGE, 150, 22)]:
        path = paths.data_dir / f"{name}.parquet"
        frame(spec, rows, seed=seed).to_parquet(path, index=False)
        versions[name] = register_dataset(paths, name, path, flags=FLAGS, extra={"spec": spec.to_dict()})
    return versions


def _train(ctx: StepContext, *, stage: str, datasets: list[str], test: str, **kwargs) -> dict:
    trained = run_step("train_model", ctx, stage=stage, profile="local", datasets=datasets, **kwargs)
    evaluated = run_step("evaluate_model", ctx, trained=trained, test_sets={"test": test},
                         min_accuracy={"test": 0.8})
    exported = run_step("export_model", ctx, trained=evaluated, parity_set=test)
    return run_step("register_model", ctx, trained=exported)


@pytest.fixture(scope="module", params=sorted(CASES))
def model(request, home, datasets) -> dict:
    """An M4 of the family, trained, evaluated, exported and registered by the steps."""
    family = request.param
    name, spec = CASES[family]
    registered = _train(_ctx(home), stage="M4", datasets=[name], test=f"{name}_test", family=family)
    ref = registry.resolve_model(SitePaths.of("origin", home), "M4", family=family)
    return {"family": family, "dataset": name, "spec": spec, "registered": registered, "ref": ref}


def test_steps_record_family_spec_and_envelope(model, datasets):
    ref, spec = model["ref"], model["spec"]
    assert ref.name == f"{model['family']}-m4" == model["registered"]["name"]
    meta = ref.metadata
    assert meta["family"] == model["family"] and meta["spec"] == spec.to_dict()
    assert meta["architecture"]["architecture"] in ("mlp", "resnet")
    assert len(meta["input_envelope"]["min"]) == len(meta["input_envelope"]["max"]) == spec.n_features
    assert meta["metrics"]["test"] >= 0.8
    assert meta["metrics"]["onnx_parity_max_abs"] < load_config().stages.onnx_parity_max_abs
    assert meta["reference_data"] == [datasets[model["dataset"]].id]


def test_registered_model_loads_back_as_its_family(model):
    from pipelines.learning.artifacts import load_model
    from pipelines.learning.onnx_export import logits_onnx
    from pipelines.learning.train import logits_torch

    x = frame(model["spec"], 20, seed=5)
    rows = model["spec"].features(x)
    loaded = load_model(model["ref"].model_dir)
    assert loaded.input_shape == model["spec"].input_shape and loaded.n_classes == model["spec"].n_classes
    np.testing.assert_allclose(logits_torch(loaded, rows), logits_onnx(model["ref"].model_dir / "model.onnx", rows),
                               atol=1e-4)


@pytest.fixture(scope="module")
def token(home) -> str:
    from pipelines.serving.clients import add_client

    return add_client(SitePaths.of("origin", home), "family-client")


@pytest.fixture(scope="module")
def service(model, home, token):
    from fastapi.testclient import TestClient

    from pipelines.serving.app import create_app

    # One client streams the drift test's one-class rows, which is how seed expansion looks to the
    # extraction detector (a static scene; see pipelines/protection/extraction.py): it has tests of its own.
    app = create_app(SitePaths.of("origin", home), model["ref"], extraction={"enabled": False})
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        yield client, app


def _post(client, rows):
    return client.post("/predict", json={"inputs": np.asarray(rows).tolist(), "context": {"sensor_id": SENSOR}})


def _test_rows(model, n: int, seed: int) -> np.ndarray:
    return model["spec"].features(frame(model["spec"], n, seed=seed))


def test_service_predicts_rows_of_the_model_width(service, model):
    client, app = service
    n = model["spec"].n_features
    assert client.get("/healthz").json()["inputs"] == {"n_features": n, "input_shape": list(model["spec"].input_shape)}
    response = _post(client, _test_rows(model, 16, seed=31))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["odd"]["mode"] == "normal", body["odd"]
    assert len(body["predictions"]) == 16 and all(0 <= p < model["spec"].n_classes for p in body["predictions"])


def test_service_refuses_rows_of_another_width_naming_the_width(service, model):
    client, _ = service
    n = model["spec"].n_features
    response = _post(client, np.full((2, 64 if n != 64 else 63), 0.5))
    assert response.status_code == 422
    assert f"each row needs {n} (the model's input shape {list(model['spec'].input_shape)})" in response.json()["detail"]


def test_service_refuses_values_outside_the_model_envelope(service, model):
    client, app = service
    row = _test_rows(model, 1, seed=32)
    envelope = app.state.inputs.envelope
    row[0, 2] = envelope.high[2] + abs(envelope.high[2]) + 1.0
    response = _post(client, row)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert f"inputs[0][2] = {float(row[0, 2])!r} is outside the range" in detail
    source = "training data range" if model["family"] == "tabular-mlp" else "input_envelopes.resnet-small"
    assert source in detail


@pytest.mark.parametrize("model", ["tabular-mlp"], indirect=True)  # resnet-small's envelope is conf/odd.yaml's
def test_tabular_envelope_is_derived_from_the_training_data(service, model, datasets):
    _, app = service
    envelope = app.state.inputs.envelope
    train_rows = TABULAR.features(frame(TABULAR, 400, seed=11))
    span = train_rows.max(axis=0) - train_rows.min(axis=0)
    np.testing.assert_allclose(envelope.low, train_rows.min(axis=0) - 0.1 * span, rtol=1e-5)
    np.testing.assert_allclose(envelope.high, train_rows.max(axis=0) + 0.1 * span, rtol=1e-5)


def _shifted_rows(model, n: int) -> np.ndarray:
    """Rows of one class only (a sensor that sees nothing else): a shift inside the input envelope."""
    spec = model["spec"]
    rng = np.random.default_rng(77)
    unit = np.clip(prototypes(spec)[0] + rng.normal(0.0, 0.06, (n, spec.n_features)), 0.0, 1.0)
    rows = to_units(spec, unit)
    return np.round(rows * 255) / 255 if spec.encoding == "pixels" else rows


def test_drift_runs_on_the_model_width(service, model, home, datasets):
    from pipelines.serving.drift import check_drift
    from pipelines.serving.odd import serving_conf
    from pipelines.serving.store import InputStore

    client, _ = service
    paths = SitePaths.of("origin", home)
    store = InputStore.for_site(paths, serving_conf().get("store"), n_features=model["spec"].n_features)
    store.clear()
    for start in range(0, 128, 32):
        assert _post(client, _test_rows(model, 32, seed=100 + start)).json()["odd"]["allow"] is True
    assert store.recent(1000).shape == (128, model["spec"].n_features)
    steady = check_drift(paths, model["ref"], window=128, record=False)
    assert steady["status"] == "checked" and steady["window"] == 128
    training_rows = 400 if model["dataset"] == "sensors" else 300
    assert steady["reference"] == {"rows": training_rows, "sources": [datasets[model["dataset"]].id]}
    assert steady["drift"] is False, steady["detectors"]

    store.clear()
    shifted = _shifted_rows(model, 128)
    for start in range(0, 128, 32):
        assert _post(client, shifted[start : start + 32]).json()["odd"]["allow"] is True
    drifted = check_drift(paths, model["ref"], window=128, record=False)
    assert drifted["drift"] is True, drifted["detectors"]


def test_training_refuses_datasets_of_different_specs(home, datasets):
    with pytest.raises(StepError, match=r"datasets of one training run must share a spec: origin/sensors@\w+ holds "
                                        r"tabular 7 \(7 features, 4 classes\), origin/tiles@\w+ holds image 3x12x12"):
        run_step("train_model", _ctx(home), stage="M4", profile="local", datasets=["sensors", "tiles"],
                 family="tabular-mlp")


def test_a_family_that_cannot_take_the_data_is_refused_before_training(home, datasets):
    with pytest.raises(StepError, match=r"M4: family 'digits-cnn': the cnn architecture takes C x H x W images"):
        run_step("train_model", _ctx(home), stage="M4", profile="local", datasets=["sensors"])


def test_fine_tuning_refuses_another_spec_or_family(home, model):
    base = model["ref"].uri
    other = "tiles" if model["dataset"] == "sensors" else "sensors"
    with pytest.raises(StepError, match=rf"cannot fine-tune {base} on origin/{other}@\w+: the base model takes "):
        run_step("train_model", _ctx(home), stage="M8", profile="local", datasets=[other], base_model=base)
    elsewhere = "resnet-small" if model["family"] == "tabular-mlp" else "tabular-mlp"
    with pytest.raises(StepError, match=rf"cannot fine-tune {base} \(family {model['family']}\) as family {elsewhere}"):
        run_step("train_model", _ctx(home), stage="M8", profile="local", datasets=[model["dataset"]],
                 base_model=base, family=elsewhere)


def test_evaluation_refuses_a_test_set_of_another_spec(home, model):
    other = "tiles_test" if model["dataset"] == "sensors" else "sensors_test"
    with pytest.raises(StepError, match=rf"dataset origin/{other}@\w+ does not fit the model"):
        run_step("evaluate_registered", _ctx(home), model=model["ref"].uri, test_sets={"other": other})


@pytest.mark.parametrize("model", ["tabular-mlp"], indirect=True)  # one fine-tuning run is enough
def test_fine_tuning_continues_the_base_family(home, model):
    registered = _train(_ctx(home), stage="M8", datasets=["sensors"], test="sensors_test",
                        base_model=model["ref"].uri)
    ref = registry.resolve_model(SitePaths.of("origin", home), f"{registered['name']}/{registered['version']}")
    assert ref.name == "tabular-mlp-m8"
    assert ref.metadata["family"] == "tabular-mlp" and ref.metadata["base_model"]["name"] == "tabular-mlp-m4"
    assert ref.metadata["input_envelope"] == model["ref"].metadata["input_envelope"]  # same data: same range


def test_stage_reference_finds_the_family_that_holds_it(home, model):
    paths = SitePaths.of("origin", home)
    held = {f for f in CASES if _holds(paths, f)}
    if len(held) > 1:
        with pytest.raises(registry.ModelNotFound, match="holds M4 of several model families"):
            registry.resolve_model(paths, "M4")
    else:
        assert registry.resolve_model(paths, "M4").name == f"{model['family']}-m4"
    assert registry.resolve_model(paths, "M4", family=model["family"]).uri == model["ref"].uri


def _holds(paths, family) -> bool:
    try:
        registry.resolve_model(paths, "M4", family=family)
    except registry.ModelNotFound:
        return False
    return True
