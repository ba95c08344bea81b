from __future__ import annotations

import secrets

import numpy as np
import pytest

from pipelines.federated import SecAggCoordinator, SecAggError, SecAggParticipant, SecAggSetup, secure_sum
from pipelines.federated.secure import FRAC_BITS, dequantise, quantise, shamir_combine, shamir_split

DIM = 4000


def _vectors(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"site-{i}": rng.normal(0, 0.05, DIM).astype(np.float32) for i in range(n)}


def _round(n: int, threshold: int | None = None):
    setup = SecAggSetup("r1", tuple(f"site-{i}" for i in range(n)), DIM, threshold)
    parties = {name: SecAggParticipant(name, setup) for name in setup.participants}
    coordinator = SecAggCoordinator(setup)
    for name, party in parties.items():
        coordinator.add_keys(name, party.public_keys())
    sealed = {name: party.share_keys(coordinator.roster) for name, party in parties.items()}
    for name, inbox in coordinator.relay(sealed).items():
        parties[name].receive_shares(inbox)
    return setup, parties, coordinator


def test_shamir_rebuilds_from_any_t_shares_and_not_from_fewer():
    secret = secrets.randbelow(2**256)
    shares = shamir_split(secret, 5, 3)
    for picked in ([0, 1, 2], [4, 2, 0], [1, 3, 4], [0, 1, 2, 3, 4]):
        assert shamir_combine([shares[i] for i in picked]) == secret
    assert shamir_combine(shares[:2]) != secret
    assert shamir_combine(shares[2:4]) != secret


def test_masked_sum_equals_the_plain_sum():
    vectors = _vectors(3)
    total, sent = secure_sum(vectors, round_id="r1")
    plain = np.sum([v.astype(np.float64) for v in vectors.values()], axis=0)
    assert np.max(np.abs(total - plain)) <= 3 * 2.0**-FRAC_BITS
    assert set(sent) == set(vectors) and all(b > 8 * DIM for b in sent.values())


def test_one_masked_vector_looks_uniform_and_uncorrelated_with_the_update():
    setup, parties, _ = _round(3)
    update = np.linspace(0, 1, DIM).astype(np.float32)  # an update with an obvious pattern, all positive
    masked = parties["site-0"].masked_input(update)
    as_signed = masked.view(np.int64).astype(np.float64)
    assert abs(np.corrcoef(as_signed, update)[0, 1]) < 0.1
    top_bits = (masked >> np.uint64(63)).astype(np.float64)
    assert 0.45 < top_bits.mean() < 0.55  # unmasked, every top bit is 0 (positive values)
    plain = quantise(update, FRAC_BITS, parties=3)
    assert (plain >> np.uint64(63)).max() == 0 and np.corrcoef(plain.view(np.int64), update)[0, 1] > 0.99


def test_dropout_of_one_of_four_is_recovered_exactly():
    vectors = _vectors(4, seed=1)
    setup, parties, coordinator = _round(4)
    for name in ("site-0", "site-1", "site-3"):  # site-2 drops after the keys and shares were agreed
        coordinator.add_masked(name, parties[name].masked_input(vectors[name]))
    survivors, dropped = coordinator.split()
    assert dropped == ["site-2"]
    answers = {name: parties[name].unmask(survivors, dropped) for name in survivors}
    total = coordinator.unmasked_sum(answers)
    exact = dequantise(sum(quantise(vectors[n], FRAC_BITS, parties=4) for n in survivors))
    assert np.array_equal(total, exact)  # exact in Z_2^64, not only close
    assert np.max(np.abs(total - sum(vectors[n].astype(np.float64) for n in survivors))) <= 3 * 2.0**-FRAC_BITS


def test_fewer_than_threshold_answers_cannot_unmask():
    vectors = _vectors(4, seed=2)
    setup, parties, coordinator = _round(4, threshold=3)
    for name in ("site-0", "site-1", "site-2"):
        coordinator.add_masked(name, parties[name].masked_input(vectors[name]))
    survivors, dropped = coordinator.split()
    answers = {name: parties[name].unmask(survivors, dropped) for name in survivors[:2]}
    with pytest.raises(SecAggError, match="2 survivors answered the unmasking; 3 must"):
        coordinator.unmasked_sum(answers)
    # and shares short of the threshold rebuild nothing: two shares of site-3's mask key give a wrong key
    shares = [answers[a]["mask_key"]["site-3"] for a in answers]
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        coordinator._combine(shares, "site-3's mask key")


def test_too_few_survivors_stop_the_round():
    vectors = _vectors(4)
    with pytest.raises(SecAggError, match="only 2 participants sent masked vectors"):
        secure_sum(vectors, round_id="r1", dropped_after_sharing=["site-0", "site-1"], threshold=3)


def test_a_participant_answers_once_and_never_reveals_both_secrets_of_one_participant():
    setup, parties, _ = _round(4)
    names = list(setup.participants)
    with pytest.raises(SecAggError, match="split the round's participants"):
        parties["site-0"].unmask(names, ["site-3"])  # site-3 both survivor and dropped
    parties["site-0"].unmask(names[:3], names[3:])
    with pytest.raises(SecAggError, match="already answered"):
        parties["site-0"].unmask(names, [])


def test_tampered_shares_and_small_rounds_are_refused():
    with pytest.raises(SecAggError, match="at least 3 participants"):
        SecAggSetup("r1", ("a", "b"), DIM)
    setup = SecAggSetup("r1", ("a", "b", "c"), DIM)
    parties = {n: SecAggParticipant(n, setup) for n in setup.participants}
    coordinator = SecAggCoordinator(setup)
    for name, party in parties.items():
        coordinator.add_keys(name, party.public_keys())
    sealed = {name: party.share_keys(coordinator.roster) for name, party in parties.items()}
    message = bytearray(sealed["a"]["b"])
    message[-1] ^= 1
    with pytest.raises(SecAggError, match="do not open"):
        parties["b"].receive_shares({"a": bytes(message)})
    with pytest.raises(SecAggError, match="cannot mask before"):
        parties["b"].masked_input(np.zeros(DIM))


def test_a_participant_continues_its_round_from_its_saved_state():
    import json

    vectors = _vectors(3, seed=5)
    setup, parties, coordinator = _round(3)
    # each phase in another task: the participant is saved (at its own site) and restored
    restored = {n: SecAggParticipant.from_private_state(json.loads(json.dumps(p.private_state())))
                for n, p in parties.items()}
    for name, party in restored.items():
        coordinator.add_masked(name, party.masked_input(vectors[name]))
    survivors, dropped = coordinator.split()
    total = coordinator.unmasked_sum({n: restored[n].unmask(survivors, dropped) for n in survivors})
    assert np.max(np.abs(total - sum(v.astype(np.float64) for v in vectors.values()))) <= 3 * 2.0**-FRAC_BITS
    assert SecAggSetup.from_dict(json.loads(json.dumps(setup.to_dict()))) == setup
    with pytest.raises(SecAggError, match="not a saved secure aggregation participant"):
        SecAggParticipant.from_private_state({"name": "site-0"})
