"""Drift detection end to end: real digits traffic through the service, KS + MMD against the reference,
MLflow and audit records, the asset event that schedules retraining, the CLI and the DAG wiring."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from pipelines.config import PROJECT_ROOT, read_yaml
from pipelines.trust import audit


def _feed(client, paths, shift, *, batches=5, batch_size=32, seed=0):
    from pipelines.serving.cli import shifted_traffic

    for batch in shifted_traffic(paths, shift, batches, batch_size, seed):
        assert client.post("/predict", json={"inputs": batch.tolist(),
                                             "context": {"sensor_id": "ORG-SN-0001"}}).status_code == 200


def _dag_module(site):
    path = PROJECT_ROOT / "dags" / f"drift_monitor_{site}.py"
    spec = importlib.util.spec_from_file_location(f"drift_monitor_{site}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _emit_drift_event(site):
    """The function of the drift monitor DAG's task that emits the drift asset event."""
    return getattr(_dag_module(site), f"drift_monitor_{site}")().get_task("emit_drift_event").python_callable


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_drift_on_in_distribution_traffic(client, origin, store, seed):
    from pipelines.serving.drift import check_drift

    paths, ref = origin
    _feed(client, paths, "none", seed=seed)
    result = check_drift(paths, ref, window=160, record=False)
    assert result["status"] == "checked" and result["window"] == 160
    assert result["reference"] == {"rows": 150, "sources": ["data/private.parquet"]}
    assert result["drift"] is False, result["detectors"]


@pytest.mark.parametrize("shift", ["other-sensor", "noise", "rotation"])
def test_drift_detected_on_shifted_traffic_and_retraining_event_emitted(client, origin, store, shift):
    from airflow.sdk import Metadata

    from pipelines.serving.drift import check_drift

    paths, ref = origin
    _feed(client, paths, shift)
    result = check_drift(paths, ref, window=160)
    assert result["drift"] is True
    assert all(d["drift"] and d["p_value"] < d["threshold"] for d in result["detectors"].values())

    # recorded: MLflow run in drift-origin, audit entry, latest result for /metrics
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=paths.mlflow_uri).get_run(result["mlflow_run_id"])
    assert run.data.metrics["drift"] == 1.0 and run.data.metrics["ks_p_value"] < 0.01
    assert run.info.experiment_id == MlflowClient(tracking_uri=paths.mlflow_uri).get_experiment_by_name(
        "drift-origin").experiment_id
    last = [e for e in audit.entries(paths) if e["action"] == "drift.checked"][-1]
    assert last["outcome"] == "drift" and last["details"]["mlflow_run_id"] == result["mlflow_run_id"]
    assert json.loads((paths.state_dir / "drift" / "latest.json").read_text())["drift"] is True

    # the DAG's emit task yields the asset event with the evidence as its extra
    events = list(_emit_drift_event("origin")(result))
    assert len(events) == 1 and isinstance(events[0], Metadata)
    assert events[0].asset.uri == "factory://origin/drift"
    extra = events[0].extra
    assert extra["site"] == "origin" and extra["model"]["name"] == "digits-cnn-m4"
    assert extra["detectors"]["mmd"]["drift"] is True and extra["mlflow_run_id"] == result["mlflow_run_id"]
    json.dumps(extra)  # asset-event extras must be JSON


def test_no_asset_event_without_drift(origin, store):
    from airflow.sdk.exceptions import AirflowSkipException

    from pipelines.steps import StepContext
    from pipelines.steps.monitoring import check_drift_step

    paths, ref = origin
    result = check_drift_step(StepContext(site="origin", paths=paths), model=ref.uri, window="0")
    assert result["status"] == "insufficient_data" and result["drift"] is False
    with pytest.raises(AirflowSkipException, match="no drift at origin"):
        list(_emit_drift_event("origin")(result))


@pytest.mark.parametrize("site, stage", [("origin", 4), ("destination", 7)])
def test_drift_monitor_dags_wire_the_step_and_the_asset(site, stage):
    dag = getattr(_dag_module(site), f"drift_monitor_{site}")()
    assert dag.dag_id == f"drift_monitor_{site}" and dag.catchup is False
    assert {f"stage:{stage}", f"site:{site}"} <= set(dag.tags)
    assert dag.default_args["retries"] >= 1
    assert dag.schedule == read_yaml("stages.yaml")["schedules"]["drift_monitor"]
    emit = dag.get_task("emit_drift_event")
    assert [a.uri for a in emit.outlets] == [f"factory://{site}/drift"]
    assert dag.get_task("check_drift") in emit.upstream_list


def test_simulate_cli_detects_rotation_end_to_end(origin, store, monkeypatch):
    from pipelines.cli import main

    paths, ref = origin
    monkeypatch.setenv("FACTORY_HOME", str(paths.home))
    result = CliRunner().invoke(main, ["drift", "simulate", "--site", "origin", "--shift", "rotation",
                                       "--model", "digits-cnn-m4/1", "--batches", "4"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["check"]["drift"] is True and out["check"]["window"] == 128
    assert out["drift_event"]["site"] == "origin"


def test_serve_cli_refuses_a_tampered_model(origin, monkeypatch):
    from pipelines.cli import main

    paths, ref = origin
    monkeypatch.setenv("FACTORY_HOME", str(paths.home))
    onnx = ref.model_dir / "model.onnx"
    original = onnx.read_bytes()
    try:
        onnx.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
        result = CliRunner().invoke(main, ["serve", "--site", "origin", "--model", "digits-cnn-m4/1"])
    finally:
        onnx.write_bytes(original)
    assert result.exit_code == 1
    assert "refusing to serve digits-cnn-m4/1" in result.output
