"""Robustness at release with real ART attacks on small digits models: the figures, the
model_release gate's minimums (real Rego engine), adversarial training, and bad model directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import PROJECT_ROOT, TrainingProfile
from pipelines.context import StepContext
from pipelines.protection.robustness import (
    budget_key,
    evaluate_robustness,
    mlflow_name,
    release_robustness,
    robustness_metrics,
)
from pipelines.workspace import SitePaths

PLAIN = TrainingProfile(epochs=6, lr=0.003, batch_size=32, weight_decay=0.0001)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:800], order[800:1056]
    return x[train], y[train], x[test], y[test]


@pytest.fixture(scope="module")
def plain_model(digits):
    from pipelines.learning.train import train

    return train(digits[0], digits[1], PLAIN, seed=1, family="digits-cnn").model


def _figures(model, digits) -> dict:
    return evaluate_robustness(model, digits[2], digits[3], fgsm_eps=[0.05, 0.1], pgd_eps=[0.05, 0.1], pgd_steps=10,
                               samples=256, seed=0)


def test_accuracy_falls_with_the_attack_and_its_budget(plain_model, digits):
    figures = _figures(plain_model, digits)
    assert set(figures) == {"clean", "fgsm@0.05", "fgsm@0.1", "pgd@0.05", "pgd@0.1", "samples"}
    assert figures["samples"] == 256 and figures["clean"] > 0.85
    assert figures["fgsm@0.1"] <= figures["fgsm@0.05"] <= figures["clean"]
    assert figures["pgd@0.1"] <= figures["pgd@0.05"] <= figures["clean"]
    assert figures["pgd@0.05"] <= figures["fgsm@0.05"] + 0.02 and figures["pgd@0.1"] <= figures["fgsm@0.1"] + 0.02
    assert figures["fgsm@0.1"] < figures["clean"] - 0.05  # the attack does something
    assert _figures(plain_model, digits) == figures  # deterministic


def test_samples_are_a_seeded_draw_of_the_test_rows(plain_model, digits):
    few = evaluate_robustness(plain_model, digits[2], digits[3], fgsm_eps=[0.1], pgd_eps=[], samples=64, seed=3)
    assert few["samples"] == 64 and set(few) == {"clean", "fgsm@0.1", "samples"}
    with pytest.raises(ValueError, match="one label each"):
        evaluate_robustness(plain_model, digits[2], digits[3][:5])


def test_adversarial_training_raises_fgsm_accuracy(plain_model, digits):
    from pipelines.learning.train import train

    adversarial = TrainingProfile(**PLAIN.model_dump(), adversarial={"method": "fgsm", "eps": 0.1, "ratio": 0.5})
    hardened = train(digits[0], digits[1], adversarial, seed=1, family="digits-cnn").model
    plain, robust = _figures(plain_model, digits), _figures(hardened, digits)
    assert robust["fgsm@0.1"] >= plain["fgsm@0.1"] + 0.1, (plain, robust)
    assert robust["clean"] >= plain["clean"] - 0.03


def test_a_plain_profile_dumps_as_before_and_an_adversarial_one_is_checked():
    assert PLAIN.model_dump() == {"epochs": 6, "lr": 0.003, "batch_size": 32, "weight_decay": 0.0001}
    pgd = TrainingProfile(**PLAIN.model_dump(), adversarial={"method": "pgd", "eps": 0.05})
    assert pgd.model_dump()["adversarial"] == {"method": "pgd", "eps": 0.05, "ratio": 0.5, "steps": 5}
    with pytest.raises(ValueError, match="method"):
        TrainingProfile(**PLAIN.model_dump(), adversarial={"method": "cw", "eps": 0.05})
    with pytest.raises(ValueError, match="eps"):
        TrainingProfile(**PLAIN.model_dump(), adversarial={"method": "fgsm", "eps": 0})


def test_mlflow_names_are_valid_metric_names():
    from mlflow.utils.validation import _validate_metric_name

    assert budget_key("fgsm", 0.10) == "fgsm@0.1" and mlflow_name("fgsm@0.1") == "robustness.fgsm_eps0.1"
    for key in ("clean", "fgsm@0.05", "pgd@0.1"):
        _validate_metric_name(mlflow_name(key))
    assert robustness_metrics({"evaluated": False, "reason": "x"}) == {}
    assert robustness_metrics({"evaluated": True, "accuracy": {"pgd@0.05": 0.5}}) == {"robustness.pgd_eps0.05": 0.5}


# ---------------------------------------------------------------- the model_release gate


@pytest.fixture
def minimums(tmp_path, monkeypatch):
    """A copy of policies/ whose data sets robust-accuracy minimums for exports to the destination."""
    from pipelines.policy.bundle import load_bundle

    root = tmp_path / "policies"
    shutil.copytree(PROJECT_ROOT / "policies", root)
    data = json.loads((root / "factory" / "data.json").read_text())
    data["release_robustness"] = {"destination": {"export": {"fgsm@0.1": 0.5, "pgd@0.05": 0.6}}}
    (root / "factory" / "data.json").write_text(json.dumps(data))
    monkeypatch.setenv("FACTORY_POLICIES", str(root))
    monkeypatch.delenv("FACTORY_OPA_URL", raising=False)
    assert load_bundle().data["factory"]["release_robustness"] == data["release_robustness"]
    return data["release_robustness"]


def _export(robustness: dict | None) -> dict:
    from pipelines.policy.testing import ALLOWED_EXPORT

    doc = json.loads(json.dumps(ALLOWED_EXPORT))
    doc["model"].pop("robustness", None)
    if robustness is not None:
        doc["model"]["robustness"] = robustness
    return doc


def test_shipped_policy_data_sets_a_minimum_for_exports_to_the_destination(monkeypatch):
    from pipelines.policy import evaluate, policy_data

    monkeypatch.delenv("FACTORY_POLICIES", raising=False)
    monkeypatch.delenv("FACTORY_OPA_URL", raising=False)
    minimum = policy_data()["release_robustness"]["destination"]["export"]
    assert minimum == {"fgsm@0.05": 0.6, "pgd@0.05": 0.6}
    # the default run's M5 on the supplier's test set: fgsm@0.05 0.84, pgd@0.05 0.82 (policy/testing.py)
    assert evaluate("model_release", _export({"evaluated": True, "accuracy": {"fgsm@0.05": 0.84,
                                                                              "pgd@0.05": 0.82}})).allow
    assert not evaluate("model_release", _export(None)).allow
    assert evaluate("model_release", {**_export(None), "recipient": "origin", "purpose": "collaboration",
                                      "approvals": []}).allow


def test_gate_allows_an_export_whose_measured_robustness_meets_the_minimum(minimums, plain_model, digits):
    from pipelines.policy import evaluate

    figures = _figures(plain_model, digits)
    assert figures["fgsm@0.1"] >= 0.5 and figures["pgd@0.05"] >= 0.6, figures
    decision = evaluate("model_release", _export({"evaluated": True, "accuracy": figures}))
    assert decision.allow, decision.reasons


def test_gate_denies_an_export_below_the_minimum_for_the_recipient(minimums, plain_model, digits):
    from pipelines.policy import evaluate

    figures = _figures(plain_model, digits)
    weak = {**figures, "fgsm@0.1": 0.42}
    decision = evaluate("model_release", _export({"evaluated": True, "accuracy": weak}))
    assert not decision.allow
    assert decision.reasons == ("robust accuracy fgsm@0.1 of model digits-cnn-export/3 is 0.42, below the export "
                                "minimum 0.5 for destination",)
    other = evaluate("model_release", {**_export({"evaluated": True, "accuracy": weak}), "recipient": "origin",
                                       "purpose": "collaboration", "approvals": []})
    assert not any("robust" in reason for reason in other.reasons)  # no minimum for origin


def test_gate_denies_an_export_whose_robustness_was_not_evaluated(minimums):
    from pipelines.policy import evaluate

    failed = evaluate("model_release", _export({"evaluated": False, "reason": "robustness not evaluated: no test set"}))
    assert not failed.allow and len(failed.reasons) == 2
    assert "fgsm@0.1 of model digits-cnn-export/3 is missing (robustness not evaluated: no test set)" in failed.reasons[0]
    assert not evaluate("model_release", _export(None)).allow


# ---------------------------------------------------------------- bad model directories


def _ctx(tmp_path: Path) -> StepContext:
    return StepContext(site="supplier", paths=SitePaths.of("supplier", tmp_path / "home"), run_id="t", dag_id="t")


@pytest.mark.parametrize("damage", ["missing", "no_weights", "bad_metadata"])
def test_a_broken_model_dir_is_not_evaluated_and_says_why(tmp_path, damage):
    model_dir = tmp_path / "model"
    if damage != "missing":
        model_dir.mkdir()
        (model_dir / "model.onnx").write_bytes(b"onnx")
        if damage == "bad_metadata":
            (model_dir / "weights.safetensors").write_bytes(b"\0" * 16)
            (model_dir / "metadata.json").write_text("{not json")
    result = release_robustness(_ctx(tmp_path), model_dir, recipient="destination", purpose="export")
    assert result["evaluated"] is False
    assert result["reason"].startswith("robustness not evaluated: ") and len(result["reason"]) > 30


def test_intake_and_evaluation_of_a_model_that_cannot_be_measured_give_reasons(tmp_path):
    from pipelines.protection.robustness import model_robustness, received_robustness

    ctx = _ctx(tmp_path)
    received = received_robustness(ctx, {"name": "digits-cnn-m1", "version": "7"}, {"origin_test": "test"})
    assert received["evaluated"] is False and "robustness not evaluated" in received["reason"]
    staged = model_robustness(ctx, tmp_path / "nowhere", {"supplier_test": "test"})
    assert staged["evaluated"] is False and "metadata.json" in staged["reason"]
