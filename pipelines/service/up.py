"""`factory up` / `factory down`: each site a deployment of its own, on one machine.

`up --site S` starts site S's deployment, everything in S's home (`FACTORY_HOME/S`):
its own Airflow (api-server, scheduler, dag-processor, triggerer; AIRFLOW_HOME and metadata
database in the site's home, or with `FACTORY_DB=postgres` databases of its own in the local
cluster), loading only S's DAGs (FACTORY_SITE) and knowing only S's users plus its service
account; its own MLflow UI; its inbox service (`factory inbox serve`, which posts "package
arrived" asset events to this Airflow) and its outbox pusher (`factory outbox push`).
`up` without --site starts the three deployments one after another and triggers stage 1 at the
supplier. Every process gets its own process group and the deployment's marker
`FACTORY_SERVICE_ID` in its environment, recorded with its start time in the site's service
record (`<site home>/service/service.json`); `down [--site S]` (or Ctrl-C on `up`) stops exactly those.
"""

from __future__ import annotations

import contextlib
import fcntl
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
from pipelines.service.processes import (
    alive,
    marked,
    ours,
    read_state,
    recorded_state,
    running_sites,
    start_ticks,
    state_file,
    write_state,
)
from pipelines.workspace import SitePaths, WorkspaceError, factory_home

FIRST_DAG = "stage_1_initial_training"
FIRST_SITE = "supplier"
FIRST_DAG_USER = "supplier_engineer"
AIRFLOW_PROCESSES = ("api-server", "scheduler", "dag-processor", "triggerer")
# Seconds between the outbox pusher's passes (a pass reads one outbox record file): a package waits
# half of it on average before it is pushed.
PUSH_INTERVAL = 0.5


def _module(name: str) -> list[str]:
    """`python -m NAME` with this process's interpreter: the same installation, and no console script
    whose first line names an interpreter another user might not be able to run."""
    return [sys.executable, "-m", name]


def factory_command() -> list[str]:
    """The `factory` CLI of this installation (the same interpreter as this process)."""
    return _module("pipelines.cli")


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


def conf_with_free_ports(folder: Path) -> Path:
    """A copy of conf/ in `folder` whose sites use free ports (Airflow and MLflow: any free one at
    start; inbox: a fixed free one that the partners' inbox URLs name): three deployments beside
    others on one machine (tests, benchmarks). Use it with FACTORY_CONF."""
    import shutil

    import yaml

    from pipelines.config import conf_dir, parse_yaml

    shutil.copytree(conf_dir(), folder)
    sites = parse_yaml((folder / "sites.yaml").read_text())
    for site in SITES:
        port = free_port()
        entry = sites["sites"][site]
        entry["deployment"] = {"airflow_port": 0, "mlflow_port": 0}
        entry["carrier"] = entry.get("carrier", {}) | {"listen_port": port, "inbox_url": f"https://127.0.0.1:{port}"}
    (folder / "sites.yaml").write_text(yaml.safe_dump(sites))
    return folder


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


# --- processes -----------------------------------------------------------------------------------

def _spawn(name: str, command: list[str], env: dict[str, str], logs: Path, cwd: Path) -> dict[str, Any]:
    log_path = logs / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd)
    return {"name": name, "pid": process.pid, "pgid": process.pid, "started": start_ticks(process.pid),
            "started_at": time.time(), "log": str(log_path), "command": command}


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


def deployment_pids(state: dict[str, Any]) -> list[int]:
    """Every live process of a deployment: those it started, their groups, and any marked process
    that left its group (Airflow task processes)."""
    processes = state.get("processes", [])
    found = [p["pid"] for p in processes if ours(p)] + _group_members({p["pgid"] for p in processes if ours(p)})
    if state.get("service_id"):
        found += _marked_pids(state["service_id"])
    return sorted({pid for pid in found if alive(pid)})


