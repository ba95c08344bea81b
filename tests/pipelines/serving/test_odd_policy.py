"""The ODD Rego tests (policies/odd/odd_test.rego), run with the embedded engine, and the shipped data."""

from __future__ import annotations

import re

import pytest

from pipelines.config import PROJECT_ROOT

ODD = PROJECT_ROOT / "policies" / "odd"
TESTS = re.findall(r"^(test_\w+) if", (ODD / "odd_test.rego").read_text(), re.M)


@pytest.fixture(scope="module")
def engine():
    import json

    import regorus

    from pipelines.policy.bundle import load_bundle

    e = regorus.Engine()
    e.add_data_json(json.dumps(load_bundle().data))
    for name in ("odd.rego", "odd_test.rego"):
        e.add_policy_from_file(str(ODD / name))
    return e


@pytest.mark.parametrize("name", TESTS)
def test_odd_rego(engine, name):
    assert engine.eval_rule(f"data.factory.odd_test.{name}") is True


def test_gate_fails_closed_on_engine_error(tmp_path, monkeypatch):
    from pipelines.serving.odd import OddGate

    (tmp_path / "odd").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "odd" / "odd.rego").write_text("package factory.other\n")
    gate = OddGate()  # started on the project's policies
    monkeypatch.setenv("FACTORY_POLICIES", str(tmp_path))  # then a bundle with no ODD decision rule
    decision = gate.decide({"site": "origin"})
    assert decision.allow is False and decision.mode == "withhold"
    assert decision.reasons
    with pytest.raises(RuntimeError, match="ODD policy cannot decide: unknown gate 'odd'"):
        OddGate()  # a service does not start on it
