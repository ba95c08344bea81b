"""`factory up` / `factory down`: the factory as a service on one machine.

`up` starts Airflow 3 (api-server, scheduler, dag-processor, triggerer), one MLflow UI per site
and, with `FACTORY_DB=postgres`, a PostgreSQL 15 cluster under FACTORY_HOME; it triggers a first
collaboration run and prints URLs, users and passwords. Every process it starts gets its own
process group and the marker `FACTORY_SERVICE_ID` in its environment, recorded in
`FACTORY_HOME/service.json`; `down` (or Ctrl-C on `up`) stops exactly those.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import click

from pipelines.config import SITES, load_config
from pipelines.service.processes import alive, marked, ours, read_state, start_ticks, state_file, write_state
from pipelines.workspace import SitePaths, WorkspaceError, factory_home

FIRST_DAG = "stage_1_initial_training"
FIRST_DAG_USER = "supplier_engineer"
AIRFLOW_PROCESSES = ("api-server", "scheduler", "dag-processor", "triggerer")


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port(preferred: int | None = None) -> int:
    if preferred:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- processes -----------------------------------------------------------------------------------

def _spawn(name: str, command: list[str], env: dict[str, str], logs: Path) -> dict[str, Any]:
    log_path = logs / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, cwd=env["FACTORY_HOME"])
    return {"name": name, "pid": process.pid, "pgid": process.pid, "started": start_ticks(process.pid),
            "log": str(log_path), "command": command}


def _group_members(pgids: set[int]) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) in pgids:
                    members.append(int(entry.name))
    return members


def _marked_pids(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and marked(int(entry.name), marker):
            pids.append(int(entry.name))
    return pids


def stop_service(home: Path, state: dict[str, Any], *, quiet: bool = False, timeout: float = 20.0) -> None:
    """Stop every process the service started: their groups, then any stray marked process, then Postgres."""
    marker = state.get("service_id", "")
    say = (lambda *_: None) if quiet else click.echo
    groups = [process for process in state.get("processes", []) if ours(process)]
    for process in groups:
        say(f"stopping {process['name']} (pid {process['pid']})")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process["pgid"], signal.SIGTERM)

    def remaining() -> list[int]:
        members = [pid for pid in _group_members({p["pgid"] for p in groups}) if alive(pid)]
        return members + [pid for pid in _marked_pids(marker) if alive(pid) and pid not in members]

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and remaining():
        time.sleep(0.3)
    for pid in remaining():  # stragglers: hung servers, task processes that left their group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if state.get("postgres"):
        from pipelines.service.postgres import Cluster

        say("stopping postgres")
        Cluster(home).stop()
    with contextlib.suppress(FileNotFoundError):
        if json.loads(state_file(home).read_text()).get("service_id") == marker:
            state_file(home).unlink()


# --- waiting, triggering -------------------------------------------------------------------------

_last_progress = [0.0]


def _progress(text: str) -> None:
    """One updating line on a terminal; a line every 10 s in a log."""
    if sys.stdout.isatty():
        click.echo(f"\r{text}   ", nl=False)
    elif time.monotonic() - _last_progress[0] >= 10:
        _last_progress[0] = time.monotonic()
        click.echo(text)


def _done(text: str) -> None:
    click.echo(("\r" if sys.stdout.isatty() else "") + text + (" " * 20 if sys.stdout.isatty() else ""))

def _wait_http(url: str, timeout: float, label: str, processes: list[dict[str, Any]] | None = None) -> float:
    """Poll `url` until it answers 200; show progress; return the seconds it took."""
    import httpx

    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                _done(f"{label}: up after {elapsed:.0f} s")
                return elapsed
        except httpx.HTTPError:
            pass
        for process in processes or []:
            if not ours(process):
                raise click.ClickException(f"{process['name']} exited during start; see {process['log']}")
        if elapsed > timeout:
            raise click.ClickException(f"{label} did not answer at {url} within {timeout:.0f} s")
        _progress(f"waiting for {label} ... {elapsed:.0f} s")
        time.sleep(1.0)


def trigger_first_run(url: str, passwords: dict[str, str], *, wait: float = 120.0) -> str | None:
    """Trigger stage 1 as the supplier engineer once the DAG is parsed; None (and a note) if it is not."""
    import httpx

    from pipelines.service.approvals import ApprovalError, token

    with httpx.Client(base_url=url, timeout=30.0) as client:
        try:
            headers = {"Authorization": f"Bearer {token(client, FIRST_DAG_USER, passwords[FIRST_DAG_USER])}"}
        except (ApprovalError, KeyError) as error:
            click.echo(f"cannot trigger {FIRST_DAG}: {error}")
            return None
        started = time.monotonic()
        while client.get(f"/api/v2/dags/{FIRST_DAG}", headers=headers).status_code != 200:
            elapsed = time.monotonic() - started
            if elapsed > wait:
                _done(f"{FIRST_DAG} is not loaded (no such DAG in the DAGs folder yet, or it failed to "
                           "parse: see the dag-processor log); nothing triggered")
                return None
            _progress(f"waiting for the DAG {FIRST_DAG} to be parsed ... {elapsed:.0f} s")
            time.sleep(2.0)
        response = client.post(f"/api/v2/dags/{FIRST_DAG}/dagRuns", headers=headers,
                               json={"logical_date": None, "conf": {}})
        if response.status_code >= 300:
            _done(f"triggering {FIRST_DAG} failed: HTTP {response.status_code} {response.text[:300]}")
            return None
        run_id = response.json()["dag_run_id"]
        _done(f"triggered {FIRST_DAG} as {FIRST_DAG_USER}: run {run_id}")
        return run_id


def _ensure_workspace(home: Path) -> None:
    missing = []
    for site in SITES:
        try:
            SitePaths.of(site, home).require()
        except WorkspaceError:
            missing.append(site)
    if not missing:
        return
    from pipelines.init import init_workspace

    click.echo(f"initialising the workspace under {home} (factory init) ...")
    init_workspace(home)


def _print_summary(state: dict[str, Any], passwords: dict[str, str]) -> None:
    click.echo("")
    click.echo(f"Airflow UI      {state['url']}   (Browse → Required Actions for approvals)")
    for site, url in state.get("mlflow", {}).items():
        click.echo(f"MLflow {site:<12} {url}")
    if state.get("postgres"):
        click.echo(f"PostgreSQL      127.0.0.1:{state['postgres']['port']} (cluster under {state['home']}/postgres)")
    click.echo("")
    click.echo(f"{'user':<26}{'site':<13}{'roles':<26}{'airflow':<9}password")
    for user in load_config().users:
        click.echo(f"{user.id:<26}{user.site:<13}{','.join(user.roles):<26}{user.airflow_role:<9}"
                   f"{passwords.get(user.id, '?')}")
    click.echo(f"(passwords from {state['passwords_file']}, mode 0600)")
    click.echo("")
    click.echo("Stop with Ctrl-C here, or `make stop` / `factory down` from another shell.")


# --- commands ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _start_lock(home: Path):
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "service.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def start_service(
    home: Path,
    *,
    port: int | None,
    host: str,
    mlflow: bool,
    dags_folder: Path | None,
    timeout: float,
    init: bool = True,
) -> dict[str, Any]:
    """Start everything (the caller holds the start lock); return the service record."""
    from pipelines.service.airflow_env import airflow_environment, passwords_file

    started = time.monotonic()
    marker = uuid.uuid4().hex
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base_env = {**os.environ, "FACTORY_HOME": str(home), "FACTORY_SERVICE_ID": marker}
    state: dict[str, Any] = {"service_id": marker, "home": str(home), "processes": [], "started_at": time.time(),
                             "supervisor_pid": os.getpid()}
    try:
        if os.environ.get("FACTORY_DB", "sqlite").lower() in ("postgres", "postgresql"):
            from pipelines.service.postgres import PostgresError, start_cluster

            click.echo("starting PostgreSQL 15 ...")
            try:
                _, pg_port, pg_env = start_cluster(home)
            except PostgresError as error:
                raise click.ClickException(str(error)) from None
            state["postgres"] = {"port": pg_port}
            write_state(home, state)
            base_env.update(pg_env)
            os.environ.update(pg_env)  # `factory init` below creates the MLflow stores in Postgres too
        if init:
            _ensure_workspace(home)
        api_port = free_port(port)
        if port and api_port != port:
            click.echo(f"port {port} is busy; using {api_port}")
        env = {**base_env, **airflow_environment(home, port=api_port, dags_folder=dags_folder,
                                                 db_url=base_env.get("FACTORY_AIRFLOW_DB_URL"))}
        if not env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite"):
            env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS", None)  # SQLite's, from a caller's env
        env.setdefault("AIRFLOW__CORE__PARALLELISM", "8")
        env.setdefault("AIRFLOW__API__WORKERS", "1")
        state["url"] = f"http://localhost:{api_port}"
        state["passwords_file"] = str(passwords_file(home))
        click.echo("migrating the Airflow database (airflow db migrate) ...")
        migrate = subprocess.run([_bin("airflow"), "db", "migrate"], env=env, capture_output=True, text=True,
                                 cwd=str(home))
        if migrate.returncode != 0:
            (logs / "db-migrate.log").write_text(migrate.stdout + migrate.stderr)
            raise click.ClickException(f"airflow db migrate failed; see {logs / 'db-migrate.log'}")
        if env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite:///"):
            _sqlite_wal(Path(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///")))
        commands = {
            "api-server": [_bin("airflow"), "api-server", "--host", host, "--port", str(api_port), "--workers", "1"],
            "scheduler": [_bin("airflow"), "scheduler"],
            "dag-processor": [_bin("airflow"), "dag-processor"],
            "triggerer": [_bin("airflow"), "triggerer"],
        }
        for name, command in commands.items():
            state["processes"].append(_spawn(name, command, env, logs))
        if mlflow:
            state["mlflow"] = {}
            for site in SITES:
                paths = SitePaths.of(site, home)
                paths.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
                mlflow_port = free_port(api_port + 1 + SITES.index(site))
                uri = base_env.get(f"FACTORY_MLFLOW_URI_{site.upper()}") or paths.mlflow_uri
                command = [_bin("mlflow"), "server", "--backend-store-uri", uri,
                           "--default-artifact-root", paths.mlflow_artifacts.as_uri(),
                           "--host", host, "--port", str(mlflow_port), "--workers", "1"]
                # The server's job runner (huey consumers for GenAI jobs) costs ~1 GB per site; unused here.
                mlflow_env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
                state["processes"].append(_spawn(f"mlflow-{site}", command, mlflow_env, logs))
                state["mlflow"][site] = f"http://localhost:{mlflow_port}"
        write_state(home, state)
        _wait_http(f"{state['url']}/api/v2/monitor/health", timeout, "Airflow API and UI",
                   [p for p in state["processes"] if p["name"] in AIRFLOW_PROCESSES])
        state["seconds_to_ui"] = round(time.monotonic() - started, 1)
        write_state(home, state)
        return state
    except BaseException:
        stop_service(home, state, quiet=True)
        raise


def _sqlite_wal(path: Path) -> None:
    """WAL lets the API answer reads while the scheduler writes (the file keeps the mode)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(path, timeout=60)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