def stop_deployment(home: Path, site: str, state: dict[str, Any], *, quiet: bool = False,
                    timeout: float = 20.0) -> None:
    """Stop every process the site's deployment started: their groups, then any stray marked process."""
    marker = state.get("service_id", "")
    say = (lambda *_: None) if quiet else click.echo
    groups = [process for process in state.get("processes", []) if ours(process)]
    for process in groups:
        say(f"{site}: stopping {process['name']} (pid {process['pid']})")
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
    current = recorded_state(home, site)
    if current and current.get("service_id") == marker:
        state_file(home, site).unlink(missing_ok=True)


def _stop_postgres_if_unused(home: Path, say=click.echo) -> None:
    if running_sites(home):
        return
    from pipelines.service.postgres import Cluster

    cluster = Cluster(home)
    if (cluster.data / "postmaster.pid").exists():
        say("stopping postgres")
        cluster.stop()


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


def _check_alive(processes: list[dict[str, Any]] | None) -> None:
    for process in processes or []:
        if not ours(process):
            raise click.ClickException(f"{process['name']} exited during start; see {process['log']}")


def _wait_http(url: str, timeout: float, label: str, processes: list[dict[str, Any]] | None = None,
               since: float | None = None) -> float:
    """Poll `url` until it answers 200; show progress; return the seconds since `since` (wall clock;
    default: now)."""
    import httpx

    started = time.time() if since is None else since
    while True:
        elapsed = time.time() - started
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                _done(f"{label}: up after {elapsed:.0f} s")
                return elapsed
        except httpx.HTTPError:
            pass
        _check_alive(processes)
        if elapsed > timeout:
            raise click.ClickException(f"{label} did not answer at {url} within {timeout:.0f} s")
        _progress(f"waiting for {label} ... {elapsed:.0f} s")
        time.sleep(1.0)


def _wait_tcp(host: str, port: int, timeout: float, label: str, processes: list[dict[str, Any]]) -> None:
    """Wait until something accepts connections on host:port (the inbox service speaks only mutual TLS)."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2.0):
            return
        _check_alive(processes)
        if time.monotonic() - started > timeout:
            raise click.ClickException(f"{label} does not listen on {host}:{port} after {timeout:.0f} s; "
                                       f"see {processes[0]['log']}")
        time.sleep(0.5)


def trigger_first_run(url: str, passwords: dict[str, str], *, wait: float = 180.0) -> str | None:
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
                      "parse: see the supplier's dag-processor log); nothing triggered")
                return None
            _progress(f"waiting for the DAG {FIRST_DAG} to be parsed ... {elapsed:.0f} s")
            time.sleep(2.0)
        response = client.post(f"/api/v2/dags/{FIRST_DAG}/dagRuns", headers=headers,
                               json={"logical_date": None, "conf": {}})
        if response.status_code >= 300:
            _done(f"triggering {FIRST_DAG} failed: HTTP {response.status_code} {response.text[:300]}")
            return None
        run_id = response.json()["dag_run_id"]
        _done(f"triggered {FIRST_DAG} at the supplier as {FIRST_DAG_USER}: run {run_id}")
        return run_id


def _ensure_workspace(home: Path, sites: list[str]) -> None:
    missing = []
    for site in sites:
        try:
            SitePaths.of(site, home).require()
        except WorkspaceError:
            missing.append(site)
    if not missing:
        return
    from pipelines.init import init_workspace
    from pipelines.profiles import ProfileError

    click.echo(f"initialising the workspace under {home} (factory init) ...")
    try:
        init_workspace(home)
    except ProfileError as error:
        raise click.ClickException(f"{error}\n(sites {', '.join(missing)} are missing: run `factory init --profile "
                                   "FILE` with the workspace's profile first)") from None


def _print_summary(state: dict[str, Any]) -> None:
    from pipelines.service.airflow_env import airflow_users

    site = state["site"]
    click.echo("")
    click.echo(f"{site} ({load_config().sites[site].display_name}): its own deployment, home {state['site_home']}")
    click.echo(f"  Airflow UI   {state['url']}   (Browse → Required Actions for approvals)")
    if state.get("mlflow"):
        click.echo(f"  MLflow UI    {state['mlflow']}")
    if state.get("inbox"):
        click.echo(f"  inbox        {state['inbox']}   (mutual TLS; partners push sealed packages here)")
    if state.get("postgres"):
        click.echo(f"  PostgreSQL   127.0.0.1:{state['postgres']['port']}, databases {', '.join(state['postgres']['databases'])}")
    identity = load_config().service_identities[site].id
    users = [f"{user} ({role}{', service account' if user == identity else ''})" for user, role in airflow_users(site)]
    click.echo(f"  users        {', '.join(users)}")
    click.echo(f"  passwords    {state['passwords_file']}   (mode 0600)")


# --- starting one deployment -----------------------------------------------------------------------

@contextlib.contextmanager
def _start_lock(home: Path, site: str):
    folder = SitePaths.of(site, home).service_dir
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "start.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _sqlite_wal(path: Path) -> None:
    """WAL lets the API answer reads while the scheduler writes (the file keeps the mode)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(path, timeout=60)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


