from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.data.spec import DIGITS
from pipelines.federated import (
    FederatedError,
    LocalConfig,
    Participant,
    StateLayout,
    UpdatePrivacy,
    apply_update,
    local_update,
    run_rounds,
    scaled,
    sign_flipped,
)

from .conftest import ARCHITECTURE, LOCAL

ROUNDS = 4


def _run(data, participants, rule="fedavg", rounds=ROUNDS, **kwargs):
    kwargs.setdefault("local", LOCAL)
    return run_rounds(data.initial, participants, rule, rounds, architecture=ARCHITECTURE, spec=DIGITS,
                      evaluate=data.evaluate, **kwargs)


def _vector(state):
    return StateLayout.of(state).to_vector(state)


@pytest.fixture(scope="module")
def honest(data):
    """FedAvg over the four honest units alone: the accuracy a robust rule should keep."""
    return _run(data, data.participants(5)[1:]).history[-1].metrics["accuracy"]


def test_fedavg_on_iid_units_approaches_centralized_training(data):
    result = _run(data, data.participants(5))
    centralized = local_update(data.initial, data.x_train, data.y_train, architecture=ARCHITECTURE, spec=DIGITS,
                               config=LocalConfig(epochs=ROUNDS * LOCAL.epochs, lr=0.05, batch_size=10, momentum=0.5),
                               seed=0)
    central = data.evaluate(apply_update(data.initial, centralized.delta))["accuracy"]
    federated = result.history[-1].metrics["accuracy"]
    accuracies = [r.metrics["accuracy"] for r in result.history]
    assert accuracies[-1] > accuracies[0] and central > 0.9
    assert federated >= central - 0.04, (federated, central)
    assert result.stopped == "rounds" and len(result.history) == ROUNDS


@pytest.mark.parametrize("attack", [sign_flipped(10), scaled(30)], ids=["sign_flipped_x10", "scaled_x30"])
def test_a_poisoned_unit_wrecks_fedavg_but_not_the_robust_rules(data, honest, attack):
    units = data.participants(5)
    units[0] = Participant("unit-0", units[0].x, units[0].y, attack=attack)
    wrecked = _run(data, units).history[-1].metrics["accuracy"]
    assert wrecked < honest - 0.4, (wrecked, honest)
    for rule in ("median", "trimmed_mean", "krum", "multi_krum"):
        result = _run(data, units, rule, beta=0.2, f=1)
        kept = result.history[-1].metrics["accuracy"]
        assert kept >= honest - 0.05, (rule, kept, honest)
        if rule.endswith("krum"):
            assert all("unit-0" not in r.kept for r in result.history)


def test_fedprox_with_mu_zero_is_fedavg(data):
    units = data.participants(3)
    fedavg = _run(data, units, rounds=2)
    fedprox = _run(data, units, "fedprox", rounds=2, local=LocalConfig(epochs=3, lr=0.05, batch_size=10,
                                                                        momentum=0.5, mu=0.0))
    assert np.array_equal(_vector(fedavg.state), _vector(fedprox.state))
    proximal = _run(data, units, "fedprox", rounds=2, local=LocalConfig(epochs=3, lr=0.05, batch_size=10,
                                                                         momentum=0.5, mu=1.0))
    assert not np.array_equal(_vector(fedavg.state), _vector(proximal.state))


