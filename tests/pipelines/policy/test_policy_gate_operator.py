"""PolicyGateOperator: builds the input, evaluates, records, fails with the reasons on denial."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from factory_plugin.policy_gate import PolicyGateOperator


def test_allowed_gate_returns_the_decision_record(allowed_approval):
    op = PolicyGateOperator(task_id="gate", gate="approval", input_builder=allowed_approval)
    record = op.execute({})
    assert record["allow"] is True and record["reasons"] == [] and record["gate"] == "approval"
    assert record["input_digest"].startswith("sha256:") and record["engine"] == "regorus"


def test_input_builder_callable_reads_the_context(allowed_approval):
    seen = {}

    def build(context):
        seen.update(context)
        return dict(allowed_approval, requested_by=context["requester"])

    op = PolicyGateOperator(task_id="gate", gate="approval", input_builder=build)
    with pytest.raises(AirflowFailException, match="may not answer their own request"):
        op.execute({"requester": "origin_officer"})
    assert seen["requester"] == "origin_officer"


def test_denial_fails_without_retry_naming_the_reasons():
    op = PolicyGateOperator(task_id="gate", gate="data_access", input_builder={})
    with pytest.raises(AirflowFailException, match="policy gate data_access denied: .*subject.clearance is missing"):
        op.execute({})


def test_undecided_gate_raises_a_retryable_error(allowed_approval, monkeypatch):
    monkeypatch.setenv("FACTORY_OPA_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    op = PolicyGateOperator(task_id="gate", gate="approval", input_builder=allowed_approval)
    with pytest.raises(AirflowException, match="unreachable") as caught:
        op.execute({})
    assert not isinstance(caught.value, AirflowFailException)


def test_decision_is_audited_at_the_site(allowed_approval, tmp_path, monkeypatch):
    from pipelines.trust import audit, keys
    from pipelines.workspace import SitePaths

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path))
    paths = SitePaths.of("origin", tmp_path)
    keys.ensure_site_keys(paths)
    PolicyGateOperator(task_id="gate", gate="approval", input_builder=allowed_approval, site="origin").execute({})
    [entry] = [e for e in audit.entries(paths) if e["action"] == "policy.decision"]
    assert entry["object"] == "approval" and entry["outcome"] == "allow"


def test_rejects_an_input_builder_of_the_wrong_type():
    with pytest.raises(TypeError):
        PolicyGateOperator(task_id="gate", gate="approval", input_builder="not a dict")


def test_module_imports_without_loading_the_policy_engine():
    code = ("import sys; sys.path.insert(0, 'plugins'); import factory_plugin.policy_gate; "
            "assert 'pipelines.policy' not in sys.modules and 'regorus' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=importlib.import_module("pipelines").__path__[0] + "/..")
