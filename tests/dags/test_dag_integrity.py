"""Every DAG file parses into its one DAG without running a database query, opening a connection or
evaluating a policy, every DAG follows the style guide (dag_id = file name, tags, retries, doc, no
catchup), and the stage order of conf/stages.yaml is one the DAGs' asset triggers can run in."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import sqlalchemy.event
from sqlalchemy.engine import Engine

DAGS = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = sorted(DAGS.glob("*.py"))
SITES = {"supplier", "origin", "destination"}


def _bag(folder: Path):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(folder))


@pytest.fixture
def no_io(monkeypatch):
    """Records database queries and policy evaluations; refuses network connections."""
    import regorus

    from pipelines.policy import engines

    seen: dict[str, list] = {"queries": [], "policy": []}

    def count(conn, cursor, statement, *args):
        seen["queries"].append(statement)

    sqlalchemy.event.listen(Engine, "before_cursor_execute", count)

    def refuse(*args, **kwargs):
        raise AssertionError(f"DAG parsing opened a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    from airflow.sdk import BaseHook

    monkeypatch.setattr(BaseHook, "get_connection", classmethod(lambda cls, *a, **k: refuse(*a)))

    def recorder(name):
        def record(*args, **kwargs):
            seen["policy"].append(name)
            return {"allow": False, "reasons": [f"{name} called while parsing DAGs"]}

        return record

    # every decision goes through an engine's `decide`; a new regorus Engine means Rego being loaded
    monkeypatch.setattr(engines.RegorusEngine, "decide", recorder("RegorusEngine.decide"))
    monkeypatch.setattr(engines.OpaServerEngine, "decide", recorder("OpaServerEngine.decide"))
    monkeypatch.setattr(regorus, "Engine", recorder("regorus.Engine"))
    yield seen
    sqlalchemy.event.remove(Engine, "before_cursor_execute", count)


@pytest.mark.parametrize("path", DAG_FILES, ids=[p.stem for p in DAG_FILES])
def test_dag_file_parses_into_its_dag_without_io_or_policy(path: Path, no_io):
    bag = _bag(path)
    assert not bag.import_errors, bag.import_errors
    assert list(bag.dags) == [path.stem], f"{path.name} defines {sorted(bag.dags)}"
    assert not no_io["queries"], f"parsing {path.name} ran database queries: {no_io['queries'][:3]}"
    assert not no_io["policy"], f"parsing {path.name} evaluated policies: {no_io['policy']}"


def test_the_policy_recorder_sees_an_evaluation(no_io):
    from pipelines.policy import evaluate

    assert not evaluate("approval", {}).allow
    assert no_io["policy"] == ["RegorusEngine.decide"]


def test_dagbag_has_every_file_and_follows_the_style_guide():
    bag = _bag(DAGS)
    assert not bag.import_errors
    assert sorted(bag.dags) == sorted(p.stem for p in DAG_FILES)
    for dag_id, dag in bag.dags.items():
        assert dag.doc_md and len(dag.doc_md) > 40, f"{dag_id} has no module docstring as doc_md"
        assert dag.catchup is False
        stage_tags = [t for t in dag.tags if re.fullmatch(r"stage:[1-8]", t)]
        site_tags = [t for t in dag.tags if t.startswith("site:") and t[5:] in SITES]
        assert len(stage_tags) == 1 and len(site_tags) == 1, f"{dag_id} tags {dag.tags}"
        assert dag.default_args.get("retries", 0) >= 1, f"{dag_id} has no retries"


def _asset_uris(condition) -> set[str]:
    if condition is None:
        return set()
    if hasattr(condition, "objects"):  # AssetAny / AssetAll
        return set().union(*(_asset_uris(c) for c in condition.objects))
    return {condition.uri}


def _carried(dag) -> set[str]:
    """The inbox assets a DAG's releases lead to: a release seals into the sender's outbox and the
    recipient's inbox service posts `factory://<recipient>/inbox/<kind>` in the recipient's Airflow.
    A release task is a step task whose parameters name a `recipient` and a `kind`."""
    uris = set()
    for task in dag.tasks:
        args = getattr(task, "op_args", ())
        if len(args) == 3 and isinstance(args[2], dict) and {"recipient", "kind"} <= set(args[2]):
            recipient = args[2]["recipient"]
            if recipient.startswith("{{ params."):  # a trigger parameter: its default
                recipient = dag.params.get_param(recipient.removeprefix("{{ params.").removesuffix(" }}")).value
            uris.add(f"factory://{recipient}/inbox/{args[2]['kind']}")
    return uris


def test_release_tasks_emit_no_asset_event_for_another_site():
    """The sender's Airflow never claims a package arrived elsewhere: only the recipient's inbox says so."""
    for dag in _bag(DAGS).dags.values():
        for task in dag.tasks:
            assert not [a for a in task.outlets if "/inbox/" in a.uri], f"{dag.dag_id}.{task.task_id}"


def test_step_tasks_push_one_xcom_each():
    """A step's result is one XCom (`return_value`), not also one per key: every XCom is an API call."""
    steps = [task for dag in _bag(DAGS).dags.values() for task in dag.tasks
             if getattr(task, "python_callable", None) is not None and task.python_callable.__name__ == "run_local_step"]
    assert len(steps) > 50
    assert not [task.task_id for task in steps if task.multiple_outputs]


def test_stage_order_of_conf_lists_every_stage_dag_in_an_order_their_triggers_allow():
    from pipelines.config import load_config

    dags = _bag(DAGS).dags
    order = load_config().stages.order
    listed = [dag_id for stage in order for dag_id in stage.dags]
    # drift monitors, a contribution's withdrawal and the federated rounds (a stage's other
    # collaboration, conf/stages.yaml `collaboration`) run beside the stages, not in their order
    assert sorted(listed) == sorted(d for d, dag in dags.items()
                                    if not {"drift", "revocation", "federated"} & set(dag.tags))
    produced: set[str] = set()
    for stage in order:
        for dag_id in stage.dags:
            dag = dags[dag_id]
            assert f"stage:{stage.stage}" in dag.tags, f"{dag_id} is listed under stage {stage.stage}"
            triggers = _asset_uris(getattr(dag.timetable, "asset_condition", None))
            assert not triggers or triggers & produced, (
                f"{dag_id} waits for {sorted(triggers)}, which no DAG listed before it produces"
            )
            produced |= {asset.uri for task in dag.tasks for asset in task.outlets} | _carried(dag)


def test_factory_site_restricts_loaded_dags(monkeypatch):
    monkeypatch.setenv("FACTORY_SITE", "origin")
    bag = _bag(DAGS)
    assert bag.dags, "no DAG loaded for origin"
    assert all("site:origin" in dag.tags for dag in bag.dags.values())
    assert "stage_1_initial_training" not in bag.dags