def start_deployment(
    home: Path,
    site: str,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    mlflow: bool = True,
    carrier: bool = True,
    dags_folder: Path | None = None,
    timeout: float = 300.0,
    push_interval: float = PUSH_INTERVAL,
    wait: bool = True,
) -> dict[str, Any]:
    """Start `site`'s deployment (the caller holds its start lock); return its service record.

    With `wait=False` the processes are started and `wait_ready` waits for them later (so several
    deployments come up side by side)."""
    from pipelines.carrier.settings import airflow_url_env, carrier_settings, inbox_url_env
    from pipelines.carrier.tls import partners
    from pipelines.service.airflow_env import airflow_environment, passwords_file

    paths = SitePaths.of(site, home)
    deployment = load_config().sites[site].deployment
    marker = uuid.uuid4().hex
    logs = paths.service_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Nothing of another deployment leaks in: no other site's database URL, no shared Airflow home.
    base_env = {key: value for key, value in os.environ.items()
                if not key.startswith(("FACTORY_MLFLOW_URI_", "FACTORY_AIRFLOW_DB_URL", "AIRFLOW_HOME"))}
    base_env.update({"FACTORY_HOME": str(home), "FACTORY_SITE": site, "FACTORY_SERVICE_ID": marker})
    state: dict[str, Any] = {"service_id": marker, "site": site, "home": str(home), "site_home": str(paths.root),
                             "processes": [], "started_at": time.time(), "supervisor_pid": os.getpid(),
                             "uid": os.getuid()}
    try:
        db_url = None
        if os.environ.get("FACTORY_DB", "sqlite").lower() in ("postgres", "postgresql"):
            from pipelines.service.postgres import PostgresError, database_names, start_cluster

            click.echo(f"{site}: starting PostgreSQL 15 (databases of its own) ...")
            try:
                _, pg_port, pg_env = start_cluster(home, site)
            except PostgresError as error:
                raise click.ClickException(str(error)) from None
            state["postgres"] = {"port": pg_port, "databases": database_names(site)}
            base_env.update(pg_env)
            db_url = pg_env["FACTORY_AIRFLOW_DB_URL"]
        api_port = free_port(deployment.airflow_port if port is None else port)
        if port and api_port != port:
            click.echo(f"{site}: port {port} is busy; using {api_port}")
        env = {**base_env, **airflow_environment(home, site=site, port=api_port, dags_folder=dags_folder,
                                                 db_url=db_url)}
        if not env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite"):
            env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS", None)  # SQLite's, from a caller's env
        if carrier:  # release steps push their package at once to a partner inbox named here (carrier.push.push_now)
            for partner in partners(paths):
                if (target := carrier_settings(partner)).transport == "https" and target.inbox_url:
                    env.setdefault(inbox_url_env(partner), target.inbox_url)
        env.setdefault("AIRFLOW__CORE__PARALLELISM", "4")
        env.setdefault("AIRFLOW__API__WORKERS", "1")
        # A heartbeat every loop, at most every 0.1 s (default 5): `factory run --approve` answers a gate two
        # heartbeats after its process's exit can have reached the scheduler (pipelines.service.collaboration.
        # Deployment.settled). Measured with 6 gates a run: answered 2.3-2.4 s after the request with 0.1 s,
        # 2.7-3.1 s with 0.25 s. The price: an idle scheduler takes 2.3 % of a core more (one small UPDATE of
        # its job row a loop).
        env.setdefault("AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC", "0.1")
        # An idle scheduler looks for work every 0.1 s (default 1): a task's successor, a run started by an asset
        # event, a finished run are taken up sooner (median gap between a task's end and its successor's queueing
        # 0.17 s with 0.25). The price: an idle scheduler takes 11.5 % of a core (5.8 % with 0.25; measured on
        # the 2-core machine); set the variable to trade latency back for CPU.
        env.setdefault("AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME", "0.1")
        # The DAG processor parses every file once at start, then a file again when it changes (its default
        # `file_parsing_sort_mode` modified_time queues a changed file at once) or after this interval
        # (default 30 s). Re-parsing ~25 unchanged files every 30 s in each of three deployments took a
        # third of a core and held the SQLite write lock while the steps ran.
        env.setdefault("AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL", "600")
        # A task's supervisor waits up to this many seconds (default 5) between looks at its task process, also
        # after the process has closed its sockets: with 5, every task held its executor slot (PARALLELISM above)
        # ~5 s after it finished, and a parked gate's exit reached the scheduler that much later. With 1 it
        # also heartbeats each running task once a second.
        env.setdefault("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "1")
        # The driver's bound on how long after a gate parks its process's exit is reported (Deployment.settled).
        state["task_exit_seconds"] = float(env["AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL"])
        state["url"] = f"http://localhost:{api_port}"
        state["passwords_file"] = str(passwords_file(home, site))
        write_state(home, site, state)
        click.echo(f"{site}: migrating its Airflow database (airflow db migrate) ...")
        migrate = subprocess.run([*_module("airflow"), "db", "migrate"], env=env, capture_output=True, text=True,
                                 cwd=paths.root)
        if migrate.returncode != 0:
            (logs / "db-migrate.log").write_text(migrate.stdout + migrate.stderr)
            raise click.ClickException(f"{site}: airflow db migrate failed; see {logs / 'db-migrate.log'}")
        if env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite:///"):
            _sqlite_wal(Path(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///")))
        commands = {
            "api-server": [*_module("airflow"), "api-server", "--host", host, "--port", str(api_port),
                           "--workers", "1"],
            # The scheduler forks the task processes: it imports what steps use first (pipelines.service.preload).
            "scheduler": [*_module("pipelines.service.preload"), "scheduler"],
            "dag-processor": [*_module("airflow"), "dag-processor"],
            "triggerer": [*_module("airflow"), "triggerer"],
        }
        for name, command in commands.items():
            state["processes"].append(_spawn(name, command, env, logs, paths.root))
        if mlflow:
            paths.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
            mlflow_port = free_port(deployment.mlflow_port)
            uri = base_env.get(f"FACTORY_MLFLOW_URI_{site.upper()}") or paths.mlflow_uri
            command = [*_module("mlflow"), "server", "--backend-store-uri", uri,
                       "--default-artifact-root", paths.mlflow_artifacts.as_uri(),
                       "--host", host, "--port", str(mlflow_port), "--workers", "1"]
            # The server's job runner (huey consumers for GenAI jobs) costs ~1 GB; unused here.
            mlflow_env = {**base_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            state["processes"].append(_spawn("mlflow", command, mlflow_env, logs, paths.root))
            state["mlflow"] = f"http://localhost:{mlflow_port}"
        if carrier:
            settings = carrier_settings(site)
            # The inbox posts "package arrived" asset events to this deployment's Airflow, as the site's
            # service account (its password is in this Airflow home's passwords.json: pipelines.carrier.events).
            carrier_env = {**base_env, airflow_url_env(site): f"http://{_client_host(host)}:{api_port}"}
            state["processes"].append(_spawn("inbox", [*factory_command(), "inbox", "serve", "--site", site],
                                             carrier_env, logs, paths.root))
            state["processes"].append(_spawn(
                "outbox-pusher", [*factory_command(), "outbox", "push", "--site", site,
                                  "--interval", f"{push_interval:g}"], carrier_env, logs, paths.root))
            state["inbox"] = f"https://{_client_host(settings.listen_host)}:{settings.listen_port}"
        write_state(home, site, state)
        if wait:
            wait_ready(home, state, timeout)
        return state
    except BaseException:
        stop_deployment(home, site, state, quiet=True)
        raise


def _warm_execution_api(url: str) -> None:
    """One request to the task execution API (its public health route), so that the API server builds
    that API's versioned routes now. Airflow 3.3's execution API (a Cadwyn app) builds them on its first
    request, which blocks the server for 3-8 s; unwarmed, that request is the first task's `/run` call,
    which times out after `[workers] execution_api_timeout` (5 s) and is retried."""
    import httpx

    with contextlib.suppress(httpx.HTTPError):
        httpx.get(f"{url}/execution/health", timeout=120.0)


def wait_ready(home: Path, state: dict[str, Any], timeout: float) -> None:
    """Wait for the deployment's Airflow API and inbox service; record how long it took."""
    site = state["site"]
    _wait_http(f"{state['url']}/api/v2/monitor/health", timeout + time.time() - state["started_at"],
               f"{site}: Airflow API and UI", [p for p in state["processes"] if p["name"] in AIRFLOW_PROCESSES],
               since=state["started_at"])
    _warm_execution_api(state["url"])
    if state.get("inbox"):
        from urllib.parse import urlsplit

        parts = urlsplit(state["inbox"])
        _wait_tcp(parts.hostname, parts.port, 60.0, f"{site}: inbox service",
                  [p for p in state["processes"] if p["name"] == "inbox"])
    state["ready_at"] = time.time()
    state["seconds_to_ui"] = round(state["ready_at"] - state["started_at"], 1)
    write_state(home, site, state)


def _supervise(home: Path, states: dict[str, dict[str, Any]]) -> None:
    """Stay in the foreground until Ctrl-C or `factory down`; a deployment whose Airflow process died
    is stopped (the others go on). Exits 1 when one did."""
    def _terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    warned: set[tuple[str, str]] = set()
    failed = False
    live = dict(states)
    try:
        while live:
            time.sleep(1.0)
            for site, state in list(live.items()):
                current = read_state(home, site)
                if not current or current.get("service_id") != state["service_id"]:
                    click.echo(f"{site}: its deployment was stopped")
                    live.pop(site)
                    continue
                for process in state["processes"]:
                    if ours(process) or (site, process["name"]) in warned:
                        continue
                    warned.add((site, process["name"]))
                    if process["name"] in AIRFLOW_PROCESSES:
                        click.echo(f"{site}: {process['name']} exited; see {process['log']}. Stopping {site}.")
                        stop_deployment(home, site, state)
                        live.pop(site)
                        failed = True
                        break
                    click.echo(f"{site}: {process['name']} exited; see {process['log']} (its Airflow keeps running)")
    except KeyboardInterrupt:
        click.echo("\nstopping ...")
        for site, state in live.items():
            stop_deployment(home, site, state)
    _stop_postgres_if_unused(home)
    if failed:
        sys.exit(1)


# --- commands ------------------------------------------------------------------------------------

@click.command("up")
@click.option("--site", type=click.Choice(SITES), default=None,
              help="start only this site's deployment (default: all three, one after another)")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="API/UI port of the site's Airflow, with --site (default: conf/sites.yaml deployment; "
                   "0: any free port; a busy one is replaced)")
@click.option("--host", default="127.0.0.1", show_default=True, help="address the servers listen on")
@click.option("--detach", is_flag=True, help="start and return instead of staying in the foreground")
@click.option("--mlflow/--no-mlflow", default=True, show_default=True, help="the site's MLflow UI")
@click.option("--carrier/--no-carrier", default=True, show_default=True,
              help="the site's inbox service and outbox pusher")
@click.option("--push-interval", type=click.FloatRange(min=0.5), default=PUSH_INTERVAL, show_default=True,
              help="seconds between the outbox pusher's passes")
@click.option("--init/--no-init", "do_init", default=True, show_default=True,
              help="run `factory init` when the workspace is missing")
@click.option("--trigger/--no-trigger", default=None,
              help=f"trigger a first {FIRST_DAG} run at the supplier (default: yes without --site)")
@click.option("--dags-folder", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="DAGs to load instead of the project's dags/")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="seconds to wait for each UI")
def up_command(site, port, host, detach, mlflow, carrier, push_interval, do_init, trigger, dags_folder,
               timeout) -> None:
    """Start the sites' deployments: per site its own Airflow, MLflow, users, inbox and pusher."""
    from pipelines.service.airflow_env import ensure_passwords

    if port is not None and site is None:
        raise click.UsageError("--port sets one site's port: use it with --site")
    home = factory_home()
    sites = [site] if site else list(SITES)
    if do_init:
        _ensure_workspace(home, sites)
    started = time.time()
    states: dict[str, dict[str, Any]] = {}
    try:
        for name in sites:
            with _start_lock(home, name):
                running = read_state(home, name)
                if running:
                    click.echo(f"{name} is already running at {running.get('url')} (started by pid "
                               f"{running.get('supervisor_pid')}); stop it with `factory down --site {name}`")
                    continue
                states[name] = start_deployment(home, name, port=port, host=host, mlflow=mlflow, carrier=carrier,
                                                dags_folder=dags_folder, timeout=timeout,
                                                push_interval=push_interval, wait=False)
        for state in states.values():
            wait_ready(home, state, timeout)
    except BaseException:
        for name, state in states.items():
            stop_deployment(home, name, state, quiet=True)
        _stop_postgres_if_unused(home, say=lambda *_: None)
        raise
    for state in states.values():
        _print_summary(state)
    if states:
        click.echo("")
        click.echo("Stop with Ctrl-C here, or `make stop` / `factory down [--site S]` from another shell.")
    for name, state in states.items():
        if state.get("mlflow"):
            with contextlib.suppress(click.ClickException):
                _wait_http(f"{state['mlflow']}/health", 120, f"{name}: MLflow UI")
    if (trigger if trigger is not None else site is None) and FIRST_SITE in states:
        supplier = states[FIRST_SITE]
        run_id = trigger_first_run(supplier["url"], ensure_passwords(home, FIRST_SITE))
        if run_id:
            supplier["first_run"] = {"dag_id": FIRST_DAG, "run_id": run_id, "triggered_at": time.time(),
                                     "triggered_after_s": round(time.time() - started, 1)}
            write_state(home, FIRST_SITE, supplier)
            click.echo("the collaboration runs on by itself, site to site through the carrier, until its first "
                       "approval gate: the origin's data release in stage 2 (`factory approvals --as origin_officer`)")
    if detach or not states:
        return
    _supervise(home, states)


@click.command("down")
@click.option("--site", type=click.Choice(SITES), default=None, help="stop only this site's deployment")
def down_command(site) -> None:
    """Stop what `factory up` started (all sites' deployments, or one)."""
    home = factory_home()
    stopped = []
    for name in [site] if site else SITES:
        state = read_state(home, name)
        if state:
            stop_deployment(home, name, state)
            stopped.append(name)
        else:
            state_file(home, name).unlink(missing_ok=True)  # a stale record of processes long gone
    _stop_postgres_if_unused(home)
    if stopped:
        click.echo(f"stopped: {', '.join(stopped)}")
    else:
        click.echo(f"{site or 'the factory'} is not running")
