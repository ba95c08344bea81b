"""The Rego tests of policies/, one pytest case per test rule, and the coverage bar of each policy file."""

from __future__ import annotations

import pytest

from pipelines.policy.bundle import load_bundle
from pipelines.policy.testing import TestRunner, discover

TESTS = discover(load_bundle())


@pytest.fixture(scope="module")
def runner() -> TestRunner:
    return TestRunner(coverage=True)


def test_every_gate_has_rego_tests():
    bundle = load_bundle()
    tested = {test.path.split("/")[0] for test in TESTS}
    for gate in ("data_access", "data_release", "model_release", "approval", "helpers"):
        assert gate in tested, f"no *_test.rego for {gate}"
    assert {"data_access", "data_release", "model_release", "approval"} <= set(bundle.gates)


@pytest.mark.parametrize("test", TESTS, ids=[t.id for t in TESTS])
def test_rego(runner: TestRunner, test):
    result = runner.run(test)
    assert result.passed, f"{test.id}: {result.detail}"


def test_every_line_of_each_policy_file_is_covered():
    runner = TestRunner(coverage=True)
    for test in TESTS:
        runner.run(test)
    coverage = runner.coverage()
    for path, _ in load_bundle().modules:
        covered, total = coverage[path]
        assert total and covered == total, f"{path}: {covered}/{total} lines covered"


def test_both_outcomes_are_tested_for_each_gate():
    for gate in ("data_access", "data_release", "model_release", "approval"):
        names = [t.name for t in TESTS if t.path.startswith(f"{gate}/")]
        assert any(n.startswith("test_allows") for n in names), gate
        assert sum(n.startswith("test_denies") for n in names) >= 5, gate