def _supervise(home: Path, state: dict[str, Any]) -> None:
    """Stay in the foreground until Ctrl-C, `factory down`, or an Airflow process dies."""
    def _terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    warned: set[str] = set()
    try:
        while True:
            time.sleep(1.0)
            current = read_state(home)
            if not current or current.get("service_id") != state["service_id"]:
                click.echo("the factory was stopped")
                return
            for process in state["processes"]:
                if ours(process) or process["name"] in warned:
                    continue
                warned.add(process["name"])
                if process["name"] in AIRFLOW_PROCESSES:
                    click.echo(f"{process['name']} exited; see {process['log']}. Stopping the factory.")
                    stop_service(home, state)
                    sys.exit(1)
                click.echo(f"{process['name']} exited; see {process['log']} (Airflow keeps running)")
    except KeyboardInterrupt:
        click.echo("\nstopping the factory ...")
        stop_service(home, state)


@click.command("up")
@click.option("--port", type=int, default=lambda: int(os.environ.get("FACTORY_PORT", "8080")),
              show_default="8080 or FACTORY_PORT", help="API/UI port (a free one if it is busy)")
@click.option("--host", default="127.0.0.1", show_default=True, help="address the servers listen on")
@click.option("--detach", is_flag=True, help="start and return instead of staying in the foreground")
@click.option("--mlflow/--no-mlflow", default=True, show_default=True, help="an MLflow UI per site")
@click.option("--init/--no-init", "do_init", default=True, show_default=True,
              help="run `factory init` when the workspace is missing")
