from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.data.spec import DIGITS
from pipelines.federated import FederatedError, PrivacyError, UpdatePrivacy, clip_update, epsilon, run_rounds
from pipelines.federated.privacy import effective_noise_multiplier, participant_noise_std

from .conftest import ARCHITECTURE, LOCAL


def test_clipping_bounds_the_norm_and_leaves_small_updates_alone():
    clipped, norm = clip_update(np.full(100, 1.0), 2.0)
    assert math.isclose(norm, 10.0) and math.isclose(float(np.linalg.norm(clipped)), 2.0, rel_tol=1e-6)
    small, _ = clip_update(np.full(4, 0.1), 2.0)
    assert np.allclose(small, 0.1)


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    one = epsilon(1.0, sample_rate=1.0, delta=1e-5, rounds=1)
    ten = epsilon(1.0, sample_rate=1.0, delta=1e-5, rounds=10)
    quieter = epsilon(4.0, sample_rate=1.0, delta=1e-5, rounds=10)
    sampled = epsilon(1.0, sample_rate=0.1, delta=1e-5, rounds=10)
    assert one < ten and quieter < ten and sampled < ten
    # the Gaussian mechanism's RDP (alpha / 2 sigma^2 per round) converted at its best order bounds it
    bound = min(10 * a / 2 + math.log(1e5) / (a - 1) for a in np.linspace(1.1, 100, 2000))
    assert ten <= bound + 1e-6
    assert epsilon(0.0, sample_rate=1.0, delta=1e-5, rounds=3) == math.inf


def test_distributed_noise_adds_up_to_the_central_noise():
    privacy = UpdatePrivacy(clip_norm=0.5, noise_multiplier=2.0, noise="distributed")
    std = participant_noise_std(privacy, 4)
    assert math.isclose(math.sqrt(4 * std**2), 2.0 * 0.5)
    assert math.isclose(effective_noise_multiplier(privacy, 4, 3), 2.0 * math.sqrt(3 / 4))
    assert effective_noise_multiplier(UpdatePrivacy(0.5, 2.0), 4, 3) == 2.0


@pytest.mark.parametrize("noise", ["central", "distributed"])
def test_private_rounds_learn_and_record_epsilon(data, noise):
    privacy = UpdatePrivacy(clip_norm=2.0, noise_multiplier=0.05, noise=noise)
    result = run_rounds(data.initial, data.participants(4), "fedavg", 3, architecture=ARCHITECTURE, spec=DIGITS,
                        local=LOCAL, evaluate=data.evaluate, privacy=privacy, secure=noise == "distributed")
    epsilons = [r.epsilon for r in result.history]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    assert math.isclose(epsilons[-1], epsilon(0.05, sample_rate=1.0, delta=1e-5, rounds=3))
    assert result.history[-1].metrics["accuracy"] > 0.5
    assert all(r.noise_multiplier == 0.05 for r in result.history)
    loud = run_rounds(data.initial, data.participants(4), "fedavg", 3, architecture=ARCHITECTURE, spec=DIGITS,
                      local=LOCAL, evaluate=data.evaluate, secure=noise == "distributed",
                      privacy=UpdatePrivacy(clip_norm=2.0, noise_multiplier=2.0, noise=noise))
    assert loud.history[-1].metrics["accuracy"] < result.history[-1].metrics["accuracy"] - 0.2
    assert loud.epsilon < result.epsilon


def test_privacy_settings_are_checked():
    with pytest.raises(PrivacyError, match="clip_norm"):
        UpdatePrivacy(clip_norm=0, noise_multiplier=1.0)
    with pytest.raises(PrivacyError, match="noise mode"):
        UpdatePrivacy(clip_norm=1, noise_multiplier=1.0, noise="local")


def test_robust_rules_do_not_pretend_to_be_private(data):
    with pytest.raises(FederatedError, match="accountant covers the mean"):
        run_rounds(data.initial, data.participants(5), "median", 1, architecture=ARCHITECTURE, spec=DIGITS,
                   privacy=UpdatePrivacy(1.0, 1.0))
