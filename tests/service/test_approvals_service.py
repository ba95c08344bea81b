"""Approval gates against the real Airflow processes of `factory up` (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

import pytest

from pipelines.service.approvals import ApprovalError, answer_gate
from pipelines.service.processes import state_file
from pipelines.trust import audit
from pipelines.workspace import SitePaths

DAG, GATE, RELEASE = "approval_probe", "approve_release", "release"


def _answer(service, user, run_id, approve=True, comment=""):
    return answer_gate(service.url, user, service.passwords[user], DAG, run_id, GATE, approve, comment)


def _refused(service, user, run_id) -> int:
    with pytest.raises(ApprovalError) as caught:
        _answer(service, user, run_id)
    return caught.value.status


def _answers(paths: SitePaths, run_id: str) -> list[dict]:
    return [entry for entry in audit.entries(paths)
            if entry["action"] == "approval.answered" and entry["details"].get("run_id") == run_id]


@pytest.mark.service
@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_gate_refuses_wrong_answers_and_releases_after_officer_approval(service_factory, db):
    service = service_factory(db)
    origin = SitePaths.of("origin", service.home)
    released = origin.state_dir / "released"
    service.wait_dag(DAG, "origin_engineer")
    runs = {name: service.trigger(DAG, user) for name, user in [
        ("approve", "origin_engineer"), ("own_request", "origin_officer"), ("force_mark", "origin_engineer"),
        ("forged_xcom", "origin_engineer"), ("reject", "origin_engineer")]}
    for run_id in runs.values():
        service.wait_parked(DAG, run_id, GATE)

    listed = service.factory("approvals", "--as", "origin_officer", "--url", service.url, "--json")
    assert listed.returncode == 0, listed.stderr
    assert {gate["run_id"] for gate in json.loads(listed.stdout)} == set(runs.values())
    assert json.loads(service.factory("approvals", "--as", "origin_engineer", "--url", service.url,
                                      "--json").stdout) == []

    run = runs["approve"]
    assert _refused(service, "origin_engineer", run) == 403
    # the destination's officer is no user of the origin's own Airflow at all
    with pytest.raises(ApprovalError, match="login as destination_officer refused"):
        answer_gate(service.url, "destination_officer", "any password", DAG, run, GATE, True)
    cli = service.factory("approve", "--as", "origin_engineer", "--url", service.url, "--dag", DAG, "--run", run,
                          "--task", GATE)
    assert cli.returncode == 1 and "not an assigned approver" in cli.stderr
    assert _answer(service, "origin_officer", run, comment="sanitization report checked")["chosen_options"] == [
        "Approve"]
    assert _refused(service, "origin_officer", run) == 409

    # the requester is an officer: Airflow lets them answer, the policy check after the gate does not
    assert _answer(service, "origin_officer", runs["own_request"], comment="my own")["chosen_options"] == ["Approve"]

    # force-marking the gate successful skips the human: no sealed response exists
    run = runs["force_mark"]
    force = service.http.patch(f"/api/v2/dags/{DAG}/dagRuns/{run}/taskInstances/{GATE}",
                               headers=service.headers("origin_engineer"), json={"new_state": "success"})
    assert force.status_code == 200, force.text

    # a USER may also write the gate's XCom before force-marking it: the forged answer has no valid signature
    run = runs["forged_xcom"]
    forged = {"gate": "data_release", "owner_site": "origin", "dag_id": DAG, "run_id": run, "task_id": GATE,
              "chosen_options": ["Approve"], "comment": "", "responded_by": "origin_officer",
              "responded_at": "2026-01-01T00:00:00+00:00", "requested_by": "origin_engineer",
              "signature": "bm90IGEgc2lnbmF0dXJl"}
    written = service.http.post(f"/api/v2/dags/{DAG}/dagRuns/{run}/taskInstances/{GATE}/xcomEntries",
                                headers=service.headers("origin_engineer"),
                                json={"key": "return_value", "value": forged, "map_index": -1})
    assert written.status_code == 201, written.text
    force = service.http.patch(f"/api/v2/dags/{DAG}/dagRuns/{run}/taskInstances/{GATE}",
                               headers=service.headers("origin_engineer"), json={"new_state": "success"})
    assert force.status_code == 200, force.text

    cli = service.factory("approve", "--as", "origin_officer", "--url", service.url, "--dag", DAG,
                          "--run", runs["reject"], "--task", GATE, "--reject", "--comment", "GPS columns remain")
    assert cli.returncode == 0, cli.stderr
    assert "Reject recorded" in cli.stdout

    outcome = {name: service.wait_run(DAG, run_id) for name, run_id in runs.items()}
    assert outcome == {"approve": "success", "own_request": "failed", "force_mark": "failed",
                       "forged_xcom": "failed", "reject": "failed"}
    assert sorted(path.stem for path in released.glob("*.json")) == [runs["approve"]]
    record = json.loads((released / f"{runs['approve']}.json").read_text())
    assert record["user"] == "origin_officer" and record["site"] == "origin"
    assert record["decision"] == "approve" and record["comment"] == "sanitization report checked"
    assert "compliance_officer" in record["roles"] and record["responded_at"]

    audit.verify(origin)

    def first(name):
        answers = _answers(origin, runs[name])
        if not answers:  # say what the run did instead of an IndexError
            states = {task: (ti.get("state"), ti.get("try_number"))
                      for task in (GATE, RELEASE) for ti in [service.ti(DAG, runs[name], task)]}
            pytest.fail(f"no approval.answered entry for run {name}; task states (state, try): {states}")
        return answers[0]

    assert (first("approve")["actor"], first("approve")["outcome"]) == ("origin_officer", "approve")
    assert first("approve")["details"]["allowed"] is True
    own = first("own_request")
    assert own["actor"] == "origin_officer" and own["details"]["allowed"] is False
    assert any("own request" in reason or "requester" in reason for reason in own["details"]["reasons"]), own
    assert first("force_mark")["outcome"] == "no_response"
    assert first("forged_xcom")["outcome"] == "forged"
    rejected = first("reject")
    assert (rejected["actor"], rejected["outcome"]) == ("origin_officer", "reject")
    assert rejected["details"]["comment"] == "GPS columns remain"
    for name in runs:
        assert len(_answers(origin, runs[name])) == 1, name


@pytest.mark.service
def test_second_up_says_so_and_down_stops_everything(service_factory):
    service = service_factory("sqlite")
    again = service.factory("up", "--site", "origin", "--detach", "--no-mlflow", "--no-carrier", "--no-init",
                            "--no-trigger")
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout and service.url in again.stdout
    assert service.pids(), "the deployment's processes are not found by their marker"
    other = service.factory("down", "--site", "supplier")
    assert other.returncode == 0 and "supplier is not running" in other.stdout
    assert service.pids(), "stopping another site stopped the origin"
    down = service.factory("down", "--site", "origin")
    assert down.returncode == 0 and "stopped: origin" in down.stdout
    assert not service.pids()
    assert not state_file(service.home, "origin").exists()
    assert "not running" in service.factory("down").stdout


@pytest.mark.service
def test_postgres_site_database_serves_the_sites_mlflow_store():
    """A site's MLflow store on its Postgres database, through the URI its processes get (SQLAlchemy 2.1
    would take a driver that is not installed for a bare postgresql:// URI)."""
    import shutil
    import tempfile
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from pipelines.service.postgres import start_cluster

    from .conftest import INITDB

    if not INITDB.exists():
        pytest.skip(f"PostgreSQL 15 is not installed ({INITDB} missing)")
    home = Path(tempfile.mkdtemp(prefix="factory-pg-", dir="/tmp"))
    home.chmod(0o755)  # the postgres system user must reach the cluster
    cluster = None
    try:
        cluster, _, env = start_cluster(home, "origin")
        client = MlflowClient(tracking_uri=env["FACTORY_MLFLOW_URI_ORIGIN"])
        experiment = client.create_experiment("probe")
        assert client.get_experiment(experiment).name == "probe"
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(home, ignore_errors=True)
