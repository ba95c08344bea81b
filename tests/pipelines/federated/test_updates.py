from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.data.spec import DIGITS
from pipelines.federated import FederatedError, LocalConfig, StateLayout, apply_update, local_update
from pipelines.federated.updates import build_model

from .conftest import ARCHITECTURE, LOCAL

CNN = {"architecture": "cnn", "hyper": {"channels": [4, 8], "hidden": 16, "dropout": 0.2}}


def test_state_round_trips_through_a_flat_float32_vector():
    torch.manual_seed(1)
    state = build_model(CNN, DIGITS).state_dict()
    layout = StateLayout.of(state)
    vector = layout.to_vector(state)
    assert vector.dtype == np.float32 and vector.shape == (sum(t.numel() for t in state.values()),)
    assert layout.names == tuple(state)  # state_dict order kept
    rebuilt = layout.to_state(vector, state)
    assert all(torch.equal(rebuilt[k], state[k]) and rebuilt[k].shape == state[k].shape for k in state)
    model = build_model(CNN, DIGITS)
    model.load_state_dict(rebuilt)
    moved = apply_update(state, np.ones(layout.size, np.float32))
    assert np.allclose(layout.to_vector(moved), vector + 1)


def test_layout_refuses_a_vector_or_state_of_another_model():
    state = build_model(CNN, DIGITS).state_dict()
    layout = StateLayout.of(state)
    with pytest.raises(FederatedError, match="does not fit a model"):
        layout.to_state(np.zeros(layout.size - 1, np.float32), state)
    with pytest.raises(FederatedError, match="has no entry"):
        layout.to_vector(build_model(ARCHITECTURE, DIGITS).state_dict())


def test_local_update_is_seeded_and_counts_its_rows(data):
    x, y = data.x_train[:100], data.y_train[:100]
    kwargs = dict(architecture=ARCHITECTURE, spec=DIGITS, config=LOCAL)
    first = local_update(data.initial, x, y, seed=3, **kwargs)
    again = local_update(data.initial, x, y, seed=3, **kwargs)
    other = local_update(data.initial, x, y, seed=4, **kwargs)
    assert first.n_samples == 100 and first.delta.dtype == np.float32
    assert np.array_equal(first.delta, again.delta) and not np.array_equal(first.delta, other.delta)
    before = data.evaluate(data.initial)["accuracy"]
    assert data.evaluate(apply_update(data.initial, first.delta))["accuracy"] > before + 0.3


def test_proximal_term_keeps_the_update_near_the_global_model(data):
    x, y = data.x_train[:100], data.y_train[:100]
    norms = {}
    for mu in (0.0, 1.0, 10.0):
        config = LocalConfig(epochs=3, lr=0.05, batch_size=10, mu=mu)
        update = local_update(data.initial, x, y, architecture=ARCHITECTURE, spec=DIGITS, config=config, seed=0)
        norms[mu] = float(np.linalg.norm(update.delta))
    assert norms[0.0] > norms[1.0] > norms[10.0]


def test_local_update_refuses_rows_of_another_shape(data):
    with pytest.raises(FederatedError, match="64 features"):
        local_update(data.initial, data.x_train[:10, :32], data.y_train[:10], architecture=ARCHITECTURE,
                     spec=DIGITS, config=LOCAL, seed=0)
    with pytest.raises(FederatedError, match="mu must be"):
        LocalConfig(mu=-1)


def test_update_bytes_round_trip_and_refuse_other_payloads():
    from pipelines.federated import update_bytes, update_from_bytes

    vector = np.linspace(-1, 1, 50).astype(np.float32)
    assert np.array_equal(update_from_bytes(update_bytes(vector), 50), vector)
    masked = np.arange(5, dtype=np.uint64) * np.uint64(2**61)
    assert np.array_equal(update_from_bytes(update_bytes(masked), 5), masked)
    with pytest.raises(FederatedError, match="the model has 49"):
        update_from_bytes(update_bytes(vector), 49)
    with pytest.raises(FederatedError, match="no update header"):
        update_from_bytes(b"PAR1" + vector.tobytes(), 50)
    with pytest.raises(FederatedError, match="not finite"):
        update_from_bytes(update_bytes(np.full(3, np.inf, np.float32)), 3)
    with pytest.raises(FederatedError, match="float32 or uint64"):
        update_bytes(vector.astype(np.float64))
