"""Embedded and OPA-server engines: same decisions, fail closed, audit records."""

from __future__ import annotations

import copy
import json
import shutil
import socket
import subprocess
import time

import pytest

import pipelines.policy as policy
from pipelines.policy import evaluate
from pipelines.policy.bundle import load_bundle
from pipelines.policy.engines import first_line, new_regorus
from pipelines.policy.testing import captured_inputs

INPUTS = captured_inputs()
IDS = [f"{gate}-{i}" for i, (gate, _) in enumerate(INPUTS)]

EXPORT = {
    "model": {
        "id": "digits-cnn-export/3", "site": "supplier", "metrics": {"supplier_test": 0.93},
        "watermark": {"verified": True}, "signature": {"verified": True},
        "lineage": [
            {"dataset_id": "supplier/train@1", "owner": "supplier", "local_only": False,
             "export_authorized": True, "releasable_to": ["origin", "destination"]},
            {"dataset_id": "origin/export_authorized@1", "owner": "origin", "local_only": False,
             "export_authorized": True, "releasable_to": ["supplier", "destination"]},
        ],
    },
    "recipient": "destination", "purpose": "export", "requested_by": "supplier_engineer",
    "approvals": [
        {"user": "origin_officer", "site": "origin", "roles": ["compliance_officer"], "decision": "approve"},
        {"user": "supplier_export_officer", "site": "supplier", "roles": ["export_control_officer"],
         "decision": "approve"},
    ],
}


@pytest.fixture
def opa_env(monkeypatch, fake_opa):
    monkeypatch.setenv("FACTORY_OPA_URL", fake_opa.url)
    monkeypatch.setenv("FACTORY_OPA_TIMEOUT", "0.5")
    return fake_opa


def test_capture_holds_inputs_of_every_gate():
    gates = {gate for gate, _ in INPUTS}
    assert gates == {"data_access", "data_release", "model_release", "approval"}
    assert len(INPUTS) > 60


def test_export_input_is_allowed_embedded(embedded):
    decision = evaluate("model_release", EXPORT)
    assert decision.allow and decision.reasons == () and decision.engine == "regorus"
    assert decision.bundle_digest == load_bundle().digest and decision.input_digest.startswith("sha256:")


@pytest.mark.parametrize(("gate", "document"), INPUTS, ids=IDS)
def test_denials_always_explain_and_agree_with_deny_rules(gate, document):
    """The fast path of `decision` and the `deny` reasons never disagree."""
    engine = new_regorus(load_bundle())
    engine.set_input_json(json.dumps(document))
    decision = engine.eval_rule(f"data.factory.{gate}.decision")
    deny = engine.eval_rule(f"data.factory.{gate}.deny") or set()
    assert decision["allow"] == (len(deny) == 0), (decision, deny)
    if not decision["allow"]:
        assert decision["reasons"] and decision["reasons"] == sorted(deny)


# Values of every JSON type, put in place of each field of an allowed input: the fast
# paths of the gates check types with comparisons across types, which these cases pin down.
REPLACEMENTS = [None, True, False, 0, -1, 0.95, 1e9, "", "x", "zzz", [], ["x"], [1, 2], {}, {"a": 1}]
DELETED = object()


def _variants(document, path=()):
    """(path, document with the value at path replaced or deleted) for every field of document."""
    items = document.items() if isinstance(document, dict) else enumerate(document) if isinstance(document, list) else ()
    for key, value in items:
        for replacement in (*REPLACEMENTS, DELETED):
            if replacement is DELETED and not isinstance(document, dict):
                continue
            changed = copy.deepcopy(document)
            if replacement is DELETED:
                del changed[key]
            else:
                changed[key] = replacement
            yield (*path, key), changed
        for sub_path, sub in _variants(value, (*path, key)):
            changed = copy.deepcopy(document)
            changed[key] = sub
            yield sub_path, changed