@click.option("--trigger/--no-trigger", default=True, show_default=True,
              help=f"trigger a first {FIRST_DAG} run")
@click.option("--dags-folder", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="DAGs to load instead of the project's dags/")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="seconds to wait for the UI")
def up_command(port, host, detach, mlflow, do_init, trigger, dags_folder, timeout) -> None:
    """Start the factory: Airflow UI with the factory's users, MLflow per site, a first run."""
    from pipelines.service.airflow_env import ensure_passwords

    home = factory_home()
    with _start_lock(home):
        running = read_state(home)
        if running:
            click.echo(f"the factory is already running at {running.get('url')} (started by pid "
                       f"{running.get('supervisor_pid')}); stop it with `factory down`")
            return
        started = time.monotonic()
        state = start_service(home, port=port, host=host, mlflow=mlflow, dags_folder=dags_folder,
                              timeout=timeout, init=do_init)
    passwords = ensure_passwords(home)
    _print_summary(state, passwords)
    if mlflow:
        for site, url in state["mlflow"].items():
            with contextlib.suppress(click.ClickException):
                _wait_http(f"{url}/health", 120, f"MLflow {site}")
    if trigger:
        run_id = trigger_first_run(state["url"], passwords)
        if run_id:
            state["first_run"] = {"dag_id": FIRST_DAG, "run_id": run_id,
                                  "triggered_after_s": round(time.monotonic() - started, 1)}
            write_state(home, state)
            click.echo("the collaboration runs on by itself until its first approval gate, the origin's data "
                       "release in stage 2: see `factory approvals --as origin_officer`")
    if detach:
        return
    _supervise(home, state)


@click.command("down")
def down_command() -> None:
    """Stop everything `factory up` started."""
    home = factory_home()
    path = state_file(home)
    state = read_state(home)
    if not state:
        try:
            stale = json.loads(path.read_text())
        except (OSError, ValueError):
            stale = None
        if stale and stale.get("postgres"):
            stop_service(home, stale)
        path.unlink(missing_ok=True)
        click.echo("the factory is not running")
        return
    stop_service(home, state)
    click.echo("the factory is stopped")
