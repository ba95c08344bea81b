"""Embedded and OPA-server engines: same decisions, fail closed, audit records."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

import pipelines.policy as policy
from pipelines.policy import evaluate
from pipelines.policy.bundle import load_bundle
from pipelines.policy.testing import captured_inputs

INPUTS = captured_inputs()


@pytest.fixture
def opa_env(monkeypatch, fake_opa):
    monkeypatch.setenv("FACTORY_OPA_URL", fake_opa.url)
    monkeypatch.setenv("FACTORY_OPA_TIMEOUT", "0.5")
    return fake_opa


def test_capture_holds_inputs_of_every_gate():
    gates = {gate for gate, _ in INPUTS}
    assert gates == {"data_access", "data_release", "model_release", "approval"}
    assert len(INPUTS) > 60


def test_export_input_is_allowed_embedded(embedded, allowed_export):
    decision = evaluate("model_release", allowed_export)
    assert decision.allow and decision.reasons == () and decision.engine == "regorus"
    assert decision.bundle_digest == load_bundle().digest and decision.input_digest.startswith("sha256:")


def test_engine_parity_on_every_rego_test_input(monkeypatch, fake_opa):
    monkeypatch.delenv("FACTORY_OPA_URL", raising=False)
    embedded = [evaluate(gate, document) for gate, document in INPUTS]
    monkeypatch.setenv("FACTORY_OPA_URL", fake_opa.url)
    served = [evaluate(gate, document) for gate, document in INPUTS]
    assert fake_opa.requests == len(INPUTS)
    for (gate, document), a, b in zip(INPUTS, embedded, served, strict=True):
        assert b.engine == "opa" and a.engine == "regorus"
        assert (a.allow, a.reasons) == (b.allow, b.reasons), (gate, document)
        assert a.input_digest == b.input_digest
    assert any(d.allow for d in embedded) and not all(d.allow for d in embedded)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_engine_parity_against_real_opa_server(monkeypatch):
    opa = shutil.which("opa")
    if not opa:
        pytest.skip("no `opa` binary on PATH (it cannot be installed here); the fake Data API server covers this path")
    port = _free_port()
    process = subprocess.Popen([opa, "run", "--server", "--addr", f"127.0.0.1:{port}", str(load_bundle().root)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        monkeypatch.delenv("FACTORY_OPA_URL", raising=False)
        embedded = [evaluate(gate, document) for gate, document in INPUTS]
        monkeypatch.setenv("FACTORY_OPA_URL", f"http://127.0.0.1:{port}")
        served = [evaluate(gate, document) for gate, document in INPUTS]
        for a, b in zip(embedded, served, strict=True):
            assert (a.allow, a.reasons) == (b.allow, b.reasons)
    finally:
        process.terminate()
        process.wait(10)


def test_server_down_denies(monkeypatch, allowed_export):
    monkeypatch.setenv("FACTORY_OPA_URL", f"http://127.0.0.1:{_free_port()}")
    decision = evaluate("model_release", allowed_export)
    assert not decision.allow and decision.engine == "opa"
    assert "unreachable (fail closed)" in decision.reasons[0]


def test_http_500_denies(opa_env, allowed_export):
    opa_env.mode = "error"
    decision = evaluate("model_release", allowed_export)
    assert not decision.allow
    assert "answered HTTP 500 (fail closed)" in decision.reasons[0] and "boom" in decision.reasons[0]


def test_timeout_denies(opa_env, allowed_export):
    opa_env.mode, opa_env.delay = "slow", 1.5
    started = time.monotonic()
    decision = evaluate("model_release", allowed_export)
    assert time.monotonic() - started < 1.4
    assert not decision.allow and "did not answer within 0.5 s (fail closed)" in decision.reasons[0]


def test_garbage_body_denies(opa_env, allowed_export):
    opa_env.mode = "garbage"
    decision = evaluate("model_release", allowed_export)
    assert not decision.allow and "malformed answer (fail closed)" in decision.reasons[0]


def test_missing_result_denies(opa_env, allowed_export):
    opa_env.mode = "no_result"
    decision = evaluate("model_release", allowed_export)
    assert not decision.allow and "has no decision for gate model_release" in decision.reasons[0]


def test_malformed_decision_document_denies(monkeypatch, opa_env, allowed_export):
    # a server whose policy answers something else than {"allow": bool, "reasons": [str]}
    monkeypatch.setattr(opa_env, "engine", type("E", (), {
        "set_input_json": lambda self, _: None, "eval_rule": lambda self, _: {"allow": "yes"}})())
    decision = evaluate("model_release", allowed_export)
    assert not decision.allow and "malformed decision" in decision.reasons[0]


def test_bad_url_denies(monkeypatch):
    monkeypatch.setenv("FACTORY_OPA_URL", "opa-without-scheme")
    decision = evaluate("data_access", {})
    assert not decision.allow and "is not an http(s)://host:port URL" in decision.reasons[0]


def test_unknown_gate_denies(embedded):
    decision = evaluate("nuclear_launch", {})
    assert not decision.allow and "unknown gate 'nuclear_launch'" in decision.reasons[0]


def test_non_json_input_denies(embedded):
    decision = evaluate("data_access", {"when": object()})
    assert not decision.allow and "not JSON" in decision.reasons[0]


def test_engine_error_denies(embedded, monkeypatch):
    engine = policy.engine_for(load_bundle())

    class Broken:
        def set_input_json(self, _):
            raise RuntimeError("error: exploded\n--> x.rego:1:1\nStack backtrace:\n 0: frames")

    monkeypatch.setattr(engine, "engine", lambda: Broken())
    decision = evaluate("data_access", {})
    assert not decision.allow
    assert decision.reasons == ("policy engine error in gate data_access: error: exploded --> x.rego:1:1",)


def test_missing_policy_folder_denies(embedded, monkeypatch, tmp_path):
    monkeypatch.setenv("FACTORY_POLICIES", str(tmp_path / "nowhere"))
    decision = evaluate("data_access", {})
    assert not decision.allow and "does not exist" in decision.reasons[0]


def test_threads_each_get_an_engine(embedded, allowed_export):
    """regorus engines are bound to their thread: concurrent gate calls give the single-thread decisions."""
    from concurrent.futures import ThreadPoolExecutor

    denied = dict(allowed_export, approvals=[])
    documents = [allowed_export if i % 2 else denied for i in range(16)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda document: evaluate("model_release", document), documents))
    assert [(d.allow, d.reasons) for d in results[1::2]] == [(True, ())] * 8
    assert [d.allow for d in results[::2]] == [False] * 8
    assert {d.reasons for d in results[::2]} == {(
        "no approval by a compliance_officer of origin (data owner in the lineage) other than the requester "
        "supplier_engineer",
        "no approval by an export_control_officer of supplier other than the requester supplier_engineer",
    )}


def test_decision_is_written_to_the_site_audit_log(embedded, tmp_path, monkeypatch, allowed_export):
    from pipelines.trust import audit, keys
    from pipelines.workspace import SitePaths

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path))
    paths = SitePaths.of("supplier", tmp_path)
    keys.ensure_site_keys(paths)
    denied = dict(allowed_export, approvals=[])
    allowed = evaluate("model_release", allowed_export, site="supplier", home=tmp_path)
    refused = evaluate("model_release", denied, site="supplier", home=tmp_path, actor="supplier_engineer")
    assert allowed.allow and not refused.allow
    entries = [e for e in audit.entries(paths) if e["action"] == "policy.decision"]
    assert [e["outcome"] for e in entries] == ["allow", "deny"]
    assert entries[0]["actor"] == "svc-supplier" and entries[1]["actor"] == "supplier_engineer"
    assert entries[1]["object"] == "model_release"
    assert entries[1]["details"]["input_digest"] == refused.input_digest
    assert entries[1]["details"]["bundle_digest"] == load_bundle().digest
    assert entries[1]["details"]["reasons"] == list(refused.reasons)
    audit.verify(paths)


def test_unrecordable_decision_is_a_denial(embedded, tmp_path, allowed_export):
    # no keys at this site: the audit log cannot be signed, so nothing may be allowed
    decision = evaluate("model_release", allowed_export, site="supplier", home=tmp_path)
    assert not decision.allow
    assert "could not be written to the audit log of supplier" in decision.reasons[-1]
