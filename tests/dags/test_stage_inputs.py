"""The stages take their inputs from conf/stages.yaml `inputs:`, not from names in the DAG files:
each training, evaluation, parity, intake and release task carries the datasets the config names
(and others when the config names others), and a config whose inputs do not fit is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipelines.config import FactoryConfig, load_config, read_yaml

DAGS = Path(__file__).resolve().parents[2] / "dags"
CONF = Path(__file__).resolve().parents[2] / "conf"


def _dags(folder: Path = DAGS) -> dict:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(folder))
    assert not bag.import_errors, bag.import_errors
    return bag.dags


def _steps(dag, step: str) -> list[dict]:
    """The parameters of every task of `dag` that runs `step` (in-process step tasks: step, site, params)."""
    return [task.op_args[2] for task in dag.tasks if getattr(task, "op_args", ()) and task.op_args[0] == step]


def _trained_by(dags: dict, model: str):
    (dag,) = [d for d in dags.values() if any(p["stage"] == model for p in _steps(d, "train_model"))]
    return dag


def test_training_evaluation_and_parity_take_the_configured_inputs():
    inputs = load_config().stages.inputs
    dags = _dags()
    for stage in load_config().stages.order:
        if not stage.model:
            continue
        dag = _trained_by(dags, stage.model)
        expected = inputs.model(stage.model)
        (train,) = _steps(dag, "train_model")
        assert train["datasets"] == list(expected.datasets), dag.dag_id
        assert train["subset_datasets"] == (list(expected.subset_datasets) if expected.subset_datasets else None)
        (evaluate,) = _steps(dag, "evaluate_model")
        assert evaluate["test_sets"] == expected.test_sets, dag.dag_id
        (export,) = _steps(dag, "export_model")
        assert export["parity_set"] == expected.parity_set, dag.dag_id
        assert f"site:{stage.site}" in dag.tags


def test_intake_review_releases_and_the_base_evaluation_take_the_configured_inputs():
    inputs = load_config().stages.inputs
    dags = _dags()
    for dag in dags.values():
        site = next(t[5:] for t in dag.tags if t.startswith("site:"))
        for params in _steps(dag, "receive_model") + _steps(dag, "receive_review"):
            assert params["test_sets"] == inputs.received_test_sets(site), dag.dag_id
        stage = int(next(t[6:] for t in dag.tags if t.startswith("stage:")))
        for params in _steps(dag, "sanitize_dataset"):
            assert params["dataset"] == inputs.release(stage, site), dag.dag_id
    (base,) = _steps(dags["stage_8_reciprocal_contribution"], "evaluate_registered")
    assert base["test_sets"] == inputs.model("M8").base_test_sets


def test_other_inputs_in_the_config_change_the_dags(tmp_path: Path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    stages = yaml.safe_load((conf / "stages.yaml").read_text())
    stages["inputs"]["models"]["M3"]["datasets"] = ["origin-shared"]
    stages["inputs"]["models"]["M3"]["test_sets"] = {"supplier_test": "test", "supplier_holdout": "holdout"}
    stages["inputs"]["releases"][2]["dataset"] = "export_authorized"
    (conf / "stages.yaml").write_text(yaml.safe_dump(stages))
    monkeypatch.setenv("FACTORY_CONF", str(conf))
    dags = _dags()
    assert _steps(dags["stage_3_collaborative_optimization"], "train_model")[0]["datasets"] == ["origin-shared"]
    assert _steps(dags["stage_3_collaborative_optimization"], "evaluate_model")[0]["test_sets"] == {
        "supplier_test": "test", "supplier_holdout": "holdout"}
    assert _steps(dags["stage_2_sovereign_data_release"], "sanitize_dataset")[0]["dataset"] == "export_authorized"


def _config(**inputs_changes) -> FactoryConfig:
    stages = read_yaml("stages.yaml")
    for key, value in inputs_changes.items():
        stages["inputs"][key] = value
    sites, users = read_yaml("sites.yaml"), read_yaml("users.yaml")
    return FactoryConfig(sites=sites["sites"], users=users["users"], service_identities=users["service_identities"],
                         stages=stages)


def _models(**changes) -> dict:
    models = dict(read_yaml("stages.yaml")["inputs"]["models"])
    models.update(changes)
    return {k: v for k, v in models.items() if v is not None}


@pytest.mark.parametrize(("changes", "message"), [
    ({"models": _models(M4=None)}, "missing M4"),
    ({"models": _models(M2={"datasets": ["train"], "test_sets": {"t": "test"}, "parity_set": "test"})},
     "not in order: M2"),
    ({"models": _models(M1={"datasets": [], "test_sets": {"supplier_test": "test"}, "parity_set": "test"})},
     "at least 1 item"),
    ({"models": _models(M1={"datasets": ["../origin/private"], "test_sets": {"supplier_test": "test"},
                            "parity_set": "test"})}, "should match pattern"),
    ({"models": _models(M5={"datasets": ["train"], "subset_datasets": ["origin-export"],
                            "test_sets": {"supplier_test": "test"}, "parity_set": "test"})},
     "subset_datasets ['origin-export'] are not among the datasets"),
    ({"releases": {2: {"site": "origin", "dataset": "train"}}}, "origin has no data partition 'train'"),
    ({"releases": {9: {"site": "origin", "dataset": "shared"}}}, "names stage(s) [9]"),
    ({"received": {"mars": {"mars_test": "test"}}}, "unknown site 'mars'"),
])
def test_inputs_that_do_not_fit_the_config_are_refused(changes, message):
    with pytest.raises(ValidationError) as error:
        _config(**changes)
    assert message in str(error.value)


def test_a_release_of_another_site_is_refused():
    inputs = load_config().stages.inputs
    assert inputs.release(2, "origin") == "shared"
    with pytest.raises(KeyError, match="a release of origin, not destination"):
        inputs.release(2, "destination")
