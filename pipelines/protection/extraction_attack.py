"""A real model-extraction attack on a running `factory serve` endpoint (ART KnockoffNets), to
measure the extraction detector and to check whether a stolen copy carries the owner's watermark.

`run_extraction(url, token, pool, n_queries=...)` wraps the endpoint in an ART `BlackBoxClassifier`
whose predict function posts rows to `/predict` (with the request `context` the site's ODD needs,
e.g. an approved `sensor_id`) and turns the answered labels into one-hot vectors (the API returns
labels and a capped confidence, not the full probability vector). KnockoffNets (random sampling)
draws `n_queries` rows from the attacker's `pool`, queries them in batches of `query_batch` and
trains the surrogate on the answers. When the service refuses the attacker (429: throttled after a
detection, or over budget), the attack stops there and the surrogate is trained on the queries
answered up to that point, as the attacker would. Returns the surrogate (`torch.nn.Module`, a
`ConvNet` with the victim's input shape unless another is given: exportable with
`pipelines.learning.onnx_export.export_onnx`) and the statistics.

`seed_expansion_pool(seeds, n)` is the attacker's query pool when it holds only a few in-domain
inputs: each query is a seed with small Gaussian noise (the synthetic-query pattern PRADA targets).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np


class ServiceRefused(RuntimeError):
    """The service refused a query batch (429); `status`, `reason` and `detail` say why."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(f"{status} {reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail


def seed_expansion_pool(seeds: np.ndarray, n: int, *, noise: float = 0.05, low: float = 0.0, high: float = 1.0,
                        seed: int = 0) -> np.ndarray:
    """`n` queries, each a random row of `seeds` plus N(0, noise) per value, clipped to [low, high]."""
    rng = np.random.default_rng(seed)
    seeds = np.asarray(seeds, dtype=np.float32)
    picked = seeds[rng.integers(0, len(seeds), n)]
    return np.clip(picked + rng.normal(0.0, noise, picked.shape), low, high).astype(np.float32)


class _Endpoint:
    """The service's `/predict` as the attacker sees it; keeps every answered query."""

    def __init__(self, url: str, token: str | None, context: dict[str, Any] | None, nb_classes: int,
                 timeout: float) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.context, self.nb_classes = context or {}, nb_classes
        self.answered_x: list[np.ndarray] = []
        self.answered_y: list[np.ndarray] = []
        self.requests = 0
        self.abstained = 0

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
        response = self.http.post("/predict", json={"inputs": x.tolist(), "context": self.context})
        self.requests += 1
        if response.status_code != 200:
            try:
                body = response.json()
            except ValueError:
                body = {"detail": response.text[:200]}
            raise ServiceRefused(response.status_code, str(body.get("reason", "error")), str(body.get("detail")))
        predictions = response.json()["predictions"]
        if predictions is None:
            raise ServiceRefused(200, "withheld", "the service withheld the answers (outside its ODD): "
                                                 "send the request context the site's ODD expects")
        labels = np.asarray([-1 if p is None else p for p in predictions], dtype=np.int64)
        self.abstained += int((labels < 0).sum())
        onehot = np.zeros((len(x), self.nb_classes), dtype=np.float32)
        onehot[np.flatnonzero(labels >= 0), labels[labels >= 0]] = 1.0
        self.answered_x.append(x)
        self.answered_y.append(onehot)
        return onehot

    def answered(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.answered_x:
            return np.empty((0, 0), np.float32), np.empty((0, self.nb_classes), np.float32)
        return np.concatenate(self.answered_x), np.concatenate(self.answered_y)


def thief_classifier(model, input_shape: Sequence[int], nb_classes: int, lr: float):
    import torch
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(),
                             optimizer=torch.optim.Adam(model.parameters(), lr=lr),
                             input_shape=tuple(input_shape), nb_classes=nb_classes, clip_values=(0.0, 1.0))


def run_extraction(url: str, token: str | None, pool: np.ndarray, *, n_queries: int, nb_classes: int = 10,
                   input_shape: Sequence[int] = (1, 8, 8), query_batch: int = 32,
                   context: dict[str, Any] | None = None, surrogate=None, epochs: int = 30, lr: float = 0.003,
                   x_test: np.ndarray | None = None, y_test: np.ndarray | None = None, seed: int = 0,
                   timeout: float = 30.0) -> tuple[Any, dict[str, Any]]:
    """KnockoffNets against the service at `url` (see the module docstring) -> (surrogate, stats).

    stats: `n_queries` (planned), `queries_answered`, `requests`, `completed` (no refusal),
    `refused` (None or {status, reason, detail}), `queries_until_refused` (answered before the first
    refusal, None when completed), `surrogate_accuracy` on (`x_test`, `y_test`) when given, `seconds`."""
    import torch
    from art.attacks.extraction import KnockoffNets
    from art.estimators.classification import BlackBoxClassifier

    from pipelines.learning.model import ConvNet

    torch.manual_seed(seed)
    np.random.seed(seed)  # KnockoffNets draws its queries with np.random
    n_features = int(np.prod(input_shape))
    if surrogate is None:
        surrogate = ConvNet(tuple(input_shape), nb_classes)
    endpoint = _Endpoint(url, token, context, nb_classes, timeout)
    victim = BlackBoxClassifier(endpoint.predict, input_shape=(n_features,), nb_classes=nb_classes,
                                clip_values=(0.0, 1.0))
    attack = KnockoffNets(classifier=victim, batch_size_fit=32, batch_size_query=query_batch, nb_epochs=epochs,
                          nb_stolen=n_queries, sampling_strategy="random", verbose=False)
    thief = thief_classifier(surrogate, (n_features,), nb_classes, lr)
    started = time.perf_counter()
    refused = None
    try:
        attack.extract(np.asarray(pool, dtype=np.float32).reshape(len(pool), -1), thieved_classifier=thief)
    except ServiceRefused as exc:
        refused = {"status": exc.status, "reason": exc.reason, "detail": exc.detail}
        x, y = endpoint.answered()
        if len(x):  # what the attacker holds when it is stopped: train on it as KnockoffNets would
            thief.fit(x, y, batch_size=32, nb_epochs=epochs, verbose=False)
    finally:
        endpoint.http.close()
    x, _ = endpoint.answered()
    stats: dict[str, Any] = {
        "n_queries": n_queries, "queries_answered": len(x), "requests": endpoint.requests,
        "completed": refused is None, "refused": refused,
        "queries_until_refused": None if refused is None else len(x), "abstained": endpoint.abstained,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if x_test is not None and y_test is not None:
        predicted = thief.predict(np.asarray(x_test, dtype=np.float32).reshape(len(x_test), -1)).argmax(axis=1)
        stats["surrogate_accuracy"] = float((predicted == np.asarray(y_test)).mean())
    surrogate.eval()
    return surrogate, stats
