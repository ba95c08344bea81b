"""The federated stage DAGs (issue 20): wiring, triggers, and paused unless the stage is federated."""

from __future__ import annotations

from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def dags():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors
    return bag.dags


def _triggers(dag) -> set[str]:
    condition = getattr(dag.timetable, "asset_condition", None)
    return {a.uri for a in getattr(condition, "objects", [condition])} if condition is not None else set()


@pytest.mark.parametrize(("stage", "partner", "model"), [(3, "origin", "m3"), (6, "destination", "m6")])
def test_coordinator_collects_updates_and_hands_the_last_round_to_the_centralized_steps(dags, stage, partner, model):
    dag = dags[f"stage_{stage}_federated_coordinator"]
    assert {f"stage:{stage}", "site:supplier", "federated"} <= set(dag.tags)
    assert _triggers(dag) == {f"factory://supplier/inbox/{model}-fl-update"}
    assert dag.params.get_param("start").value is False
    chain = ["federated_coordinate", "training_finished", "evaluate_model", "export_model", "register_model",
             f"release_model_{partner}"]
    for upstream, downstream in zip(chain, chain[1:], strict=False):
        assert downstream in dag.get_task(upstream).downstream_task_ids, f"{upstream} -> {downstream}"
    release = dag.get_task(f"release_model_{partner}").op_args[2]
    assert release["recipient"] == partner and release["kind"] == model and release["purpose"] == "collaboration"


@pytest.mark.parametrize(("stage", "site", "model"), [(3, "origin", "m3"), (6, "destination", "m6")])
def test_participant_runs_on_each_global_model(dags, stage, site, model):
    dag = dags[f"stage_{stage}_federated_participant"]
    assert {f"stage:{stage}", f"site:{site}", "federated"} <= set(dag.tags)
    assert _triggers(dag) == {f"factory://{site}/inbox/{model}-fl-global"}
    assert [t.task_id for t in dag.tasks] == ["federated_participate"]


def test_federated_dags_are_paused_while_their_stage_is_centralized(dags):
    for dag_id, dag in dags.items():
        if "federated" in dag.tags:
            assert dag.is_paused_upon_creation is True, dag_id
