"""A real site deployment (the origin's Airflow processes, started by `factory up --site origin`) for the
service and browser tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
DAGS = Path(__file__).parent / "dags"
FACTORY = [sys.executable, "-m", "pipelines.cli"]
INITDB = Path("/usr/lib/postgresql/15/bin/initdb")
SITE = "origin"
OPERATOR = "origin_platform"  # the origin's OP user: reads runs and task instances in its Airflow


def record_path(home: Path, site: str = SITE) -> Path:
    from pipelines.service.processes import state_file

    return state_file(home, site)


class Service:
    """The origin's running deployment and a small REST client for it."""

    def __init__(self, home: Path, env: dict[str, str]):
        self.home = home
        self.env = env
        self.state = json.loads(record_path(home).read_text())
        self.url = self.state["url"]
        self.passwords = json.loads(Path(self.state["passwords_file"]).read_text())
        self.http = httpx.Client(base_url=self.url, timeout=90.0)
        self._tokens: dict[str, str] = {}

    def headers(self, user: str) -> dict[str, str]:
        if user not in self._tokens:
            response = self.http.post("/auth/token", json={"username": user, "password": self.passwords[user]})
            response.raise_for_status()
            self._tokens[user] = response.json()["access_token"]
        return {"Authorization": f"Bearer {self._tokens[user]}"}

    def factory(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*FACTORY, *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=120)

    def wait_dag(self, dag_id: str, user: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self.http.get(f"/api/v2/dags/{dag_id}", headers=self.headers(user)).status_code != 200:
            assert time.monotonic() < deadline, f"{dag_id} not parsed; see {self.state['site_home']}/service/logs"
            time.sleep(2)

    def trigger(self, dag_id: str, user: str) -> str:
        response = self.http.post(f"/api/v2/dags/{dag_id}/dagRuns", headers=self.headers(user),
                                  json={"logical_date": None, "conf": {}})
        assert response.status_code == 200, response.text
        return response.json()["dag_run_id"]

    def ti(self, dag_id: str, run_id: str, task_id: str) -> dict:
        response = self.http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}",
                                 headers=self.headers(OPERATOR))
        return response.json() if response.status_code == 200 else {}

    def wait_parked(self, dag_id: str, run_id: str, task_id: str, *, stable: float = 6.0,
                    timeout: float = 240) -> dict:
        """Wait until the gate sits in awaiting_input with the same try for `stable` seconds.

        Airflow 3.3.2 may report a freshly parked try as failed a few seconds later and retry it
        (an answer given in that window is lost), so tests answer only a settled gate.
        """
        deadline = time.monotonic() + timeout
        seen, since = None, time.monotonic()
        while True:
            ti = self.ti(dag_id, run_id, task_id)
            key = (ti.get("state"), ti.get("try_number"))
            if key != seen:
                seen, since = key, time.monotonic()
            elif key[0] == "awaiting_input" and time.monotonic() - since >= stable:
                return ti
            assert ti.get("state") not in ("failed", "upstream_failed", "success"), f"gate ended early: {ti}"
            assert time.monotonic() < deadline, f"gate {task_id} of {run_id} never settled: {ti}"
            time.sleep(1)

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}",
                                  headers=self.headers(OPERATOR)).json().get("state")
            if state in ("success", "failed"):
                return state
            assert time.monotonic() < deadline, f"run {run_id} still {state}"
            time.sleep(2)

    def pids(self) -> list[int]:
        """Processes of this deployment still alive (by the marker `factory up` put in their environment)."""
        from pipelines.service.up import deployment_pids

        return deployment_pids(self.state)


def _kill_leftovers(home: Path) -> None:
    try:
        state = json.loads(record_path(home).read_text())
    except (OSError, ValueError):
        return
    for process in state.get("processes", []):
        try:
            os.killpg(process["pgid"], signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def start_service(db: str, *extra: str) -> tuple[Service, callable]:
    if db == "postgres" and not INITDB.exists():
        pytest.skip(f"PostgreSQL 15 is not installed ({INITDB} missing)")
    # Not under pytest's 0700 tmp folder: the postgres system user must reach the cluster.
    home = Path(tempfile.mkdtemp(prefix="factory-svc-", dir="/tmp"))
    os.chmod(home, 0o755)
    # The service is configured by `factory up` alone, not by the test session's embedded Airflow.
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("AIRFLOW__", "AIRFLOW_HOME", "FACTORY_"))}
    env.update({"FACTORY_HOME": str(home), "FACTORY_DB": db, "PYTHONPATH": str(ROOT)})
    from pipelines.trust.keys import ensure_site_keys
    from pipelines.workspace import SitePaths

    ensure_site_keys(SitePaths.of("origin", home))
    command = [*FACTORY, "up", "--site", SITE, "--detach", "--no-mlflow", "--no-carrier", "--no-init",
               "--no-trigger", "--dags-folder", str(DAGS), "--port", "0", *extra]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)

    def stop() -> None:
        down = subprocess.run([*FACTORY, "down"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        _kill_leftovers(home)
        if db == "postgres":
            from pipelines.service.postgres import Cluster

            Cluster(home).stop()
        keep = os.environ.get("FACTORY_KEEP_TEST_HOME")
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
        assert down.returncode == 0, down.stdout + down.stderr

    if result.returncode != 0:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}"
                         for p in (home / SITE / "service" / "logs").glob("*.log"))
        stop()
        pytest.fail(f"factory up failed:\n{result.stdout}\n{result.stderr}\n{logs}")
    return Service(home, env), stop


@pytest.fixture
def service_factory():
    """Start services on demand; every one is stopped at teardown, also when the test fails."""
    stops = []

    def make(db: str = "sqlite", *extra: str) -> Service:
        service, stop = start_service(db, *extra)
        stops.append((service, stop))
        return service

    yield make
    for service, stop in stops:
        leftover_before = service.pids()
        stop()
        assert not service.pids(), f"processes left after factory down: {service.pids()} (before: {leftover_before})"


def chromium_driver(window: str = "1400,1400"):
    """Headless Debian Chromium through Selenium (apt-get install chromium chromium-driver; nothing is downloaded)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("Debian chromium/chromium-driver not installed (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={window}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=ChromeService(chromedriver), options=options)
    driver.implicitly_wait(30)
    return driver
