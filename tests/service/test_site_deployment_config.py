"""What one site's deployment is configured with, without starting it: its Airflow home, users,
passwords, DAG filter and ports, and how the CLI finds a running deployment."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import SITES, load_config
from pipelines.service.airflow_env import airflow_environment, airflow_users, ensure_passwords, passwords_file
from pipelines.service.approvals import default_url, read_password
from pipelines.service.processes import read_state, running_sites, start_ticks, state_file, write_state
from pipelines.workspace import SitePaths

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("site", SITES)
def test_site_airflow_knows_only_its_people_and_its_service_account(site):
    config = load_config()
    users = dict(airflow_users(site))
    assert set(users) == {user.id for user in config.users if user.site == site} | {config.service_identities[site].id}
    assert users[config.service_identities[site].id] == "OP"  # posting asset events needs OP
    assert not any(user.startswith(tuple(f"{other}_" for other in SITES if other != site)) for user in users)


def test_passwords_live_in_the_site_home_and_drop_users_of_other_sites(tmp_path):
    path = passwords_file(tmp_path, "origin")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"origin_officer": "kept", "supplier_engineer": "not an origin user"}))
    passwords = ensure_passwords(tmp_path, "origin")
    assert path == SitePaths.of("origin", tmp_path).airflow_home / "passwords.json"
    assert passwords["origin_officer"] == "kept" and "supplier_engineer" not in passwords
    assert "svc-origin" in passwords and path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text()) == passwords


def test_site_environment_points_airflow_at_the_site_home_and_its_dags_only(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_AIRFLOW_DB_URL", "postgresql://shared/airflow")  # never a site's database
    env = airflow_environment(tmp_path, site="destination", port=18083)
    home = SitePaths.of("destination", tmp_path).airflow_home
    assert env["AIRFLOW_HOME"] == str(home) and env["FACTORY_SITE"] == "destination"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{home / 'airflow.db'}"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] == str(home / "passwords.json")
    assert env["AIRFLOW__API__BASE_URL"] == "http://localhost:18083"
    assert "admin" not in env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]  # the supplier's administrator
    assert "svc-destination:OP" in env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(",")


def test_each_site_has_its_own_ports():
    sites = load_config().sites
    ports = [port for site in SITES for port in (sites[site].deployment.airflow_port, sites[site].deployment.mlflow_port,
                                                  sites[site].carrier.listen_port)]
    assert len(ports) == len(set(ports)), ports


def test_service_record_is_per_site_and_only_a_live_one_counts(tmp_path):
    me = {"name": "probe", "pid": os.getpid(), "pgid": os.getpgid(0), "started": start_ticks(os.getpid())}
    write_state(tmp_path, "origin", {"site": "origin", "url": "http://localhost:18082", "processes": [me]})
    write_state(tmp_path, "supplier", {"site": "supplier", "url": "http://localhost:18081",
                                       "processes": [{**me, "started": -1}]})  # a reused pid is not ours
    assert state_file(tmp_path, "origin").parent == SitePaths.of("origin", tmp_path).service_dir
    assert set(running_sites(tmp_path)) == {"origin"} and read_state(tmp_path, "supplier") is None
    # `factory approve --as origin_officer` goes to the origin's own Airflow, with the origin's passwords
    assert default_url("origin_officer", tmp_path) == "http://localhost:18082"
    assert default_url("destination_officer", tmp_path) == (
        f"http://localhost:{load_config().sites['destination'].deployment.airflow_port}")
    ensure_passwords(tmp_path, "origin")
    assert read_password("origin_officer", home=tmp_path) == json.loads(
        passwords_file(tmp_path, "origin").read_text())["origin_officer"]


def test_up_port_needs_a_site():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "up", "--port", "9999", "--no-init"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "use it with --site" in result.stderr


def test_driver_answers_a_gate_only_two_heartbeats_after_its_exit_can_have_been_read(tmp_path):
    from pipelines.service.collaboration import PARK_EXIT_MARGIN, Deployment

    (tmp_path / "passwords.json").write_text("{}")
    state = {"url": "http://127.0.0.1:9", "passwords_file": str(tmp_path / "passwords.json"), "task_exit_seconds": 1}
    deployment = Deployment("origin", state, tmp_path)
    parked_at = 1000.0
    bound = parked_at + 1 + PARK_EXIT_MARGIN  # the supervisor's interval, then the margin
    assert not deployment.settled(None)
    deployment.heartbeats = [bound - 0.3, bound - 0.05, bound + 0.2]
    assert not deployment.settled(parked_at)  # one loop ended after the bound: it may have begun before
    deployment.heartbeats.append(bound + 0.45)
    assert deployment.settled(parked_at)
    slower = Deployment("origin", {**state, "task_exit_seconds": 5}, tmp_path)  # Airflow's default interval
    slower.heartbeats = deployment.heartbeats
    assert not slower.settled(parked_at)
    deployment.close(), slower.close()


def test_driver_watches_the_heartbeats_closely_only_near_the_bound(tmp_path, monkeypatch):
    from pipelines.service.collaboration import PARK_EXIT_MARGIN, Deployment

    (tmp_path / "passwords.json").write_text("{}")
    deployment = Deployment("origin", {"url": "http://127.0.0.1:9", "passwords_file": str(tmp_path / "passwords.json"),
                                       "task_exit_seconds": 1}, tmp_path)
    parked_at = 1000.0
    bound = parked_at + 1 + PARK_EXIT_MARGIN
    beats = iter([bound + 0.1, bound + 0.3])
    reads = []

    def observe() -> None:  # the scheduler's next heartbeats, as /api/v2/monitor/health would show them
        reads.append(1)
        deployment.heartbeats.append(next(beats))

    monkeypatch.setattr(deployment, "observe_scheduler", observe)
    deployment.heartbeats = [bound - 1.0]
    assert not deployment.watch_settle(parked_at) and reads == []  # far from the bound: the normal poll
    deployment.heartbeats = [bound - 0.2]
    assert deployment.watch_settle(parked_at, every=0.01) and len(reads) == 2
    stalled = Deployment("origin", {"url": "http://127.0.0.1:9", "passwords_file": str(tmp_path / "passwords.json"),
                                    "task_exit_seconds": 1}, tmp_path)
    monkeypatch.setattr(stalled, "observe_scheduler", lambda: None)  # no new heartbeat
    stalled.heartbeats = [bound - 0.2]
    assert not stalled.watch_settle(parked_at, every=0.01, patience=0.1)
    deployment.close(), stalled.close()


def _driven(tmp_path, monkeypatch, states: list[str], tis: list[dict]):
    """A driver over three deployments whose REST answers are recorded: the followed run (at origin) is in
    `states` one poll after another, its task instances are `tis`."""
    from pipelines.service import collaboration

    monkeypatch.setattr(collaboration, "LOOK_WIDE_EVERY", 0.05)
    (tmp_path / "passwords.json").write_text("{}")
    reads: dict[str, int] = {}
    deployments = {}
    for site in SITES:
        deployment = collaboration.Deployment(site, {"url": "http://127.0.0.1:9", "task_exit_seconds": 1,
                                                     "passwords_file": str(tmp_path / "passwords.json")}, tmp_path)
        monkeypatch.setattr(deployment, "pending_gates",
                            lambda site=site: reads.__setitem__(f"gates {site}", reads.get(f"gates {site}", 0) + 1) or [])
        deployments[site] = deployment
    states_left = iter(states)
    monkeypatch.setattr(deployments["origin"], "run", lambda dag_id, run_id: {"state": next(states_left)})

    def task_instances(dag_id, run_id):
        reads["tis"] = reads.get("tis", 0) + 1
        return tis

    monkeypatch.setattr(deployments["origin"], "task_instances", task_instances)
    drive = collaboration.Collaboration(deployments, approve=True, timeout=30, say=lambda line: None, poll=0.01)
    return drive, deployments["origin"], reads


def test_driver_reads_the_followed_site_every_poll_and_the_rest_now_and_then(tmp_path, monkeypatch):
    drive, origin, reads = _driven(tmp_path, monkeypatch, ["running"] * 40 + ["success"], [])
    assert drive.follow(origin, "stage_4_local_retraining_origin", "run-1") == "success"
    assert reads["gates origin"] == 40  # every poll: a gate of the followed run is answered without delay
    # the run's task instances and the other sites' gates: every LOOK_WIDE_EVERY (0.05 s of ~0.4 s of polls)
    assert 2 <= reads["tis"] < 20 and reads["gates supplier"] == reads["gates destination"]
    assert reads["tis"] - 1 <= reads["gates supplier"] <= reads["tis"]  # the last poll saw success and stopped


def test_driver_stops_on_a_failed_task_while_the_run_goes_on(tmp_path, monkeypatch):
    from pipelines.service.collaboration import DriveFailed

    failed = {"task_id": "train_model", "state": "failed", "dag_id": "stage_4_local_retraining_origin",
              "dag_run_id": "run-1", "try_number": 1}
    drive, origin, reads = _driven(tmp_path, monkeypatch, ["running"] * 1000, [failed])
    with pytest.raises(DriveFailed, match="task train_model failed"):
        drive.follow(origin, "stage_4_local_retraining_origin", "run-1")
    assert reads["tis"] == 1


def test_driver_times_a_gate_from_its_request_or_its_try_start_whichever_is_later(tmp_path, monkeypatch):
    from datetime import UTC, datetime

    drive, origin, _ = _driven(tmp_path, monkeypatch, [], [])
    drive.gate_dags, drive.followed = {"stage_2_sovereign_data_release"}, {("origin", "run-1")}
    started = 1_000_000.0

    def iso(seconds: float) -> str:
        return datetime.fromtimestamp(seconds, UTC).isoformat()

    gate = {"dag_id": "stage_2_sovereign_data_release", "run_id": "run-1", "task_id": "release_approval",
            "map_index": -1, "state": "awaiting_input", "try_number": 2, "subject": "Release?",
            "created_at": iso(started - 100),  # the first try's request: its row is kept for the second try
            "started_at": iso(started), "assigned_users": ["origin_officer"]}
    monkeypatch.setattr(origin, "pending_gates", lambda: [gate])
    monkeypatch.setattr(origin, "observe_scheduler", lambda: None)
    answered = []
    monkeypatch.setattr(drive, "_answer", lambda deployment, g: answered.append(g["task_id"]))
    origin.heartbeats = [started + 0.4, started + 0.8]  # long after the first request, before this try's bound
    drive.tend_gates(origin)
    assert answered == [] and drive.gate_parked
    origin.heartbeats += [started + 2.1, started + 2.2]  # two loops after this try's park + 1 s + the margin
    drive.tend_gates(origin)
    assert answered == ["release_approval"]


def test_scheduler_reads_sqlite_now_with_milliseconds():
    # In a process of its own, as the scheduler (pipelines.service.preload): the hook is process-wide.
    probe = """
