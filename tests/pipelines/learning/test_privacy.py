"""Differential privacy with real Opacus on small digits data: the spend the accountant reports,
learning under noise, the families it takes and the modules it refuses, what a private run may fit
on, the spend a lineage carries, and the model_release budgets through the real policy engine."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.config import PROJECT_ROOT, TrainingProfile
from pipelines.learning.privacy import PrivacyError, check_compatible, compose, lineage_with_spend, spend
from pipelines.learning.train import logits_torch, train

PLAIN = {"epochs": 2, "lr": 0.01, "batch_size": 32, "weight_decay": 0.0}


def _profile(**privacy) -> TrainingProfile:
    return TrainingProfile(**PLAIN, privacy=privacy or None)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order[:400]], y[order[:400]], x[order[1000:1400]], y[order[1000:1400]]


@pytest.fixture(scope="module")
def private_run(digits):
    return train(digits[0], digits[1], _profile(noise_multiplier=1.0), seed=3, family="digits-cnn")


def test_the_accountant_reports_the_spend_of_the_run(private_run):
    record = private_run.privacy
    assert record["mechanism"] == "dp-sgd" and record["accountant"] == "rdp"
    assert record["noise_multiplier"] == 1.0 and record["max_grad_norm"] == 1.0 and record["delta"] == 1e-5
    assert record["sample_rate"] == pytest.approx(1 / 13)  # batch 32 of 400 rows: 13 batches an epoch
    assert record["steps"] == 26 and record["epochs"] == 2
    assert 0 < record["epsilon"] < 10
    assert not hasattr(private_run.model, "_module")  # the plain model comes back, not Opacus' wrapper


def test_more_noise_spends_less_epsilon(digits, private_run):
    quieter = train(digits[0], digits[1], _profile(noise_multiplier=0.7), seed=3, family="digits-cnn").privacy
    louder = train(digits[0], digits[1], _profile(noise_multiplier=2.0), seed=3, family="digits-cnn").privacy
    assert quieter["epsilon"] > private_run.privacy["epsilon"] > louder["epsilon"]


def test_a_target_epsilon_is_spent_and_not_exceeded(digits):
    record = train(digits[0], digits[1], _profile(target_epsilon=3.0), seed=3, family="tabular-mlp").privacy
    assert 2.8 < record["epsilon"] <= 3.0 and record["target_epsilon"] == 3.0
    prv = train(digits[0], digits[1], _profile(noise_multiplier=record["noise_multiplier"], accountant="prv"),
                seed=3, family="tabular-mlp").privacy
    assert prv["accountant"] == "prv" and 0 < prv["epsilon"] <= record["epsilon"] * 1.05  # PRV: as tight or tighter


def test_the_private_model_still_learns_on_tiny_data(digits):
    result = train(digits[0], digits[1], TrainingProfile(**{**PLAIN, "epochs": 6}, privacy={"noise_multiplier": 0.8}),
                   seed=1, family="digits-cnn")
    accuracy = float((logits_torch(result.model, digits[2]).argmax(1) == digits[3]).mean())
    assert accuracy > 0.4, accuracy  # ten classes: chance is 0.1
    assert result.privacy["epsilon"] < 10


def test_the_same_seed_trains_the_same_private_model(digits, private_run):
    again = train(digits[0], digits[1], _profile(noise_multiplier=1.0), seed=3, family="digits-cnn")
    assert again.privacy == private_run.privacy
    for mine, theirs in zip(private_run.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)
    other = train(digits[0], digits[1], _profile(noise_multiplier=1.0), seed=4, family="digits-cnn").model
    assert not torch.equal(other.state_dict()["features.0.weight"], private_run.model.state_dict()["features.0.weight"])


@pytest.mark.parametrize("family", ["digits-cnn", "resnet-small", "tabular-mlp"])
def test_every_family_trains_with_differential_privacy(digits, family):
    result = train(digits[0][:128], digits[1][:128], TrainingProfile(**{**PLAIN, "epochs": 1},
                                                                     privacy={"noise_multiplier": 1.0}),
                   seed=1, family=family)
    assert result.privacy["steps"] == 4
    assert all(not hasattr(p, "grad_sample") for p in result.model.parameters())


def test_a_module_with_batch_statistics_is_refused_naming_it():
    model = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(PrivacyError, match="BatchNorm"):
        check_compatible(model)
    check_compatible(nn.Sequential(nn.Linear(64, 16), nn.GroupNorm(4, 16), nn.Linear(16, 10)))


def test_adversarial_training_and_privacy_are_refused_together():
    with pytest.raises(ValueError, match="adversarial training or differential privacy, not both"):
        TrainingProfile(**PLAIN, adversarial={"eps": 0.1}, privacy={"noise_multiplier": 1.0})
    with pytest.raises(ValueError, match="exactly one of noise_multiplier and target_epsilon"):
        TrainingProfile(**PLAIN, privacy={"noise_multiplier": 1.0, "target_epsilon": 3})
    with pytest.raises(ValueError, match="exactly one"):
        TrainingProfile(**PLAIN, privacy={"max_grad_norm": 1.0})


def test_a_profile_without_privacy_dumps_as_before_so_run_keys_stay():
    plain = TrainingProfile(**PLAIN)
    assert plain.model_dump() == PLAIN  # the run key hashes this dump: no new key, no null
    private = TrainingProfile(**PLAIN, privacy={"target_epsilon": 8})
    assert private.model_dump()["privacy"] == {"noise_multiplier": None, "target_epsilon": 8.0, "max_grad_norm": 1.0,
                                               "delta": 1e-5, "accountant": "rdp"}
    assert TrainingProfile(**private.model_dump()) == private


def test_a_private_model_fits_its_standardisation_on_the_trainers_rows_only(digits):
    own = digits[0][:100]
    private = train(digits[0], digits[1], _profile(noise_multiplier=1.0), seed=1, family="tabular-mlp",
                    public_rows=own).model
    assert torch.allclose(private.input_mean, torch.from_numpy(own.mean(axis=0)), atol=1e-6)
    assert not torch.allclose(private.input_mean, torch.from_numpy(digits[0].mean(axis=0)), atol=1e-3)
    unfitted = train(digits[0], digits[1], _profile(noise_multiplier=1.0), seed=1, family="tabular-mlp").model
    assert torch.equal(unfitted.input_mean, torch.zeros(64)) and torch.equal(unfitted.input_scale, torch.ones(64))
    plain = train(digits[0], digits[1], TrainingProfile(**PLAIN), seed=1, family="tabular-mlp").model
    assert torch.allclose(plain.input_mean, torch.from_numpy(digits[0].mean(axis=0)), atol=1e-6)


def test_a_private_model_imprints_its_watermark_from_the_triggers_alone(digits):
    from pipelines.protection import watermark as wm

    key = wm.WatermarkKey.of(bytes(range(32)))
    rows = wm.embedding_rows(key, [wm.OWNER], n_features=64, n_classes=10)
    model = train(digits[0], digits[1], _profile(noise_multiplier=1.0), seed=1, family="digits-cnn",
                  watermark=rows).model
    assert (logits_torch(model, rows[0]).argmax(1) == rows[1]).all()
    assert wm.verify(model, key, wm.OWNER)["verified"]


# ---------------------------------------------------------------- the spend along a model's chain


def _entry(dataset_id: str, owner: str, **extra) -> dict:
    return {"dataset_id": dataset_id, "owner": owner, "local_only": False, "export_authorized": True,
            "releasable_to": ["supplier", "origin", "destination"], "md5": "0" * 32, **extra}


def test_a_fine_tune_adds_the_spend_on_a_source_its_base_trained_on():
    base = lineage_with_spend([], [_entry("supplier/origin-shared@1", "origin"), _entry("supplier/train@1", "supplier")],
                              {"epsilon": 2.0, "delta": 1e-5})
    assert [e["dp"] for e in base] == [{"epsilon": 2.0, "delta": 1e-5}] * 2
    tuned = lineage_with_spend(base, [_entry("supplier/origin-shared@1", "origin"),
                                      _entry("supplier/destination-shared@1", "destination")],
                               {"epsilon": 3.0, "delta": 1e-6})
    by_id = {e["dataset_id"]: e["dp"] for e in tuned}
    assert by_id["supplier/origin-shared@1"] == {"epsilon": 5.0, "delta": pytest.approx(1.1e-5)}
    assert by_id["supplier/train@1"] == {"epsilon": 2.0, "delta": 1e-5}  # not trained on again
    assert by_id["supplier/destination-shared@1"] == {"epsilon": 3.0, "delta": 1e-6}
    assert all(set(e) - {"dp"} == set(_entry("x", "y")) for e in tuned)  # the entry format is kept


def test_a_source_trained_on_without_privacy_has_no_bound_along_the_chain():
    plain = lineage_with_spend([], [_entry("supplier/train@1", "supplier")], None)
    assert plain[0]["dp"] is None
    older = [_entry("supplier/train@1", "supplier")]  # a model recorded before spends were: no dp key
    tuned = lineage_with_spend(older, [_entry("supplier/train@1", "supplier")], {"epsilon": 1.0, "delta": 1e-6})
    assert tuned[0]["dp"] is None
    assert compose({"epsilon": 1, "delta": 0}, None) is None and spend(None) is None


# ---------------------------------------------------------------- budgets at the model_release gate


@pytest.fixture
def budgets(tmp_path, monkeypatch):
    """A copy of policies/ in which the origin sets a budget for its shared data and a default."""
    from pipelines.policy.bundle import load_bundle

    root = tmp_path / "policies"
    shutil.copytree(PROJECT_ROOT / "policies", root)
    data = json.loads((root / "factory" / "data.json").read_text())
    data["privacy_budgets"] = {"origin": {"supplier/origin-shared": {"epsilon": 6.0, "delta": 1e-5},
                                          "*": {"epsilon": 1.0, "delta": 1e-5}}}
    (root / "factory" / "data.json").write_text(json.dumps(data))
    monkeypatch.setenv("FACTORY_POLICIES", str(root))
    monkeypatch.delenv("FACTORY_OPA_URL", raising=False)
    assert load_bundle().data["factory"]["privacy_budgets"] == data["privacy_budgets"]
    return data["privacy_budgets"]


def _release(lineage: list[dict]) -> dict:
    return {"model": {"id": "digits-cnn-m3/2", "site": "supplier", "metrics": {"supplier_test": 0.9},
                      "watermark": {"verified": False}, "signature": {"verified": True}, "lineage": lineage},
            "recipient": "destination", "purpose": "collaboration", "requested_by": "supplier_platform",
            "approvals": []}


def test_the_gate_holds_a_real_private_training_to_the_owners_budget(budgets, private_run, digits):
    from pipelines.policy import evaluate

    sources = [_entry("supplier/train@1", "supplier"), _entry("supplier/origin-shared@3", "origin")]
    spent = private_run.privacy["epsilon"]
    assert spent < 6.0
    assert evaluate("model_release", _release(lineage_with_spend([], sources, spend(private_run.privacy)))).allow
    # a fine-tune spending as much again on the same source passes the budget: basic composition adds
    tuned = lineage_with_spend(lineage_with_spend([], sources, spend(private_run.privacy)), sources[1:],
                               spend(private_run.privacy))
    denied = evaluate("model_release", _release(tuned))
    assert not denied.allow and len(denied.reasons) == 1
    assert denied.reasons[0].startswith(f"lineage source supplier/origin-shared@3 of origin spends epsilon "
                                        f"{round(2 * spent, 3)}")
    assert "origin allows epsilon 6" in denied.reasons[0]
    loud = train(digits[0], digits[1], _profile(noise_multiplier=0.6), seed=3, family="digits-cnn").privacy
    assert loud["epsilon"] > 6.0
    assert not evaluate("model_release", _release(lineage_with_spend([], sources, spend(loud)))).allow
    plain = evaluate("model_release", _release(lineage_with_spend([], sources, None)))
    assert not plain.allow and "trained on without differential privacy" in plain.reasons[0]
    back_home = {**_release(lineage_with_spend([], sources, None)), "recipient": "origin"}
    assert evaluate("model_release", back_home).allow  # the owner receives a model of its own data


def test_shipped_policy_data_sets_no_budget_so_the_default_collaboration_passes(monkeypatch):
    from pipelines.policy import evaluate, policy_data

    monkeypatch.delenv("FACTORY_POLICIES", raising=False)
    monkeypatch.delenv("FACTORY_OPA_URL", raising=False)
    assert policy_data()["privacy_budgets"] == {}
    lineage = lineage_with_spend([], [_entry("supplier/origin-shared@3", "origin")], None)
    assert evaluate("model_release", _release(lineage)).allow
