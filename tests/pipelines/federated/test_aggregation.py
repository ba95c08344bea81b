from __future__ import annotations

import numpy as np
import pytest

from pipelines.federated import RULES, AggregationError, aggregate
from pipelines.federated.aggregation import krum_scores, multi_krum


def test_fedavg_is_the_sample_weighted_mean_and_fedprox_the_same_server_step():
    updates = [np.array([1.0, 0.0]), np.array([4.0, 3.0])]
    assert np.allclose(aggregate("fedavg", updates, [100, 50]), [2.0, 1.0])
    assert np.allclose(aggregate("fedprox", updates, [100, 50]), [2.0, 1.0])
    assert np.allclose(aggregate("fedavg", updates), [2.5, 1.5])  # no weights: equal


def test_median_and_trimmed_mean_are_coordinate_wise():
    updates = [np.array([1.0, 10.0]), np.array([2.0, 20.0]), np.array([3.0, -5.0]), np.array([100.0, 0.0]),
               np.array([4.0, 1.0])]
    assert np.allclose(aggregate("median", updates), [3.0, 1.0])
    # beta 0.2 of 5: one cut from each side per coordinate
    assert np.allclose(aggregate("trimmed_mean", updates, beta=0.2), [3.0, (0.0 + 1.0 + 10.0) / 3])


def test_krum_picks_from_the_honest_cluster_and_multi_krum_averages_it():
    rng = np.random.default_rng(0)
    honest = [np.ones(20) + 0.01 * rng.normal(size=20) for _ in range(5)]
    byzantine = [np.full(20, -50.0), np.full(20, 80.0)]
    updates = honest + byzantine
    chosen = aggregate("krum", updates, f=2)
    assert any(np.array_equal(chosen, h.astype(np.float32)) for h in honest)
    assert np.allclose(multi_krum(updates, f=2), np.mean(honest, axis=0), atol=1e-6)  # m = n - f = 5
    scores = krum_scores(updates, f=2)
    assert scores[5:].min() > scores[:5].max()


@pytest.mark.parametrize(("rule", "n", "params", "message"), [
    ("krum", 4, {"f": 1}, "at least 5 participants"),
    ("multi_krum", 6, {"f": 2}, "at least 7 participants"),
    ("trimmed_mean", 4, {"beta": 0.2}, "trims no participant of 4"),
    ("trimmed_mean", 9, {"beta": 0.5}, "0 < beta < 0.5"),
    ("multi_krum", 5, {"f": 1, "m": 6}, "m=6 is not in 1..5"),
])
def test_rules_refuse_too_few_participants_for_f_or_beta(rule, n, params, message):
    with pytest.raises(AggregationError, match=message):
        aggregate(rule, [np.full(3, float(i)) for i in range(n)], **params)


def test_aggregate_refuses_unknown_rules_and_bad_updates():
    with pytest.raises(AggregationError, match="unknown aggregation rule 'mean'"):
        aggregate("mean", [np.zeros(2)])
    with pytest.raises(AggregationError, match="not finite"):
        aggregate("median", [np.zeros(2), np.array([np.nan, 0.0])])
    with pytest.raises(AggregationError, match="one length"):
        aggregate("fedavg", [np.zeros(2), np.zeros(3)])
    assert set(RULES) == {"fedavg", "fedprox", "median", "trimmed_mean", "krum", "multi_krum"}
