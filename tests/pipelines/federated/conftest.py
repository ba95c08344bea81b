"""Small real models on the project's digits (sklearn's bundled images, as `pipelines.data.builder`
builds every site's data from): an MLP of one hidden layer, a few hundred rows, a few rounds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from pipelines.data.builder import digits
from pipelines.data.spec import DIGITS
from pipelines.federated import LocalConfig, Participant, evaluate_state
from pipelines.federated.updates import build_model

ARCHITECTURE = {"architecture": "mlp", "hyper": {"hidden": [32], "dropout": 0.0}}
LOCAL = LocalConfig(epochs=3, lr=0.05, batch_size=10, momentum=0.5)


@dataclass
class Digits:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    initial: dict[str, torch.Tensor]

    def evaluate(self, state) -> dict[str, float]:
        return evaluate_state(state, self.x_test, self.y_test, architecture=ARCHITECTURE, spec=DIGITS)

    def participants(self, n: int, **extra) -> list[Participant]:
        """n IID units of the training rows."""
        return [Participant(f"unit-{i}", self.x_train[i::n], self.y_train[i::n], **extra) for i in range(n)]


@pytest.fixture(scope="session")
def data() -> Digits:
    x, y = digits()
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:500], order[1200:1500]
    torch.manual_seed(0)
    model = build_model(ARCHITECTURE, DIGITS)
    model.fit_inputs(torch.from_numpy(x[train]))  # the coordinator's starting model knows the input scale
    return Digits(x[train], y[train], x[test], y[test], model.state_dict())
