"""Extraction detection at serving: query budgets, the PRADA detector, throttling and its audit
(pipelines.protection.extraction, wired into the service's /predict)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.protection.extraction import (
    ExtractionConf,
    ExtractionConfError,
    ExtractionMonitor,
    clear_client,
    clearances_path,
)
from pipelines.trust import audit

from .conftest import bearer, serving_conf_with


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _digits_traffic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """In-distribution rows (the bundled digits through the origin's sensor, fresh noise) and their labels."""
    from pipelines.data.builder import digits, origin_sensor

    rng = np.random.default_rng(seed)
    x, y = digits()
    pick = rng.choice(len(x), n, replace=n > len(x))
    return origin_sensor(x[pick], rng), y[pick]


def _attack_rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An attacker's queries: 50 in-domain seeds, each expanded with small noise (labels of their seed)."""
    seeds, labels = _digits_traffic(50, seed + 100)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, 50, n)
    return np.clip(seeds[pick] + rng.normal(0, 0.05, (n, 64)), 0, 1).astype(np.float32), labels[pick]


def _monitor(**kw) -> tuple[ExtractionMonitor, Clock]:
    clock = Clock()
    return ExtractionMonitor(ExtractionConf(**kw), 64, clock=clock, wall=clock), clock


def _feed(monitor, client, x, labels, batch):
    """Observe in batches; the first detection (or None)."""
    for start in range(0, len(x), batch):
        found = monitor.observe(client, x[start:start + batch], labels[start:start + batch])
        if found is not None:
            return found
    return None


def test_benign_traffic_is_not_flagged_and_seed_expansion_is():
    monitor, _ = _monitor()
    x, y = _digits_traffic(1500, seed=1)
    assert _feed(monitor, "sensor", x, y, 32) is None
    ax, ay = _attack_rows(1500)
    found = _feed(monitor, "thief", ax, ay, 32)
    assert found is not None and found.client == "thief"
    assert found.statistic < 0.80 and 100 <= found.queries < 1500
    assert set(monitor.throttled()) == {"thief"}


def test_batch_rows_count_as_single_queries():
    """A batch of n rows gives the detector the same distances as n requests of one row."""
    x, y = _attack_rows(320)  # whole gathers of 32 either way
    one, _ = _monitor(threshold=0.0)
    batched, _ = _monitor(threshold=0.0)
    for i in range(len(x)):
        one.observe("c", x[i:i + 1], y[i:i + 1])
    for start in range(0, len(x), 64):
        batched.observe("c", x[start:start + 64], y[start:start + 64])
    a, b = one._clients["c"], batched._clients["c"]
    assert a.n_distances == b.n_distances > 0
    np.testing.assert_allclose(np.sort(a.distances[:a.n_distances]), np.sort(b.distances[:b.n_distances]), atol=1e-4)


def test_memory_is_bounded_per_client():
    monitor, _ = _monitor(history=300, window=200, min_queries=100, threshold=0.0)
    x, y = _digits_traffic(2000, seed=2)
    _feed(monitor, "c", x, y, 256)
    state = monitor._clients["c"]
    assert state.ring.shape == (300, 64) and state.filled == 300
    assert len(state.distances) == 200 and state.n_distances > 200


def test_repeated_rows_add_no_distance():
    monitor, _ = _monitor()
    x, y = _digits_traffic(40, seed=3)
    for _ in range(10):
        assert monitor.observe("retrying", x, y) is None
    assert monitor._clients["retrying"].n_distances < 40


def test_budget_per_window_and_total():
    monitor, clock = _monitor(window_s=60, per_window=100, total=250)
    assert monitor.admit("c", 64) is None
    refusal = monitor.admit("c", 64)
    assert refusal.reason == "budget_window" and "64 of 100 rows" in refusal.detail and refusal.retry_after_s == 60
    assert monitor.admit("other", 100) is None  # budgets are per client
    clock.t += 60
    assert monitor.admit("c", 100) is None
    clock.t += 60
    assert monitor.admit("c", 64) is None
    refusal = monitor.admit("c", 30)  # within the window's 100, over the total of 250
    assert refusal.reason == "budget_total" and "228 of its 250 rows" in refusal.detail


