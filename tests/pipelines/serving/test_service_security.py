"""Attacks on the inference service (issue 15, finding 6), each performed and refused: no credential,
a wrong or revoked one, a body too large to parse, unbounded context fields, forced ODD breaches to
flood the audit log, and out-of-ODD inputs sent to poison the drift store. Each test shows the
refusal, the audit entry where one is due, and that nothing was stored."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from pipelines.trust import audit

ORIGIN_SENSOR = "ORG-SN-0003"
MAX_BODY = 1 << 20  # conf/odd.yaml service.max_body_bytes


def _actions(paths, action):
    return [e for e in audit.entries(paths) if e["action"] == action]


def _audit_size(paths) -> int:
    return paths.audit_log.stat().st_size


def _post(client, rows, headers=None, **context):
    return client.post("/predict", json={"inputs": np.asarray(rows).tolist(), "context": context}, headers=headers)


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def service(origin, conf_with, headers):
    """`with service(client_headers=..., **settings) as client`: a fresh service (its own rate limiters)
    with some conf/odd.yaml service settings replaced; leaving the block shuts it down, which writes its
    suppression summaries."""
    from fastapi.testclient import TestClient

    from pipelines.serving.app import create_app

    @contextlib.contextmanager
    def make(client_headers=headers, **settings):
        app = create_app(*origin, conf=conf_with(**settings))
        with TestClient(app, headers=client_headers) as client:
            yield client

    return make


@pytest.fixture
def second_client(origin):
    """A second registered client, revoked again after the test."""
    from pipelines.serving.clients import add_client, revoke_client

    token = add_client(origin[0], "second-client")
    yield {"Authorization": f"Bearer {token}"}
    revoke_client(origin[0], "second-client")


# ------------------------------------------------------------------ credentials


@pytest.mark.parametrize(
    ("authorization", "reason", "message"),
    [
        (None, "missing", "missing credential: send 'Authorization: Bearer <token>'"),
        ("Basic dXNlcjpwYXNz", "malformed", "the Authorization header is not 'Bearer <token>'"),
        ("Bearer " + "x" * 5000, "malformed", "the Authorization header is not 'Bearer <token>'"),
        ("Bearer fsv_" + "A" * 43, "unknown", "the token is not known to this service"),
    ],
)
@pytest.mark.parametrize("path", ["/predict", "/metrics"])
def test_requests_without_a_valid_token_are_refused_and_audited(service, origin, store, in_domain_rows,
                                                                authorization, reason, message, path):
    paths, _ = origin
    headers = {"Authorization": authorization} if authorization else {}
    before = len(_actions(paths, "serving.auth_denied"))
    with service(client_headers=headers) as anonymous:
        if path == "/predict":
            response = _post(anonymous, in_domain_rows[:4], sensor_id=ORIGIN_SENSOR)
        else:
            response = anonymous.get("/metrics")
    assert response.status_code == 401
    assert message in response.json()["detail"]
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "factory_serving" not in response.text  # no metrics leak
    denied = _actions(paths, "serving.auth_denied")
    assert len(denied) == before + 1
    assert denied[-1]["actor"] == "unknown" and denied[-1]["outcome"] == "denied"
    assert denied[-1]["details"] == {**denied[-1]["details"], "reason": reason, "path": path, "security_event": True}
    assert "x" * 100 not in json.dumps(denied[-1])  # the presented header is not recorded
    assert store.count() == 0


def test_health_stays_open(anonymous):
    response = anonymous.get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_other_paths_need_a_token_too(anonymous):
    for path in ("/docs", "/openapi.json", "/nothing-here"):
        assert anonymous.get(path).status_code == 401


def test_token_cli_adds_lists_and_revokes_and_a_running_service_obeys(origin, client, monkeypatch, in_domain_rows,
                                                                      store):
    from pipelines.cli import main
    from pipelines.serving.clients import registry_path

    paths, _ = origin
    monkeypatch.setenv("FACTORY_HOME", str(paths.home))
    runner = CliRunner()
    added = runner.invoke(main, ["serve", "token", "add", "--site", "origin", "--client", "cli-client"])
    assert added.exit_code == 0, added.output
    token = added.stdout.strip()
    assert re.fullmatch(r"fsv_[A-Za-z0-9_-]{43}", token)
    registry = registry_path(paths)
    assert oct(registry.stat().st_mode & 0o777) == "0o600"
    assert token not in registry.read_text()  # stored hashed only

    listed = runner.invoke(main, ["serve", "token", "list", "--site", "origin", "--json"])
    assert {"client": "cli-client", "revoked": None}.items() <= next(
        c for c in json.loads(listed.stdout) if c["client"] == "cli-client").items()

    ok = _post(client, in_domain_rows[:2], headers={"Authorization": f"Bearer {token}"}, sensor_id=ORIGIN_SENSOR)
    assert ok.status_code == 200

    revoked = runner.invoke(main, ["serve", "token", "revoke", "--site", "origin", "--client", "cli-client"])
    assert revoked.exit_code == 0, revoked.output
    before = len(_actions(paths, "serving.auth_denied"))
    store.clear()
    refused = _post(client, in_domain_rows[:2], headers={"Authorization": f"Bearer {token}"}, sensor_id=ORIGIN_SENSOR)
    assert refused.status_code == 401  # the running service reloaded the registry: no restart needed
    assert refused.json()["detail"] == "the token of client cli-client was revoked"
    denied = _actions(paths, "serving.auth_denied")
    assert len(denied) == before + 1 and denied[-1]["actor"] == "client:cli-client"
    assert denied[-1]["details"]["reason"] == "revoked"
    assert store.count() == 0

    again = runner.invoke(main, ["serve", "token", "revoke", "--site", "origin", "--client", "cli-client"])
    assert again.exit_code == 1 and "already revoked" in again.output
    assert [e["details"]["client"] for e in audit.entries(paths)
            if e["action"] in ("serving.client_added", "serving.client_revoked")][-2:] == ["cli-client"] * 2


@pytest.mark.parametrize("name", ["../evil", "Admin", "a", "x" * 33, "client name", "-lead", "évil"])
def test_token_add_refuses_a_bad_client_name(origin, monkeypatch, name):
    from pipelines.cli import main
    from pipelines.serving.clients import list_clients

    monkeypatch.setenv("FACTORY_HOME", str(origin[0].home))
    result = CliRunner().invoke(main, ["serve", "token", "add", "--site", "origin", "--client", name])
    assert result.exit_code == 1
    assert "is not allowed: 2-32 characters, lowercase letters, digits and '-'" in result.output
    assert name not in [c["client"] for c in list_clients(origin[0])]


def test_token_add_refuses_a_second_active_token_for_one_client(origin, monkeypatch):
    from pipelines.cli import main

    monkeypatch.setenv("FACTORY_HOME", str(origin[0].home))
    result = CliRunner().invoke(main, ["serve", "token", "add", "--site", "origin", "--client", "test-client"])
    assert result.exit_code == 1 and "already holds an active token; revoke it first" in result.output


@contextlib.contextmanager
def _registry_moved(paths):
    from pipelines.fileio import write_atomic
    from pipelines.serving.clients import registry_path

    path = registry_path(paths)
    saved = path.read_bytes()
    path.unlink()
    try:
        yield path
    finally:
        write_atomic(path, saved, 0o600)


def test_service_refuses_to_start_without_a_client(origin, monkeypatch):
    from pipelines.cli import main
    from pipelines.serving.app import ServingError, create_app

    paths, _ = origin
    monkeypatch.setenv("FACTORY_HOME", str(paths.home))
    with _registry_moved(paths):
        with pytest.raises(ServingError, match="no client may call the service of origin.*factory serve token add"):
            create_app(*origin)
        result = CliRunner().invoke(main, ["serve", "--site", "origin", "--model", "digits-cnn-m4/1"])
    assert result.exit_code == 1 and "no client may call the service of origin" in result.output


def test_registry_open_to_other_users_refuses_start_and_requests(origin, client, in_domain_rows):
    from pipelines.serving.app import ServingError, create_app
    from pipelines.serving.clients import registry_path

    path = registry_path(origin[0])
    path.chmod(0o644)
    try:
        with pytest.raises(ServingError, match=r"is open to other users \(mode 644\)"):
            create_app(*origin)
        response = _post(client, in_domain_rows[:2], sensor_id=ORIGIN_SENSOR)
        assert response.status_code == 503  # fails closed: no client is accepted
    finally:
        path.chmod(0o600)
    assert _post(client, in_domain_rows[:2], sensor_id=ORIGIN_SENSOR).status_code == 200


def test_no_auth_only_on_loopback(origin, monkeypatch):
    from pipelines.cli import main

    monkeypatch.setenv("FACTORY_HOME", str(origin[0].home))
    result = CliRunner().invoke(main, ["serve", "--site", "origin", "--no-auth", "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "--no-auth serves only on a loopback address" in result.output


def test_without_auth_every_caller_is_recorded_as_anonymous(origin, conf_with, in_domain_rows):
    from fastapi.testclient import TestClient

    from pipelines.serving.app import create_app

    with TestClient(create_app(*origin, conf=conf_with(), auth=False)) as anonymous:
        body = _post(anonymous, in_domain_rows[:2], sensor_id="UNKNOWN-SENSOR").json()
    entry = _actions(origin[0], "odd.breach")[-1]
    assert entry["details"]["request_id"] == body["request_id"] and entry["actor"] == "client:anonymous"


def test_auth_failures_are_audited_at_a_bounded_rate_and_summarised(service, origin):
    paths = origin[0]
    before = len(_actions(paths, "serving.auth_denied"))
    with service(client_headers={"Authorization": "Bearer fsv_" + "B" * 43}, audit={"auth_failures": 3}) as attacker:
        for _ in range(25):
            assert attacker.get("/metrics").status_code == 401
        metrics = attacker.app.state.metrics.render(None)
        assert len(_actions(paths, "serving.auth_denied")) == before + 3
    assert _metric(metrics, "factory_serving_auth_failures_total", reason="unknown") == 25
    assert _metric(metrics, "factory_serving_audit_suppressed_total", event="serving.auth_denied",
                   key="unauthenticated") == 22
    summary = _actions(paths, "serving.audit_suppressed")[-1]  # written when the service stopped
    assert summary["details"] == {**summary["details"], "event": "serving.auth_denied", "key": "unauthenticated",
                                  "count": 22}


# ------------------------------------------------------------------ request size


def test_a_15_mb_body_is_refused_before_it_is_parsed(client, anonymous, origin, store):
    paths = origin[0]
    body = b'{"inputs": [[' + b"0.5, " * (3 * 1024 * 1024) + b"0.5]]}"
    assert len(body) > 15_000_000
    before = client.get("/metrics").text
    size = _audit_size(paths)
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["detail"] == f"request body of {len(body)} bytes exceeds the limit of {MAX_BODY} bytes"
    assert response.headers["connection"] == "close"
    after = client.get("/metrics").text
    assert _metric(after, "factory_serving_requests_total", outcome="too_large") == _metric(
        before, "factory_serving_requests_total", outcome="too_large") + 1
    # the parser never saw it: a parsed body would count as ok, invalid or odd_breach
    for outcome in ("ok", "invalid", "odd_breach"):
        assert _metric(after, "factory_serving_requests_total", outcome=outcome) == _metric(
            before, "factory_serving_requests_total", outcome=outcome)
    assert anonymous.post("/predict", content=body).status_code == 401  # and a stranger is refused first
    assert store.count() == 0 and _audit_size(paths) - size < 2000  # at most the one auth_denied entry


def _asgi_call(app, path, headers, body_size, piece=64 * 1024):
    """POST a chunked body (no Content-Length) of `body_size` bytes straight to the ASGI app; returns
    (status, response body, bytes the app pulled from the connection)."""
    pulled = 0
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        if pulled >= body_size:
            return {"type": "http.disconnect"}
        chunk = (b'{"inputs": [[' if pulled == 0 else b"") + b"0.5, " * (piece // 5)
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": pulled < body_size}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"transfer-encoding", b"chunked"), *headers],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


def test_a_chunked_15_mb_body_is_cut_off_at_the_limit(app, tokens, store):
    auth = [(b"authorization", f"Bearer {tokens['test-client']}".encode())]
    status, body, pulled = _asgi_call(app, "/predict", auth, 15 * 1024 * 1024)
    assert status == 413
    assert body["detail"] == f"request body of more than {MAX_BODY} bytes exceeds the limit of {MAX_BODY} bytes"
    assert MAX_BODY < pulled <= MAX_BODY + 64 * 1024  # reading stopped one chunk past the limit
    assert store.count() == 0

    status, _, pulled = _asgi_call(app, "/predict", [], 15 * 1024 * 1024)
    assert status == 401 and pulled == 0  # an unauthenticated body is not read at all


def test_a_chunked_15_mb_body_over_a_real_socket_gets_413(app, tokens):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    sent = 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n"
                         + f"Authorization: Bearer {tokens['test-client']}\r\n\r\n".encode())
            piece = b"0.5, " * 13107
            chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            with contextlib.suppress(OSError):  # the server closes the connection after its answer
                while sent < 15 * 1024 * 1024:
                    conn.sendall(chunk)
                    sent += len(piece)
            answer = b""
            with contextlib.suppress(OSError):
                while chunk_in := conn.recv(65536):
                    answer += chunk_in
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"exceeds the limit of 1048576 bytes" in answer


# ------------------------------------------------------------------ context fields


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"sensor_id": "A" * 100_000}, "context.sensor_id: String should match pattern"),
        ({"sensor_id": "ORG-SN-0003\n{\"forged\": 1}"}, "context.sensor_id: String should match pattern"),
        ({"sensor_id": {"nested": {"deep": 1}}}, "context.sensor_id: Input should be a valid string"),
        ({"sensor_id": 3}, "context.sensor_id: Input should be a valid string"),
        ({"note": "x"}, "context.note: Extra inputs are not permitted"),
        ({f"k{i}": i for i in range(1000)}, "Extra inputs are not permitted"),
        ({"location": "Brussels"}, "context.location: Input should be a valid dictionary"),
        ({"location": {"lat": 1000.0, "lon": 4.35}}, "context.location.lat: Input should be less than or equal to 90"),
        ({"location": {"lat": 50.8, "lon": 4.35, "alt": [1] * 1000}}, "context.location.alt: Extra inputs"),
        ({"latency_budget_ms": "fast"}, "context.latency_budget_ms: Input should be a valid number"),
        ({"latency_budget_ms": True}, "context.latency_budget_ms: Input should be a valid number"),
    ],
)
def test_unbounded_context_fields_are_refused(client, origin, store, in_domain_rows, context, message):
    size = _audit_size(origin[0])
    response = client.post("/predict", json={"inputs": in_domain_rows[:2].tolist(), "context": context})
    assert response.status_code == 422
    assert message in response.json()["detail"]
    assert len(response.text) < 2000  # the answer does not echo the field back
    assert store.count() == 0 and _audit_size(origin[0]) == size


def test_twenty_requests_with_huge_contexts_leave_the_audit_log_as_it_was(client, origin, store, in_domain_rows):
    paths = origin[0]
    rows = in_domain_rows[:2].tolist()
    size = _audit_size(paths)
    huge = [{"sensor_id": "S" * 900_000}, {"blob": "x" * 900_000},
            {"location": {"lat": 1.0, "lon": 1.0, "x": "y" * 900_000}}, {f"k{i}": "v" * 80 for i in range(10_000)}]
    for i in range(20):
        response = client.post("/predict", json={"inputs": rows, "context": huge[i % len(huge)]})
        assert response.status_code in (413, 422), response.text[:200]
    assert _audit_size(paths) == size and store.count() == 0


def test_twenty_breaching_requests_with_the_largest_valid_context_write_bounded_entries(service, origin, store,
                                                                                         in_domain_rows):
    paths = origin[0]
    size = _audit_size(paths)
    context = {"sensor_id": "Z" * 64, "location": {"lat": -89.999999999, "lon": 179.99999999},
               "latency_budget_ms": 1.0}
    with service() as client:
        for _ in range(20):
            body = _post(client, in_domain_rows[:2], **context).json()
            assert body["odd"]["mode"] == "withhold"
    written = _audit_size(paths) - size
    entries = [e for e in audit.entries(paths) if e["action"] in ("odd.breach", "serving.audit_suppressed")]
    assert written <= 11 * 2048, written  # 10 breaches (the default rate) and one summary, each under 2 KiB
    assert entries[-1]["action"] == "serving.audit_suppressed" and entries[-1]["details"]["count"] == 10
    assert store.count() == 0


# ------------------------------------------------------------------ forced ODD breaches


@pytest.mark.parametrize("budget", ["-1", "0", "0.5", "1e9", "NaN", "Infinity"])
def test_a_client_cannot_force_a_latency_breach(client, origin, store, in_domain_rows, budget):
    paths = origin[0]
    breaches = len(_actions(paths, "odd.breach"))
    rows = json.dumps(in_domain_rows[:2].tolist())
    body = f'{{"inputs": {rows}, "context": {{"sensor_id": "{ORIGIN_SENSOR}", "latency_budget_ms": {budget}}}}}'
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert ("is outside the range a client may ask for, [1.0, 60000.0] ms" in detail
            or "context.latency_budget_ms: Input should be a finite number" in detail), detail
    assert len(_actions(paths, "odd.breach")) == breaches and store.count() == 0


def test_breach_auditing_is_rate_limited_per_client_and_summarised(service, origin, second_client, store,
                                                                   in_domain_rows):
    paths = origin[0]
    before = len(_actions(paths, "odd.breach"))
    with service(audit={"breaches_per_client": 3}) as client:
        for _ in range(12):
            assert _post(client, in_domain_rows[:2], sensor_id="DST-SN-0001").json()["odd"]["mode"] == "withhold"
        for _ in range(4):
            response = _post(client, in_domain_rows[:2], headers=second_client, sensor_id="DST-SN-0001")
            assert response.json()["predictions"] is None  # every request still gets the safe-mode answer
        metrics = client.get("/metrics").text
        breaches = _actions(paths, "odd.breach")[before:]
    assert sorted(e["actor"] for e in breaches) == ["client:second-client"] * 3 + ["client:test-client"] * 3
    assert all(e["details"]["client"] == e["actor"].removeprefix("client:") for e in breaches)
    assert _metric(metrics, "factory_serving_odd_breaches_total", mode="withhold") == 16
    assert _metric(metrics, "factory_serving_audit_suppressed_total", event="odd.breach", key="test-client") == 9
    assert _metric(metrics, "factory_serving_audit_suppressed_total", event="odd.breach", key="second-client") == 1
    summaries = {e["details"]["key"]: e["details"]["count"] for e in _actions(paths, "serving.audit_suppressed")[-2:]}
    assert summaries == {"test-client": 9, "second-client": 1}
    assert store.count() == 0


def test_a_summary_is_written_when_the_window_ends(service, origin, in_domain_rows):
    paths = origin[0]
    before = len(list(audit.entries(paths)))
    with service(audit={"breaches_per_client": 1, "window_s": 0.5}) as client:
        for _ in range(3):
            _post(client, in_domain_rows[:2], sensor_id="DST-SN-0001")
        time.sleep(0.6)
        _post(client, in_domain_rows[:2], sensor_id="DST-SN-0001")
        written = [(e["action"], e["details"].get("count")) for e in list(audit.entries(paths))[before:]]
    assert written == [("odd.breach", None), ("serving.audit_suppressed", 2), ("odd.breach", None)]
    audit.verify(paths)


# ------------------------------------------------------------------ drift store


@pytest.mark.parametrize(
    "context",
    [{"sensor_id": "DST-SN-0001"}, {}, {"sensor_id": ORIGIN_SENSOR, "location": {"lat": 59.33, "lon": 18.07}}],
    ids=["unapproved-sensor", "no-sensor", "outside-geofence"],
)
def test_inputs_outside_the_odd_never_reach_the_drift_store(client, store, in_domain_rows, context):
    rotated = np.clip(in_domain_rows[:32][:, ::-1], 0, 1)  # what a poisoner would feed the drift window
    body = _post(client, rotated, **context).json()
    assert body["odd"]["allow"] is False and body["predictions"] is None
    assert store.count() == 0
    assert _post(client, in_domain_rows[:4], sensor_id=ORIGIN_SENSOR).json()["odd"]["allow"] is True
    assert store.count() == 4  # allowed inputs are still stored