import re
from datetime import datetime, timedelta, timezone
from sqlalchemy import create_engine, func, literal, select, text
from pipelines.service.airflow_env import sqlite_now_in_milliseconds
sqlite_now_in_milliseconds()  # before the first query, as in the scheduler (SQLAlchemy caches compiled SQL)
engine = create_engine("sqlite://")
with engine.connect() as db:
    whole = db.execute(text("SELECT CURRENT_TIMESTAMP")).scalar()
    now = db.execute(select(func.now())).scalar()
    due = (datetime.now(timezone.utc) - timedelta(milliseconds=5)).strftime("%Y-%m-%d %H:%M:%S.%f")
    print(whole, "|", now, "|", db.execute(select(literal(due) <= func.now())).scalar())
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    whole, now, due = (part.strip() for part in result.stdout.split("|"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", whole)  # SQLite's own CURRENT_TIMESTAMP
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}000", now)  # milliseconds, read as a datetime
    assert due == "True"  # a run due 5 ms ago is due now, not at the next whole second


def test_scheduler_preloads_what_tasks_import_and_reads_no_configuration(tmp_path):
    """Task processes fork from the scheduler: the step modules and the DAG files' helpers are loaded there
    first, and nothing is read from conf/ (a task reads the site's configuration as it is when it runs)."""
    probe = """
import sys
from pipelines.service.preload import DAG_HELPERS, preload
preload()
from pipelines.config import _load
from pipelines.steps import STEP_MODULES
print(sorted(set((*STEP_MODULES, *DAG_HELPERS)) - set(sys.modules)), _load.cache_info().currsize)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")]),
           "FACTORY_CONF": str(tmp_path / "no-conf-here")}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["[]", "0"]
