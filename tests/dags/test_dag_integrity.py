"""Every DAG file imports cleanly, parsing queries no database and opens no connection, and every
DAG follows the style guide (dag_id = file name, tags, retries, doc, no catchup)."""

from __future__ import annotations

import importlib.util
import re
import socket
from pathlib import Path

import pytest
import sqlalchemy.event
from sqlalchemy.engine import Engine

DAGS = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = sorted(DAGS.glob("*.py"))
SITES = {"supplier", "origin", "destination"}


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(f"dagfile_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_io(monkeypatch):
    queries: list[str] = []

    def count(conn, cursor, statement, *args):
        queries.append(statement)

    sqlalchemy.event.listen(Engine, "before_cursor_execute", count)

    def refuse(*args, **kwargs):
        raise AssertionError(f"DAG parsing opened a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    from airflow.sdk import BaseHook

    monkeypatch.setattr(BaseHook, "get_connection", classmethod(lambda cls, *a, **k: refuse(*a)))
    yield queries
    sqlalchemy.event.remove(Engine, "before_cursor_execute", count)


@pytest.mark.parametrize("path", DAG_FILES, ids=[p.stem for p in DAG_FILES])
def test_dag_file_imports_without_io(path: Path, no_io):
    from airflow.sdk import DAG

    module = _import(path)
    dags = [v for v in vars(module).values() if isinstance(v, DAG)]
    assert not no_io, f"parsing {path.name} ran database queries: {no_io[:3]}"
    assert dags == [] or len(dags) == 1


def test_dagbag_has_every_file_and_follows_the_style_guide():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors
    assert sorted(bag.dags) == sorted(p.stem for p in DAG_FILES)
    for dag_id, dag in bag.dags.items():
        assert dag.doc_md and len(dag.doc_md) > 40, f"{dag_id} has no module docstring as doc_md"
        assert dag.catchup is False
        stage_tags = [t for t in dag.tags if re.fullmatch(r"stage:[1-8]", t)]
        site_tags = [t for t in dag.tags if t.startswith("site:") and t[5:] in SITES]
        assert stage_tags and len(site_tags) == 1, f"{dag_id} tags {dag.tags}"
        assert dag.default_args.get("retries", 0) >= 1, f"{dag_id} has no retries"


def test_factory_site_restricts_loaded_dags(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("FACTORY_SITE", "origin")
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.dags, "no DAG loaded for origin"
    assert all("site:origin" in dag.tags for dag in bag.dags.values())
    assert "stage_1_initial_training" not in bag.dags