def test_a_straggler_is_left_out_and_secure_aggregation_recovers_it_as_a_dropout(data):
    units = data.participants(4)
    units[2] = Participant("unit-2", units[2].x, units[2].y, delay_s=3600.0)
    plain = _run(data, units, rounds=2, deadline_s=600.0)
    assert [r.stragglers for r in plain.history] == [["unit-2"], ["unit-2"]]
    assert all(r.included == ["unit-0", "unit-1", "unit-3"] for r in plain.history)
    secure = _run(data, units, rounds=2, deadline_s=600.0, secure=True)
    assert all(r.skipped is None and r.stragglers == ["unit-2"] for r in secure.history)
    assert np.allclose(_vector(plain.state), _vector(secure.state), atol=1e-5)
    without = _run(data, [u for u in units if u.name != "unit-2"], rounds=2)
    assert np.allclose(_vector(plain.state), _vector(without.state), atol=1e-6)
    # the masked upload is the update and its weight as uint64, plus keys and sealed shares
    size = StateLayout.of(data.initial).size
    assert all(8 * (size + 1) < b < 8 * (size + 1) + 2000 for b in secure.history[0].bytes_up.values())
    assert plain.history[0].bytes_up == {n: 4 * size for n in ("unit-0", "unit-1", "unit-3")}


def test_units_of_one_site_are_participants_evaluated_where_their_data_lives(data):
    half = len(data.x_test) // 2
    units = [Participant("supplier", data.x_train[::3], data.y_train[::3], site="supplier"),
             Participant("origin/unit-a", data.x_train[1::3], data.y_train[1::3], site="origin",
                         x_test=data.x_test[:half], y_test=data.y_test[:half]),
             Participant("origin/unit-b", data.x_train[2::3], data.y_train[2::3], site="origin",
                         x_test=data.x_test[half:], y_test=data.y_test[half:])]
    seen = []
    result = _run(data, units, rounds=2, secure=True, on_round=seen.append)
    assert seen == result.history and all(r.skipped is None for r in result.history)
    last = result.history[-1].participant_metrics
    assert "global_accuracy" in last["origin/unit-a"] and "global_accuracy" not in last["supplier"]
    assert last["origin/unit-a"]["global_accuracy"] > 0.8 and last["origin/unit-b"]["global_accuracy"] > 0.8


def test_rounds_stop_when_the_metric_settles(data):
    result = _run(data, data.participants(3), rounds=30, tol=0.02)
    assert result.stopped == "converged" and len(result.history) < 30
    last, before = (r.metrics["accuracy"] for r in result.history[-1:-3:-1])
    assert abs(last - before) < 0.02


@pytest.mark.parametrize(("rule", "n", "kwargs", "message"), [
    ("krum", 3, {}, "at least 5 participants"),
    ("median", 4, {"secure": True}, "reveals only the sum"),
    ("fedavg", 2, {"secure": True}, "at least 3 participants"),
    ("fedavg", 3, {"local": LocalConfig(mu=0.1)}, "FedProx's local step"),
    ("mean", 3, {}, "unknown aggregation rule"),
    ("fedavg", 3, {"privacy": UpdatePrivacy(1.0, 1.0, noise="distributed")}, "needs secure aggregation"),
])
def test_a_plan_that_cannot_run_is_refused_before_the_first_round(data, rule, n, kwargs, message):
    with pytest.raises(FederatedError, match=message):
        _run(data, data.participants(n), rule, **kwargs)


def test_too_few_units_left_for_a_robust_rule_skip_the_round_and_keep_the_model(data):
    units = data.participants(5)
    units[4] = Participant("unit-4", units[4].x, units[4].y, delay_s=3600.0)
    result = _run(data, units, "krum", rounds=1, deadline_s=600.0, f=1)
    assert "at least 5 participants" in result.history[0].skipped
    assert all(torch.equal(result.state[k], data.initial[k]) for k in data.initial)


def test_fedavg_weighs_units_by_the_rows_they_claim(data):
    units = data.participants(3)
    loud = [Participant("unit-0", units[0].x, units[0].y, claimed_samples=10**7), *units[1:]]
    dominated = _run(data, loud, rounds=1).state
    alone = _run(data, units[:1], rounds=1).state  # unit-0's own update (its seed does not depend on the others)
    honest = _run(data, units, rounds=1).state
    assert np.allclose(_vector(dominated), _vector(alone), atol=1e-4)
    assert not np.allclose(_vector(honest), _vector(alone), atol=1e-2)
