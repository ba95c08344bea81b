"""The inference service: validation, ODD safe mode and audit, input store, metrics, signature refusal."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from pipelines.trust import audit

ORIGIN_SENSOR = "ORG-SN-0003"
BRUSSELS, STOCKHOLM = {"lat": 50.85, "lon": 4.35}, {"lat": 59.33, "lon": 18.07}


def _post(client, rows, **context):
    return client.post("/predict", json={"inputs": np.asarray(rows).tolist(), "context": context})


def test_in_domain_batch_gets_predictions_and_is_stored(client, store, in_domain_rows):
    response = _post(client, in_domain_rows[:8], sensor_id=ORIGIN_SENSOR, location=BRUSSELS)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["predictions"]) == 8 and all(0 <= p <= 9 for p in body["predictions"])
    assert body["odd"] == {**body["odd"], "allow": True, "mode": "normal", "reasons": [], "flagged": False}
    assert body["model"]["name"] == "digits-cnn-m4" and body["model"]["stage"] == "M4"
    np.testing.assert_array_equal(store.recent(100), in_domain_rows[:8])


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({"inputs": [[0.5] * 64, [0.5] * 63]}, 422, "inputs[1] has 63 values; each row needs 64"),
        ({"inputs": [[0.5] * 63 + [1.5]]}, 422, "inputs[0][63] = 1.5 is outside the range [0.0, 1.0]"),
        ({"inputs": [[0.5] * 10 + [-0.1] + [0.5] * 53]}, 422, "inputs[0][10] = -0.1 is outside the range"),
        ({"inputs": [[0.5] * 3 + ["0.5"] + [0.5] * 60]}, 422, "inputs.0.3: Input should be a valid number"),
        ({"inputs": [[0.5] * 64], "ctx": {}}, 422, "ctx: Extra inputs are not permitted"),
        ({"inputs": []}, 422, "inputs is empty"),
        ({"context": {}}, 422, "inputs: Field required"),
        ({"inputs": [[0.5] * 64] * 257}, 413, "batch of 257 rows exceeds the limit of 256"),
        ({"inputs": [[0.5] * 64], "context": "ORG-SN-0001"}, 422, "context: Input should be a valid dictionary"),
    ],
)
def test_bad_input_is_refused_naming_the_problem(client, store, payload, status, message):
    response = client.post("/predict", json=payload)
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert store.count() == 0  # nothing of a refused request is kept


def test_non_finite_input_is_refused(client, store):
    body = '{"inputs": [[' + ", ".join(["0.5"] * 63 + ["NaN"]) + "]]}"
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "inputs[0][63]" in response.json()["detail"]


def _last_breach(paths):
    breaches = [e for e in audit.entries(paths) if e["action"] == "odd.breach"]
    return breaches[-1] if breaches else None


def test_unapproved_sensor_gets_safe_mode_answer_and_security_event(client, origin, in_domain_rows):
    paths, _ = origin
    response = _post(client, in_domain_rows[:4], sensor_id="DST-SN-0001")
    assert response.status_code == 200
    body = response.json()
    assert body["predictions"] is None
    assert body["odd"]["allow"] is False and body["odd"]["mode"] == "withhold"
    assert body["odd"]["reasons"] == ["sensor DST-SN-0001 is not in the approved sensor list of origin"]
    entry = _last_breach(paths)
    assert entry["details"]["request_id"] == body["request_id"]
    assert entry["outcome"] == "withhold" and entry["details"]["sensor_id"] == "DST-SN-0001"
    assert entry["details"]["security_event"] is True
    audit.verify(paths)  # the breach entry is chained and signed


def test_location_outside_geofence_is_withheld(client, in_domain_rows):
    body = _post(client, in_domain_rows[:2], sensor_id=ORIGIN_SENSOR, location=STOCKHOLM).json()
    assert body["predictions"] is None
    assert body["odd"]["reasons"] == ["location (59.33, 18.07) is outside the geofence of origin"]


def test_inputs_outside_the_envelope_are_withheld(client, in_domain_rows):
    saturated = np.full((1, 64), 0.95, dtype=np.float32)  # a failing, saturated sensor
    body = _post(client, np.vstack([in_domain_rows[:3], saturated]), sensor_id=ORIGIN_SENSOR).json()
    assert body["predictions"] is None
    assert any("sample_mean 0.95 is above the envelope maximum" in r for r in body["odd"]["reasons"])


def test_latency_over_budget_flags_but_answers(origin, conf_with, headers, store, in_domain_rows):
    from fastapi.testclient import TestClient

    from pipelines.serving.app import create_app

    # a site that lets clients ask for budgets down to 1 µs (the shipped floor is 1 ms)
    app = create_app(*origin, conf=conf_with(client_latency_budget_ms=[0.0001, 60000.0]))
    with TestClient(app, headers=headers) as client:
        body = _post(client, in_domain_rows[:3], sensor_id=ORIGIN_SENSOR, latency_budget_ms=0.001).json()
    assert body["odd"]["mode"] == "flag" and body["odd"]["flagged"] is True
    assert len(body["predictions"]) == 3
    assert "over the latency budget of 0.001 ms" in body["odd"]["reasons"][0]
    assert _last_breach(origin[0])["outcome"] == "flag"
    assert store.count() == 0  # a flagged request is outside the ODD: its inputs are not stored


def _scrape(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)", line)
            assert match, f"not Prometheus text format: {line!r}"
            samples[match.group(1)] = float(match.group(2))
    return samples


def _value(samples, name, **labels):
    found = [v for k, v in samples.items()
             if k.split("{")[0] == name and all(f'{lk}="{lv}"' in k for lk, lv in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_metrics_scrape_counts_requests_breaches_latency_and_drift(client, origin, in_domain_rows):
    before = _scrape(client.get("/metrics").text)
    _post(client, in_domain_rows[:5], sensor_id=ORIGIN_SENSOR)
    _post(client, in_domain_rows[:5], sensor_id="UNKNOWN")
    client.post("/predict", json={"inputs": [[2.0] * 64]})
    (origin[0].state_dir / "drift").mkdir(parents=True, exist_ok=True)
    (origin[0].state_dir / "drift" / "latest.json").write_text(json.dumps({
        "drift": True, "checked_at_unix": 1700000000,
        "detectors": {"ks": {"score": 0.61, "p_value": 1e-9}, "mmd": {"score": 0.02, "p_value": 0.0}}}))
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = _scrape(response.text)

    def grew(name, **labels):
        return _value(after, name, **labels) - (_value(before, name, **labels) if any(
            k.split("{")[0] == name and all(f'{a}="{b}"' in k for a, b in labels.items()) for k in before) else 0)

    assert grew("factory_serving_requests_total", outcome="ok") == 1
    assert grew("factory_serving_requests_total", outcome="odd_breach") == 1
    assert grew("factory_serving_requests_total", outcome="invalid") == 1
    assert grew("factory_serving_odd_breaches_total", mode="withhold") == 1
    assert grew("factory_serving_samples_total") == 10
    assert grew("factory_serving_request_latency_seconds_count") == 2
    assert _value(after, "factory_serving_request_latency_seconds_bucket", le="+Inf") == _value(
        after, "factory_serving_request_latency_seconds_count")
    assert _value(after, "factory_drift_detected", site="origin") == 1
    assert _value(after, "factory_drift_score", detector="ks") == pytest.approx(0.61)


def test_healthz(client):
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["site"] == "origin"


def test_service_refuses_to_start_when_a_model_byte_changed(origin, tampered_copy):
    from pipelines.serving.app import ServingError, create_app

    paths, ref = origin
    onnx = tampered_copy / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))
    with pytest.raises(ServingError, match="refusing to serve digits-cnn-m4/1: signature of model does not verify"):
        create_app(paths, replace(ref, model_dir=tampered_copy))


def test_service_refuses_to_start_without_a_signature(origin, tampered_copy):
    from pipelines.serving.app import ServingError, create_app

    (tampered_copy / "model.sig").unlink()
    with pytest.raises(ServingError, match="has no model.sig"):
        create_app(origin[0], replace(origin[1], model_dir=tampered_copy))


def test_store_is_bounded_and_returns_the_newest_rows(tmp_path):
    from pipelines.serving.store import InputStore

    store = InputStore(tmp_path / "inputs", max_samples=100, segment_samples=30)
    rows = np.random.default_rng(1).random((250, 64), dtype=np.float32)
    for start in range(0, 250, 17):
        store.append(rows[start : start + 17])
    assert 70 < store.count() <= 100
    np.testing.assert_array_equal(store.recent(50), rows[-50:])
    assert len(list((tmp_path / "inputs").iterdir())) <= 4
    with pytest.raises(ValueError, match="rows of 64 features"):
        store.append(rows[:, :10])
