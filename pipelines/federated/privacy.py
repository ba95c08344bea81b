"""Differential privacy on updates: participant-level DP-FedAvg.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models" (ICLR), and
Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping": each participant's
update is clipped to L2 norm C, the coordinator averages the clipped updates with equal weights
(so one participant moves the sum by at most C) and Gaussian noise of standard deviation sigma * C
is added to the sum. The guarantee is per participant (a whole site unit's data), not per row.

Where the noise is added (`UpdatePrivacy.noise`):
- `central`: the coordinator adds N(0, (sigma C)^2) to the sum (it is trusted to; it sees the
  clipped sum first, unless secure aggregation hides even that, see below);
- `distributed`: each of the m participants adds N(0, (sigma C)^2 / m) before sending, so the sum
  carries N(0, (sigma C)^2) and, over secure aggregation, nobody sees an un-noised value. If only
  k < m send, the sum carries noise sigma * sqrt(k / m) * C: the accountant is given that sigma.

The accountant is opacus's RDP accountant (Mironov 2017) over the rounds, with the sample rate the
share of participants taking part in a round (1.0 when all are asked every round).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NOISE_MODES = ("central", "distributed")


class PrivacyError(ValueError):
    """A privacy setting is unusable; the message says which and why."""


@dataclass(frozen=True)
class UpdatePrivacy:
    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    noise: str = "central"

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise PrivacyError(f"clip_norm must be positive, not {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise PrivacyError(f"noise_multiplier must be >= 0, not {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), not {self.delta}")
        if self.noise not in NOISE_MODES:
            raise PrivacyError(f"unknown noise mode {self.noise!r}; modes: {', '.join(NOISE_MODES)}")


def clip_update(delta: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """`delta` scaled to L2 norm at most `clip_norm`, and its norm before clipping."""
    norm = float(np.linalg.norm(np.asarray(delta, dtype=np.float64)))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return (np.asarray(delta, dtype=np.float64) * scale).astype(np.float32), norm


def gaussian_noise(dimension: int, std: float, rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0.0, std, size=dimension).astype(np.float64)


def participant_noise_std(privacy: UpdatePrivacy, expected_participants: int) -> float:
    """The noise each participant adds in `distributed` mode (0 in `central` mode)."""
    if privacy.noise == "central":
        return 0.0
    return privacy.noise_multiplier * privacy.clip_norm / np.sqrt(max(expected_participants, 1))


def effective_noise_multiplier(privacy: UpdatePrivacy, expected: int, received: int) -> float:
    """The sigma the sum of a round carries: all of it in central mode; in distributed mode only
    the share of the participants that sent (stragglers' noise is missing)."""
    if privacy.noise == "central":
        return privacy.noise_multiplier
    return privacy.noise_multiplier * float(np.sqrt(received / max(expected, 1)))


def epsilon(noise_multipliers: list[float] | float, *, sample_rate: float, delta: float, rounds: int | None = None) -> float:
    """The (epsilon, delta)-DP epsilon after the rounds, from opacus's RDP accountant: one noise
    multiplier per round (or one for `rounds` rounds), each round sampling `sample_rate` of the
    participants. Infinite when a round carried no noise."""
    from opacus.accountants import RDPAccountant

    sigmas = [float(noise_multipliers)] * int(rounds or 0) if np.isscalar(noise_multipliers) else list(noise_multipliers)
    if not 0 < sample_rate <= 1:
        raise PrivacyError(f"sample_rate must be in (0, 1], not {sample_rate}")
    if not sigmas:
        return 0.0
    if min(sigmas) <= 0:
        return float("inf")
    accountant = RDPAccountant()
    for sigma in sigmas:
        accountant.step(noise_multiplier=sigma, sample_rate=sample_rate)
    return float(accountant.get_epsilon(delta=delta))
