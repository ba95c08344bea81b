"""A real extraction attack (ART KnockoffNets) against the running service over HTTP: the attacker
is flagged before the attack completes, audited once and throttled; a benign client sending
in-distribution rows at the same volume is not."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

from pipelines.protection.extraction_attack import run_extraction, seed_expansion_pool
from pipelines.trust import audit

from .conftest import bearer, serving_conf_with

N_QUERIES, BATCH = 1500, 32
CONTEXT = {"sensor_id": "ORG-SN-0003"}  # the origin's ODD answers approved sensors only


def _digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from pipelines.data.builder import digits, origin_sensor

    rng = np.random.default_rng(seed)
    x, y = digits()
    pick = rng.choice(len(x), n, replace=n > len(x))
    return origin_sensor(x[pick], rng), y[pick]


@pytest.fixture(scope="module")
def victim(origin):
    """A better-trained signed model at the origin (the shared fixture's is trained for 3 epochs only)."""
    import pandas as pd

    from pipelines.config import TrainingProfile
    from pipelines.data.schema import FEATURE_COLUMNS, LABEL_COLUMN
    from pipelines.learning.onnx_export import export_onnx
    from pipelines.learning.train import train
    from pipelines.serving.app import ServedModel
    from pipelines.trust.signing import sign_model_dir

    paths = origin[0]
    frame = pd.concat([pd.read_parquet(paths.data_dir / f"{p}.parquet") for p in ("private", "shared")])
    x, y = frame[list(FEATURE_COLUMNS)].to_numpy(np.float32), frame[LABEL_COLUMN].to_numpy(np.int64)
    model = train(x, y, TrainingProfile(epochs=25, lr=0.003, batch_size=32, weight_decay=0.0), seed=3).model
    target = paths.models_dir / "extraction-victim" / "model"
    target.mkdir(parents=True)
    export_onnx(model, target / "model.onnx")
    metadata = {"name": "digits-cnn-m4", "stage": "M4", "site": "origin", "reference_data": ["data/private.parquet"]}
    (target / "metadata.json").write_text(json.dumps(metadata))
    sign_model_dir(paths, target)
    return ServedModel("digits-cnn-m4", "extraction-victim", "M4", target, metadata)


@pytest.fixture(scope="module")
def service(origin, victim):
    """The service on a free loopback port (uvicorn in a thread): (url, tokens, app)."""
    import uvicorn

    from pipelines.serving.app import create_app
    from pipelines.serving.clients import add_client

    paths = origin[0]
    tokens = {name: add_client(paths, name) for name in ("knockoff", "benign-sensor")}
    app = create_app(paths, victim, conf=serving_conf_with(audit={"breaches_per_client": 100000}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", tokens, app
    server.should_exit = True
    thread.join(timeout=10)


def test_knockoff_attack_is_flagged_and_throttled_benign_client_is_not(service, origin):
    import httpx

    url, tokens, app = service
    paths = origin[0]
    test_x, test_y = _digits(400, seed=11)
    seeds, _ = _digits(50, seed=12)  # the attacker's few in-domain inputs
    pool = seed_expansion_pool(seeds, N_QUERIES, noise=0.05, seed=13)

    surrogate, stats = run_extraction(url, tokens["knockoff"], pool, n_queries=N_QUERIES, query_batch=BATCH,
                                      context=CONTEXT, x_test=test_x, y_test=test_y, epochs=20)
    print(f"\nKnockoffNets: flagged after {stats['queries_until_refused']} of {N_QUERIES} queries "
          f"({stats['requests']} requests); surrogate accuracy at that point {stats['surrogate_accuracy']:.3f}")
    assert not stats["completed"] and stats["refused"]["status"] == 429
    assert stats["refused"]["reason"] == "throttled" and "model-extraction" in stats["refused"]["detail"]
    assert 100 <= stats["queries_until_refused"] < N_QUERIES
    assert 0.0 <= stats["surrogate_accuracy"] <= 1.0
    from pipelines.protection import watermark  # the stolen copy can be checked for a mark as it is

    checked = watermark.verify(surrogate, watermark.WatermarkKey.of(bytes(32)))
    assert checked["triggers"] > 0 and checked["p_value"] is not None, checked

    events = [e for e in audit.entries(paths) if e["action"] == "serving.extraction_suspected"]
    mine = [e for e in events if e["details"]["client"] == "knockoff"]
    assert len(mine) == 1 and mine[0]["details"]["queries"] == stats["queries_until_refused"]
    assert mine[0]["details"]["statistic"] < mine[0]["details"]["threshold"]

    with httpx.Client(base_url=url, timeout=30) as http:  # still throttled: any further query is refused
        again = http.post("/predict", headers=bearer(tokens["knockoff"]),
                          json={"inputs": test_x[:1].tolist(), "context": CONTEXT})
        assert again.status_code == 429 and int(again.headers["retry-after"]) > 0

        benign_x, _ = _digits(N_QUERIES, seed=14)  # the same volume of natural in-distribution rows
        for start in range(0, N_QUERIES, BATCH):
            response = http.post("/predict", headers=bearer(tokens["benign-sensor"]),
                                 json={"inputs": benign_x[start:start + BATCH].tolist(), "context": CONTEXT})
            assert response.status_code == 200, response.text
    assert "benign-sensor" not in app.state.extraction.throttled()
    assert not [e for e in audit.entries(paths) if e["action"] == "serving.extraction_suspected"
                and e["details"]["client"] == "benign-sensor"]
    benign = app.state.extraction._clients["benign-sensor"]
    assert benign.n_distances >= 1000  # the test ran on the benign client's full volume
