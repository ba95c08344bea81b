"""`factory policy eval` exit codes and `factory policy test`."""

from __future__ import annotations

import json

from click.testing import CliRunner

from pipelines.policy.cli import policy


def run(*args, input=None):
    return CliRunner().invoke(policy, list(args), input=input)


def test_eval_allowed_exits_0(allowed_approval, tmp_path):
    path = tmp_path / "in.json"
    path.write_text(json.dumps(allowed_approval))
    result = run("eval", "--gate", "approval", "--input", str(path))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"allow": True, "reasons": []}


def test_eval_denied_exits_1_with_reasons_from_stdin(allowed_approval):
    result = run("eval", "--gate", "approval", "--input", "-", input=json.dumps(dict(allowed_approval, requested_by="origin_officer")))
    assert result.exit_code == 1
    decision = json.loads(result.stdout)
    assert decision["allow"] is False
    assert decision["reasons"] == ["user origin_officer requested stage_2_data_release and may not answer their own request"]


def test_eval_missing_field_denies_with_exit_1():
    result = run("eval", "--gate", "data_access", "--input", "-", input="{}")
    assert result.exit_code == 1
    assert "required field subject.clearance is missing" in json.loads(result.stdout)["reasons"]


def test_eval_bad_json_exits_2():
    result = run("eval", "--gate", "approval", "--input", "-", input="{not json")
    assert result.exit_code == 2 and "is not JSON" in result.output


def test_eval_unreadable_file_exits_2(tmp_path):
    result = run("eval", "--gate", "approval", "--input", str(tmp_path / "missing.json"))
    assert result.exit_code == 2


def test_eval_unknown_gate_exits_2():
    result = run("eval", "--gate", "teleport", "--input", "-", input="{}")
    assert result.exit_code == 2 and "unknown gate 'teleport'" in result.output


def test_eval_without_gate_exits_2():
    assert run("eval", "--input", "-", input="{}").exit_code == 2


def test_policy_test_reports_every_rule_and_coverage():
    result = run("test", "--coverage", "--min-coverage", "90")
    assert result.exit_code == 0, result.output
    assert "PASS model_release/model_release_test.rego::test_denies_unverified_watermark" in result.output
    assert "failed" in result.output and " 0 failed" in result.output
    assert "model_release/model_release.rego: " in result.output


def test_policy_test_fails_on_a_failing_rule(tmp_path, monkeypatch):
    import shutil

    from pipelines.policy.bundle import load_bundle

    root = tmp_path / "policies"
    shutil.copytree(load_bundle().root, root)
    (root / "approval" / "broken_test.rego").write_text(
        "package factory.broken_test\nimport rego.v1\n"
        "test_wrongly_expects_allow if { data.factory.approval.decision.allow with input as {} }\n")
    monkeypatch.setenv("FACTORY_POLICIES", str(root))
    result = run("test")
    assert result.exit_code == 1
    assert "FAIL approval/broken_test.rego::test_wrongly_expects_allow  (undefined)" in result.output