def test_throttle_until_cool_down_then_a_new_episode():
    monitor, clock = _monitor(cool_down_s=600)
    ax, ay = _attack_rows(1500)
    assert _feed(monitor, "thief", ax, ay, 32) is not None
    refusal = monitor.admit("thief", 1)
    assert refusal.reason == "throttled" and "model-extraction" in refusal.detail and refusal.retry_after_s == 600
    assert monitor.observe("thief", ax[:32], ay[:32]) is None  # no second detection in the episode
    clock.t += 600
    assert monitor.admit("thief", 1) is None and monitor.throttled() == {}
    assert monitor._clients["thief"].n_distances == 0  # a fresh start
    assert _feed(monitor, "thief", ax, ay, 32) is not None  # the resumed attack is a new episode
    assert monitor.detections_total == 2


def test_throttled_client_may_keep_a_slow_rate():
    monitor, clock = _monitor(rows_per_minute=40)
    ax, ay = _attack_rows(1500)
    _feed(monitor, "thief", ax, ay, 32)
    assert monitor.admit("thief", 32) is None
    assert monitor.admit("thief", 32).reason == "throttled"
    clock.t += 60
    assert monitor.admit("thief", 32) is None


def test_operator_clearance_releases_the_client(origin):
    paths = origin[0]
    clear_client(paths, "clear-me")  # cleared before the detection: does not release it
    monitor = ExtractionMonitor(ExtractionConf(), 64, clearances=clearances_path(paths), clock=Clock())
    ax, ay = _attack_rows(1500)
    assert _feed(monitor, "clear-me", ax, ay, 32) is not None
    assert monitor.admit("clear-me", 1).reason == "throttled"
    clear_client(paths, "clear-me")
    assert monitor.admit("clear-me", 1) is None and monitor.throttled() == {}


@pytest.mark.parametrize(("section", "problem"), [
    ({"detector": {"threshold": 1.0}}, "below 1"),
    ({"detector": {"min_queries": 500, "window": 100}}, "at least min_queries"),
    ({"budget": {"per_window": "lots"}}, "extraction.budget.per_window must be a number"),
    ({"throttle": {"cool_down_s": -1}}, "must be >= 0"),
    ({"budget": [1]}, "extraction.budget must be a mapping"),
])
def test_malformed_settings_are_named(section, problem):
    with pytest.raises(ExtractionConfError, match=problem):
        ExtractionConf.from_settings(section)


def test_service_refuses_a_malformed_extraction_section(origin):
    from pipelines.serving.app import ServingError, create_app

    with pytest.raises(ServingError, match="threshold"):
        create_app(*origin, conf=serving_conf_with(), auth=False, extraction={"detector": {"threshold": 2}})


@pytest.fixture(scope="module")
def guarded(origin):
    """The origin's service with a small budget, two clients of its own and its audit log."""
    from fastapi.testclient import TestClient

    from pipelines.serving.app import create_app
    from pipelines.serving.clients import add_client

    paths = origin[0]
    tokens = {name: add_client(paths, name) for name in ("budget-probe", "prada-thief")}
    app = create_app(*origin, conf=serving_conf_with(audit={"breaches_per_client": 100000}),
                     extraction={"budget": {"per_window": 3000, "window_s": 3600}})
    with TestClient(app) as client:
        yield client, tokens, app


def _post(client, token, rows):
    return client.post("/predict", headers=bearer(token),
                       json={"inputs": rows.tolist(), "context": {"sensor_id": "ORG-SN-0001"}})


def test_service_answers_429_over_budget(guarded):
    client, tokens, _ = guarded
    x, _ = _digits_traffic(256, seed=5)
    for _ in range(11):
        assert _post(client, tokens["budget-probe"], x).status_code == 200
    response = _post(client, tokens["budget-probe"], x)
    assert response.status_code == 429 and response.json()["reason"] == "budget_window"
    assert "query budget exceeded: client budget-probe has used 2816 of 3000 rows" in response.json()["detail"]
    assert int(response.headers["retry-after"]) > 3000
    assert _post(client, tokens["budget-probe"], x[:100]).status_code == 200  # what is left of the budget