@pytest.mark.parametrize("gate", ["data_access", "data_release", "model_release", "approval"])
def test_fast_path_agrees_with_deny_rules_on_malformed_fields(gate):
    """Every field of an allowed input replaced by a value of each type, or deleted: the fast
    path allows exactly when the `deny` rules find nothing."""
    engine = new_regorus(load_bundle())
    allowed = []
    for g, document in INPUTS:
        engine.set_input_json(json.dumps(document))
        if g == gate and engine.eval_rule(f"data.factory.{gate}.decision")["allow"]:
            allowed.append(document)
    assert allowed, f"no allowed {gate} input among the Rego tests"
    checked, disagreements = 0, []
    for document in allowed[:3]:
        for path, variant in _variants(document):
            engine.set_input_json(json.dumps(variant))
            try:
                decision = engine.eval_rule(f"data.factory.{gate}.decision")
                deny = engine.eval_rule(f"data.factory.{gate}.deny") or set()
            except RuntimeError as error:  # regorus raises where OPA leaves a builtin's result undefined
                disagreements.append((".".join(map(str, path)), _value_at(variant, path), first_line(error)))
                continue
            if decision["allow"] != (len(deny) == 0):
                disagreements.append((".".join(map(str, path)), _value_at(variant, path), sorted(deny)))
            checked += 1
    assert checked > 100
    assert not disagreements, "\n".join(map(str, disagreements))


def _value_at(document, path):
    """The value at path in document, or '<deleted>' where the variant removed it."""
    for key in path:
        try:
            document = document[key]
        except (KeyError, IndexError, TypeError):
            return "<deleted>"
    return document


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


def test_server_down_denies(monkeypatch):
    monkeypatch.setenv("FACTORY_OPA_URL", f"http://127.0.0.1:{_free_port()}")
    decision = evaluate("model_release", EXPORT)
    assert not decision.allow and decision.engine == "opa"
    assert "unreachable (fail closed)" in decision.reasons[0]


def test_http_500_denies(opa_env):
    opa_env.mode = "error"
    decision = evaluate("model_release", EXPORT)
    assert not decision.allow
    assert "answered HTTP 500 (fail closed)" in decision.reasons[0] and "boom" in decision.reasons[0]


def test_timeout_denies(opa_env):
    opa_env.mode, opa_env.delay = "slow", 1.5
    started = time.monotonic()
    decision = evaluate("model_release", EXPORT)
    assert time.monotonic() - started < 1.4
    assert not decision.allow and "did not answer within 0.5 s (fail closed)" in decision.reasons[0]


def test_garbage_body_denies(opa_env):
    opa_env.mode = "garbage"
    decision = evaluate("model_release", EXPORT)
    assert not decision.allow and "malformed answer (fail closed)" in decision.reasons[0]


def test_missing_result_denies(opa_env):
    opa_env.mode = "no_result"
    decision = evaluate("model_release", EXPORT)
    assert not decision.allow and "has no decision for gate model_release" in decision.reasons[0]


def test_malformed_decision_document_denies(monkeypatch, opa_env):
    # a server whose policy answers something else than {"allow": bool, "reasons": [str]}
    monkeypatch.setattr(opa_env, "engine", type("E", (), {
        "set_input_json": lambda self, _: None, "eval_rule": lambda self, _: {"allow": "yes"}})())
    decision = evaluate("model_release", EXPORT)
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


def test_threads_each_get_an_engine(embedded):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: evaluate("model_release", EXPORT).allow, range(16)))
    assert all(results)


def test_allowed_approvers_follow_the_approval_policy(embedded):
    export = [u.id for u in policy.allowed_approvers("stage_5_export", "supplier", "export_control_officer")]
    assert export == ["supplier_export_officer"]
    origin = [u.id for u in policy.allowed_approvers("stage_2_data_release", "origin", "compliance_officer")]
    assert origin == ["origin_officer"]
    assert policy.allowed_approvers("stage_2_data_release", "origin", "compliance_officer",
                                    requested_by="origin_officer") == []
    assert policy.allowed_approvers("x", "origin", "engineer") == []


def test_decision_is_written_to_the_site_audit_log(embedded, tmp_path, monkeypatch):
    from pipelines.trust import audit, keys
    from pipelines.workspace import SitePaths

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path))
    paths = SitePaths.of("supplier", tmp_path)
    keys.ensure_site_keys(paths)
    denied = dict(EXPORT, approvals=[])
    allowed = evaluate("model_release", EXPORT, site="supplier", home=tmp_path)
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


def test_unrecordable_decision_is_a_denial(embedded, tmp_path):
    # no keys at this site: the audit log cannot be signed, so nothing may be allowed
    decision = evaluate("model_release", EXPORT, site="supplier", home=tmp_path)
    assert not decision.allow
    assert "could not be written to the audit log of supplier" in decision.reasons[-1]
