"""The Data Docs app: only a site's compliance officers read its Data Docs, and only files inside them.

The role check runs through Airflow's real API server app (its Simple auth manager issues the tokens,
the plugin's app is mounted as in a deployment); the path checks on a small data-docs folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from factory_plugin.data_docs import PathRefused, newest_validation_page, officer_problem, resolve_inside

SESSION_HOME = Path(os.environ["FACTORY_HOME"])  # the embedded Airflow's, set by tests/conftest.py
PAGE = "validations/release/origin_shared-sanitized@abc/20261204T175827.451734Z/frames-origin-shared.html"


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    """A FACTORY_HOME with origin's Data Docs (an index, two runs of one validation), a secret beside them
    and symlinks: one to the secret, one to a file inside."""
    docs = tmp_path / "origin" / "data-docs"
    for page, text in ((PAGE, "newest page"), (PAGE.replace("20261204T175827", "20261203T100000"), "older page"),
                       ("index.html", "<html>index</html>"), ("static/styles/site.css", "body {}")):
        (docs / page).parent.mkdir(parents=True, exist_ok=True)
        (docs / page).write_text(text)
    (tmp_path / "origin" / "secret.txt").write_text("not for the browser")
    (docs / "out.html").symlink_to(tmp_path / "origin" / "secret.txt")
    (docs / "out-dir").symlink_to(tmp_path / "origin")
    (docs / "alias.html").symlink_to(docs / "index.html")
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path))
    monkeypatch.delenv("FACTORY_SITE", raising=False)
    return tmp_path


def test_paths_inside_the_data_docs_are_served_and_nothing_else(home: Path):
    root = home / "origin" / "data-docs"
    assert resolve_inside(root, "").read_text() == "<html>index</html>"
    assert resolve_inside(root, PAGE).read_text() == "newest page"
    assert resolve_inside(root, "alias.html") == (root / "index.html").resolve()  # a symlink that stays inside
    for bad in ("../secret.txt", "validations/../../secret.txt", "/etc/passwd", str(home / "origin/secret.txt"),
                "out.html", "out-dir/secret.txt", "static//styles/site.css", "./index.html", "static",
                "static\\..\\..\\secret.txt", "index.html\x00.css", "missing.html"):
        with pytest.raises(PathRefused):
            resolve_inside(root, bad)


def test_the_newest_validation_page_is_found_by_name_only(home: Path):
    root = home / "origin" / "data-docs"
    assert newest_validation_page(root, "origin/shared-sanitized@abc", "release") == PAGE
    assert newest_validation_page(root, "origin/shared-sanitized@abc", "training") is None
    assert newest_validation_page(root, "../../secret", "release") is None
    assert newest_validation_page(root, "origin/shared-sanitized@abc", "..") is None


def test_only_compliance_officers_of_the_site_may_read():
    assert officer_problem("origin_officer", "origin") is None
    assert "not origin" in officer_problem("supplier_officer", "origin")
    assert "compliance_officer" in officer_problem("origin_engineer", "origin")
    assert "compliance_officer" in officer_problem("origin_auditor", "origin")
    assert "not a configured user" in officer_problem("mallory", "origin")


@pytest.fixture(scope="module")
def airflow_client():
    """Airflow's API server app (as `airflow api-server` builds it, plugins mounted) and a login."""
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    from pipelines.orchestration import prepare_airflow
    from pipelines.service.approvals import token

    prepare_airflow(SESSION_HOME)  # its metadata database (a token's revocation is looked up there)
    client = TestClient(create_app(), base_url="http://localhost")
    passwords = json.loads(Path(os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]).read_text())
    return client, lambda user: {"Authorization": f"Bearer {token(client, user, passwords[user])}"}


def test_the_site_serves_its_data_docs_to_its_officers_only(home: Path, airflow_client):
    client, login = airflow_client
    officer = login("origin_officer")
    response = client.get("/factory/data-docs/origin/validation", params={"dataset": "origin/shared-sanitized@abc"},
                          headers=officer)
    assert response.status_code == 200 and response.text == "newest page"
    assert response.history[0].status_code == 303
    assert client.get("/factory/data-docs/origin/static/styles/site.css", headers=officer).text == "body {}"

    assert client.get("/factory/data-docs/origin/index.html").status_code == 401  # no token
    assert client.get("/factory/data-docs/origin/index.html",
                      headers={"Authorization": "Bearer forged"}).status_code in (401, 403)
    for user in ("origin_engineer", "origin_auditor", "supplier_officer", "admin"):
        response = client.get("/factory/data-docs/origin/index.html", headers=login(user))
        assert response.status_code == 403, (user, response.text)
    assert client.get("/factory/data-docs/supplier/index.html", headers=officer).status_code == 403
    assert client.get("/factory/data-docs/elsewhere/index.html", headers=officer).status_code == 404


def test_escaping_paths_are_refused_over_http(home: Path, airflow_client):
    client, login = airflow_client
    officer = login("origin_officer")
    for path in ("%2e%2e/secret.txt", "validations/%2e%2e/%2e%2e/secret.txt", "%2Fetc%2Fpasswd", "out.html",
                 "out-dir/secret.txt", "..%5csecret.txt"):
        response = client.get(f"/factory/data-docs/origin/{path}", headers=officer)
        assert response.status_code == 404, (path, response.text)
        assert "not for the browser" not in response.text


def test_a_deployment_serves_its_own_site_only(home: Path, airflow_client, monkeypatch):
    client, login = airflow_client
    monkeypatch.setenv("FACTORY_SITE", "supplier")
    response = client.get("/factory/data-docs/origin/index.html", headers=login("origin_officer"))
    assert response.status_code == 404


def test_the_data_release_gate_links_to_the_validation_page():
    """The body as Airflow renders it (Jinja) links to this site's Data Docs app, dataset id URL-encoded."""
    import jinja2
    from airflow.dag_processing.dagbag import DagBag

    dags = Path(__file__).resolve().parents[2] / "dags"
    gate = DagBag(dag_folder=str(dags / "stage_5_export_data_release.py")).dags["stage_5_export_data_release"]
    xcoms = {"sanitize_dataset": {"dataset_id": "origin/x-sanitized@1", "source_id": "origin/x@0"},
             "validate_release": {"dataset_id": "origin/x-sanitized@1", "success": True}}
    ti = type("TI", (), {"xcom_pull": staticmethod(lambda task_ids: xcoms[task_ids])})
    body = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(
        gate.get_task("release_approval").body).render(ti=ti, dag_run=SimpleNamespace(triggering_user_name="engineer"))
    assert "(/factory/data-docs/origin/validation?suite=release&dataset=origin/x-sanitized%401)" in body
