"""DP-SGD through the training steps at the supplier, on its own digits and a dataset the origin
owns: metadata.json `privacy`, each lineage source's spend, MLflow, the standardisation fitted on
the supplier's rows only (standardisation, input envelope), and a private fine-tune that adds its spend to the base's. Real MLflow,
DVC, signing and ONNX; no Airflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.learning import registry
from pipelines.steps import StepContext, run_step
from pipelines.workspace import SitePaths

ORIGIN_FLAGS = {"classification": "confidential", "local_only": False, "export_authorized": False,
                "releasable_to": ["supplier"], "purposes": ["training", "collaboration"]}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    from pipelines.data.builder import build_frames
    from pipelines.data.catalog import register_dataset
    from pipelines.init import init_workspace

    home = tmp_path_factory.mktemp("factory")
    init_workspace(home)
    paths = SitePaths.of("supplier", home)
    path = paths.data_dir / "origin-shared.parquet"
    build_frames("origin")[0]["shared"].to_parquet(path, index=False)  # as stage 2 delivers it, owner origin
    register_dataset(paths, "origin-shared", path, owner="origin", flags=ORIGIN_FLAGS)
    return home


def _ctx(home: Path) -> StepContext:
    return StepContext(site="supplier", paths=SitePaths.of("supplier", home), run_id="test-run", dag_id="test")


def _meta(trained: dict) -> dict:
    return json.loads((Path(trained["staging"]) / "metadata.json").read_text())


@pytest.fixture(scope="module")
def private_m3(home) -> dict:
    return run_step("train_model", _ctx(home), stage="M3", profile="private", datasets=["train", "origin-shared"],
                    family="tabular-mlp")


def test_a_private_run_records_its_spend_in_metadata_lineage_and_mlflow(home, private_m3):
    meta = _meta(private_m3)
    privacy = meta["privacy"]
    assert privacy["mechanism"] == "dp-sgd" and privacy["accountant"] == "rdp" and privacy["epochs"] == 20
    assert 7.5 < privacy["epsilon"] <= 8.0 and privacy["delta"] == 1e-5 and privacy["target_epsilon"] == 8.0
    assert privacy["steps"] > 0 and 0 < privacy["sample_rate"] < 1 and privacy["noise_multiplier"] > 0
    owners = {entry["owner"] for entry in meta["lineage"]}
    assert owners == {"supplier", "origin"}
    assert all(entry["dp"] == {"epsilon": privacy["epsilon"], "delta": 1e-5} for entry in meta["lineage"])
    run = registry.client(SitePaths.of("supplier", home)).get_run(private_m3["mlflow_run_id"])
    assert run.data.metrics["dp_epsilon"] == pytest.approx(privacy["epsilon"])
    assert run.data.params["dp_accountant"] == "rdp" and run.data.params["dp_target_epsilon"] == "8.0"


def test_a_private_new_model_standardises_with_the_trainers_own_rows(home, private_m3):
    from pipelines.data.catalog import load_dataset
    from pipelines.data.spec import DIGITS
    from pipelines.learning.artifacts import load_model

    paths = SitePaths.of("supplier", home)
    own = DIGITS.features(load_dataset(paths, "train")[0])
    partner = DIGITS.features(load_dataset(paths, "origin-shared")[0])
    model = load_model(Path(private_m3["staging"]))
    assert np.allclose(model.input_mean.numpy(), own.mean(axis=0), atol=1e-5)
    mixed = np.concatenate([own, partner]).mean(axis=0)
    assert not np.allclose(model.input_mean.numpy(), mixed, atol=1e-3)
    envelope = json.loads((Path(private_m3["staging"]) / "metadata.json").read_text())["input_envelope"]
    assert np.allclose(envelope["max"], own.max(axis=0))  # the partner's extremes are not recorded
    assert not np.allclose(envelope["max"], np.concatenate([own, partner]).max(axis=0))


def test_a_plain_run_records_no_bound_and_no_privacy(home):
    trained = run_step("train_model", _ctx(home), stage="M1", profile="initial", datasets=["train"],
                       family="tabular-mlp")
    meta = _meta(trained)
    assert "privacy" not in meta
    assert meta["lineage"] and all(entry["dp"] is None for entry in meta["lineage"])


def test_a_private_fine_tune_adds_its_spend_to_the_bases(home, private_m3):
    ctx = _ctx(home)
    evaluated = run_step("evaluate_model", ctx, trained=private_m3, test_sets={"supplier_test": "test"})
    exported = run_step("export_model", ctx, trained=evaluated, parity_set="test")
    base = run_step("register_model", ctx, trained=exported)
    first = registry.resolve_model(ctx.paths, f"{base['name']}/{base['version']}").metadata["privacy"]["epsilon"]
    tuned = run_step("train_model", ctx, stage="M8", profile="private", datasets=["origin-shared"],
                     base_model=f"{base['name']}/{base['version']}")
    meta = _meta(tuned)
    by_owner = {entry["owner"]: entry["dp"] for entry in meta["lineage"]}
    assert by_owner["origin"]["epsilon"] == pytest.approx(first + meta["privacy"]["epsilon"])
    assert by_owner["origin"]["delta"] == pytest.approx(2e-5)
    assert by_owner["supplier"] == {"epsilon": first, "delta": 1e-5}  # not trained on again
