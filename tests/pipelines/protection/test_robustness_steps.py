"""Robustness through the steps, without Airflow: a short real M1 at the supplier is evaluated
(metadata, model card, MLflow), released (the sealed directory measured on the supplier's test set,
cached, logged to the model's run) and received by the origin, which measures it on its own test
set before adopting it (version tags, audit, intake record)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.learning import registry
from pipelines.protection.robustness import CACHE_FILE, mlflow_name, release_robustness
from pipelines.steps import StepContext, run_step
from pipelines.trust import audit
from pipelines.workspace import SitePaths

KEYS = {"clean", "fgsm@0.05", "fgsm@0.1", "pgd@0.05"}  # conf/protection.yaml robustness budgets


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    from pipelines.init import init_workspace

    home = tmp_path_factory.mktemp("factory")
    init_workspace(home)
    return home


def _ctx(home: Path, site: str) -> StepContext:
    return StepContext(site=site, paths=SitePaths.of(site, home), run_id="test-run", dag_id="test")


@pytest.fixture(scope="module")
def m1(home: Path) -> dict:
    ctx = _ctx(home, "supplier")
    trained = run_step("train_model", ctx, stage="M1", profile="local", datasets=["train"])
    evaluated = run_step("evaluate_model", ctx, trained=trained, test_sets={"supplier_test": "test"})
    exported = run_step("export_model", ctx, trained=evaluated, parity_set="test")
    return run_step("register_model", ctx, trained=exported)


def test_evaluation_records_robustness_in_metadata_model_card_and_mlflow(home, m1):
    ref = registry.resolve_model(_ctx(home, "supplier").paths, f"{m1['name']}/{m1['version']}")
    robustness = ref.metadata["robustness"]
    assert robustness["evaluated"] and set(robustness["accuracy"]) == KEYS
    assert robustness["test_set"] == "supplier_test" and 0 < robustness["budgets"]["samples"] <= 256
    accuracy = robustness["accuracy"]
    assert accuracy["pgd@0.05"] <= accuracy["fgsm@0.05"] + 0.02 and accuracy["fgsm@0.1"] <= accuracy["clean"]
    card = json.loads((ref.model_dir / "model_card.json").read_text())
    assert card["robustness"]["accuracy"] == accuracy
    run = registry.client(_ctx(home, "supplier").paths).get_run(ref.metadata["mlflow_run_id"])
    assert run.data.metrics[mlflow_name("fgsm@0.1")] == accuracy["fgsm@0.1"]


def test_release_measures_the_sealed_directory_once_per_digest(home, m1):
    supplier = _ctx(home, "supplier")
    ref = registry.resolve_model(supplier.paths, f"{m1['name']}/{m1['version']}")
    first = release_robustness(supplier, ref.model_dir, recipient="origin", purpose="collaboration")
    assert first["evaluated"] and set(first["accuracy"]) == KEYS and not first.get("cached")
    assert first["accuracy"] == ref.metadata["robustness"]["accuracy"]  # same model, same test set, same draw
    again = release_robustness(supplier, ref.model_dir, recipient="destination", purpose="export")
    assert again == {**first, "cached": True}
    assert len(json.loads((supplier.paths.state_dir / CACHE_FILE).read_text())) == 1
    history = registry.client(supplier.paths).get_metric_history(ref.metadata["mlflow_run_id"], mlflow_name("pgd@0.05"))
    assert [m.value for m in history][-1] == first["accuracy"]["pgd@0.05"]


def test_release_step_passes_robustness_to_the_gate(home, m1):
    supplier = _ctx(home, "supplier")
    run_step("release_model", supplier, model=m1, recipient="origin", purpose="collaboration", kind="m1")
    decisions = [e for e in audit.entries(supplier.paths) if e["action"] == "policy.decision"]
    assert decisions and decisions[-1]["outcome"] == "allow"
    assert (supplier.paths.state_dir / CACHE_FILE).is_file()


def test_received_model_is_evaluated_on_the_receivers_test_set_before_adoption(home, m1):
    from pipelines.carrier.media import hand_over

    supplier, origin = _ctx(home, "supplier"), _ctx(home, "origin")
    sent = run_step("release_model", supplier, model=m1, recipient="origin", purpose="collaboration", kind="m1")
    hand_over(supplier.paths, origin.paths)
    record = run_step("receive_model", origin, kind="m1", test_sets={"origin_test": "test"})
    assert record["package_id"] == sent["package_id"]
    robustness = record["robustness"]
    assert robustness["evaluated"] and robustness["test_set"] == "origin_test"
    assert robustness["dataset"].startswith("origin/") and set(robustness["accuracy"]) == KEYS
    ref = registry.resolve_model(origin.paths, f"{record['name']}/{record['version']}")
    assert float(ref.tags[f"factory.{mlflow_name('fgsm@0.1')}"]) == robustness["accuracy"]["fgsm@0.1"]
    logged = [e for e in audit.entries(origin.paths) if e["action"] == "model.robustness"]
    assert logged[-1]["object"] == ref.uri and logged[-1]["details"]["accuracy"] == robustness["accuracy"]
    # receiving again returns the recorded intake, robustness included, without measuring again
    assert run_step("receive_model", origin, kind="m1", test_sets={"origin_test": "test"}) == record


def test_report_shows_robustness_measured_where_each_test_set_lives(home, m1):
    from rich.console import Console

    from pipelines.report import build_report, render_robustness

    supplier, origin = _ctx(home, "supplier"), _ctx(home, "origin")
    if not any(e["action"] == "model.robustness" for e in audit.entries(origin.paths)):
        test_received_model_is_evaluated_on_the_receivers_test_set_before_adoption(home, m1)
    row = next(row for row in build_report(home)["stages"] if row["model"] == "M1")
    trained = registry.resolve_model(supplier.paths, f"{m1['name']}/{m1['version']}").metadata["robustness"]
    assert row["robustness"]["supplier"] == {k: v for k, v in trained["accuracy"].items() if k != "clean"}
    assert set(row["robustness"]["origin"]) == KEYS - {"clean"}
    console = Console(width=160, record=True)
    console.print(render_robustness({"stages": [row]}))
    text = console.export_text()
    assert "fgsm@0.1" in text and "origin" in text and f"{trained['accuracy']['pgd@0.05']:.4f}" in text
    assert render_robustness({"stages": [{**row, "robustness": {}}]}) is None