def test_service_flags_audits_once_and_throttles(guarded, origin):
    client, tokens, app = guarded
    paths = origin[0]
    ax, _ = _attack_rows(2000, seed=7)
    statuses = [_post(client, tokens["prada-thief"], ax[i:i + 50]).status_code for i in range(0, 2000, 50)]
    assert 200 in statuses and statuses[-1] == 429
    first = statuses.index(429)
    assert set(statuses[first:]) == {429}
    events = [e for e in audit.entries(paths) if e["action"] == "serving.extraction_suspected"
              and e["details"]["client"] == "prada-thief"]
    assert len(events) == 1
    details = events[0]["details"]
    assert details["queries"] == first * 50 and details["statistic"] < details["threshold"] == 0.80
    assert details["security_event"] is True and events[0]["outcome"] == "throttled"
    metrics = client.get("/metrics", headers=bearer(tokens["prada-thief"])).text  # /metrics is not throttled
    assert "factory_serving_extraction_throttled_clients" in metrics
    assert 'outcome="throttled"' in metrics
    assert "prada-thief" in app.state.extraction.throttled()


def test_cli_clear_is_audited_and_releases(origin):
    from click.testing import CliRunner

    from pipelines.serving.cli import serve

    paths = origin[0]
    monitor = ExtractionMonitor(ExtractionConf(), 64, clearances=clearances_path(paths), clock=Clock())
    ax, ay = _attack_rows(1500)
    assert _feed(monitor, "cli-cleared", ax, ay, 32) is not None
    result = CliRunner().invoke(serve, ["throttle", "clear", "--site", "origin", "--client", "cli-cleared"],
                                env={"FACTORY_HOME": str(paths.home)})
    assert result.exit_code == 0, result.output
    assert monitor.admit("cli-cleared", 1) is None
    assert [e for e in audit.entries(paths) if e["action"] == "serving.extraction_cleared"
            and e["details"]["client"] == "cli-cleared"]
    bad = CliRunner().invoke(serve, ["throttle", "clear", "--site", "origin", "--client", "Bad Name"],
                             env={"FACTORY_HOME": str(paths.home)})
    assert bad.exit_code != 0 and "not allowed" in bad.output


def test_concurrent_clients_are_independent():
    """Requests of several clients in threads (as the service runs them): each client's detector sees
    exactly its own rows, and the process's BLAS thread setting is restored afterwards."""
    import threading

    from threadpoolctl import threadpool_info

    before = [i["num_threads"] for i in threadpool_info()]
    monitor, _ = _monitor(threshold=0.0)
    x, y = _digits_traffic(1024, seed=9)

    def run(name):
        for start in range(0, len(x), 64):
            monitor.observe(name, x[start:start + 64], y[start:start + 64])

    threads = [threading.Thread(target=run, args=(f"c{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone, _ = _monitor(threshold=0.0)
    for start in range(0, len(x), 64):
        alone.observe("solo", x[start:start + 64], y[start:start + 64])
    expected = alone._clients["solo"].distances
    for i in range(4):
        np.testing.assert_array_equal(monitor._clients[f"c{i}"].distances, expected)
    assert [i["num_threads"] for i in threadpool_info()] == before


def test_repeats_inside_one_batch_and_near_rows_are_measured_exactly():
    monitor, _ = _monitor(threshold=0.0)
    x, y = _digits_traffic(64, seed=4)
    near = x.copy()
    near[:, 0] += 0.01  # a real, tiny step: 0.01 away from its original
    rows = np.concatenate([x, x, near])
    labels = np.concatenate([y, y, y])
    monitor.observe("c", rows, labels)
    state = monitor._clients["c"]
    distances = state.distances[: state.n_distances]
    assert np.sum(np.abs(distances - 0.01) < 1e-4) == 64  # the steps, measured exactly; the repeats left out


def test_one_row_requests_are_measured_together():
    monitor, _ = _monitor(threshold=0.0, gather=8)
    x, y = _digits_traffic(16, seed=6)
    for i in range(7):
        monitor.observe("c", x[i:i + 1], y[i:i + 1])
    state = monitor._clients["c"]
    assert state.filled == 0 and state.pending_rows == 7 and state.queries == 7
    monitor.observe("c", x[7:8], y[7:8])
    assert state.filled == 8 and state.pending_rows == 0
