"""`factory run` against the running deployments: the collaboration driven through each site's own
Airflow REST API, as that site's people.

For each stage of conf/stages.yaml `order`, each of its DAGs in turn: find the deployment that has
the DAG (each Airflow loads only its own site's DAGs); a DAG without a schedule is triggered there
as the site's engineer (or a run already under way is followed); a DAG scheduled on assets is
waited for: its run starts when the site's inbox service posts the "package arrived" event of a
package the carrier delivered, or when an earlier DAG of the same site registered a model. While
a run goes on, every approval gate of the selected stages waiting in any deployment is answered
(`--approve`) as the officer it is assigned to, through that gate's own Airflow, or announced
with the command that answers it. A failed task stops the run with the DAG, the task and its log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from pipelines.config import load_config
from pipelines.service.approvals import ApprovalError, answer_gate, pending_gates, token
from pipelines.workspace import SitePaths

ACTIVE = ("queued", "running")
FINISHED = ("success", "failed")
# Seconds between a gate's park and the scheduler's reading of its process's exit, beyond the supervisor's
# interval: the supervisor looks at its process every `[workers] min_heartbeat_interval` seconds (the
# deployment's service record says how many: `factory up` sets 1; Airflow's default, 5, where the record does
# not say), also after the process closed its sockets. Measured on the 2-core machine with 1 (the scheduler
# log's "TaskInstance Finished ... state=awaiting_input" against the task log's "Pausing task as
# AWAITING_INPUT", six gates of a collaboration run): 0.06-1.24 s after the park. With 5 it was up to 5.1 s,
# which is why a 1 s margin once failed in CI.
PARK_EXIT_MARGIN = 1.0
# While a run is followed, its state and its deployment's gates are read every poll; its task instances (a
# failed task while the run goes on) and the other deployments' gates every this many seconds. Each read costs
# a deployment's API server 10-30 ms of a core that the steps would otherwise have.
LOOK_WIDE_EVERY = 2.0


class DriveFailed(RuntimeError):
    """The collaboration cannot go on; the message names the site, DAG, run and task."""


def _now() -> float:
    return time.time()


def iso_seconds(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def site_user(site: str, *, role: str | None = None, airflow_roles: tuple[str, ...] = ()) -> str:
    """The first user of `site` in conf/users.yaml with this factory role or one of these Airflow roles."""
    users = load_config().site_users(site)
    for wanted in airflow_roles or (None,):
        for user in users:
            if (role is None or role in user.roles) and (wanted is None or user.airflow_role == wanted):
                return user.id
    raise DriveFailed(f"conf/users.yaml has no user of {site} with "
                      f"{f'role {role}' if role else 'Airflow role ' + ' or '.join(airflow_roles)}")


class Deployment:
    """One site's running Airflow, reached through its REST API as the site's own users."""

    def __init__(self, site: str, state: dict[str, Any], home: Path):
        self.site = site
        self.url = state["url"]
        self.paths = SitePaths.of(site, home)
        try:
            self.passwords = json.loads(Path(state["passwords_file"]).read_text())
        except OSError as error:
            raise DriveFailed(f"cannot read the passwords of {site}'s users ({state['passwords_file']}): "
                              f"{error.strerror}") from None
        self.operator = site_user(site, airflow_roles=("OP", "ADMIN"))
        self.http = httpx.Client(base_url=self.url, timeout=60.0)
        self._tokens: dict[str, str] = {}
        self.heartbeats: list[float] = []  # distinct scheduler heartbeats seen, oldest first
        self.park_exit_seconds = float(state.get("task_exit_seconds") or 5.0) + PARK_EXIT_MARGIN

    def observe_scheduler(self) -> None:
        """Note the scheduler's latest heartbeat (`/api/v2/monitor/health`)."""
        try:
            health = self.http.get("/api/v2/monitor/health").json()
        except (httpx.HTTPError, ValueError):
            return
        beat = iso_seconds((health.get("scheduler") or {}).get("latest_scheduler_heartbeat"))
        if beat is not None and (not self.heartbeats or beat > self.heartbeats[-1]):
            self.heartbeats.append(beat)
            del self.heartbeats[:-4]

    def settled(self, parked_at: float | None) -> bool:
        """Has the scheduler taken in the exit of the process that parked a gate?

        `parked_at` (server time) is no later than the park, and hardly earlier: the later of the gate's
        request (its HITL detail's `created_at`, written 4-12 ms before the park; a later try of the task
        keeps its first request's row) and the start of the task's current try.

        Airflow 3.3.2 with the LocalExecutor fails a gate answered too early: the answer resumes the
        task, the scheduler queues it again and only then reads the "success" of the process that
        parked it, for the same try, and marks the resumed task failed ("Task killed!"). The scheduler
        reads executor events in every loop and records a heartbeat at the end of a loop every
        `scheduler_heartbeat_sec`, so two heartbeats later than the process's exit (`park_exit_seconds`
        after the park at the latest) mean a whole loop has read its events."""
        if parked_at is None:
            return False
        return len([beat for beat in self.heartbeats if beat > parked_at + self.park_exit_seconds]) >= 2

    def watch_settle(self, parked_at: float | None, *, within: float = 0.5, every: float = 0.05,
                     patience: float = 3.0) -> bool:
        """Once the scheduler's latest heartbeat is within `within` seconds of the gate's bound, read its
        heartbeats every `every` seconds until the gate has `settled` (True), or for `patience` seconds
        (False: a stalled scheduler; the next poll looks again). Answers a gate about a poll sooner."""
        if parked_at is None or not self.heartbeats or self.heartbeats[-1] < parked_at + self.park_exit_seconds - within:
            return False
        deadline = time.monotonic() + patience
        while not self.settled(parked_at):
            if time.monotonic() > deadline:
                return False
            time.sleep(every)
            self.observe_scheduler()
        return True

    def close(self) -> None:
        self.http.close()

    def pending_gates(self) -> list[dict[str, Any]]:
        """The gates waiting in this Airflow, as the site's operator sees them (one login, kept while
        its token is valid: the driver polls this every `poll` seconds)."""
        user = self.operator
        for attempt in range(2):
            if user not in self._tokens:
                self._tokens[user] = token(self.http, user, self.password(user))
            try:
                return pending_gates(self.http, user, self.password(user), access_token=self._tokens[user])
            except ApprovalError as error:
                if error.status != 401 or attempt:
                    raise
                self._tokens.pop(user)  # expired: log in again
        return []

    def request(self, method: str, path: str, user: str | None = None, **kwargs: Any) -> httpx.Response:
        user = user or self.operator
        for attempt in range(2):
            if user not in self._tokens:
                try:
                    self._tokens[user] = token(self.http, user, self.password(user))
                except ApprovalError as error:
                    raise DriveFailed(f"{self.site}: {error}") from None
            try:
                response = self.http.request(method, path, headers={"Authorization": f"Bearer {self._tokens[user]}"},
                                             **kwargs)
            except httpx.TransportError as error:
                raise DriveFailed(f"{self.site}'s Airflow at {self.url} does not answer: {error}") from None
            if response.status_code != 401 or attempt:
                return response
            self._tokens.pop(user)  # expired: log in again
        return response

    def get(self, path: str, user: str | None = None, **params: Any) -> dict[str, Any]:
        response = self.request("GET", path, user, params=params or None)
        if response.status_code >= 300:
            raise DriveFailed(f"{self.site}: GET {path} answered HTTP {response.status_code} {response.text[:300]}")
        return response.json()

    def password(self, user: str) -> str:
        if user not in self.passwords:
            raise DriveFailed(f"{user} is not a user of {self.site}'s Airflow ({self.paths.airflow_home}/passwords.json)")
        return self.passwords[user]

    def has_dag(self, dag_id: str) -> dict[str, Any] | None:
        response = self.request("GET", f"/api/v2/dags/{dag_id}")
        return response.json() if response.status_code == 200 else None

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns", order_by="-run_after", limit=50)["dag_runs"]

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=1000)["task_instances"]

    def log_path(self, ti: dict[str, Any]) -> Path:
        """Where Airflow's default log template writes this task try (AIRFLOW__LOGGING__BASE_LOG_FOLDER)."""
        path = (self.paths.airflow_home / "logs" / f"dag_id={ti['dag_id']}" / f"run_id={ti['dag_run_id']}"
                / f"task_id={ti['task_id']}")
        if ti.get("map_index", -1) >= 0:
            path = path / f"map_index={ti['map_index']}"
        return path / f"attempt={max(ti.get('try_number') or 1, 1)}.log"


class Collaboration:
    """Follows the stages' DAG runs across the deployments and answers their gates."""

    def __init__(self, deployments: dict[str, Deployment], *, approve: bool, timeout: float,
                 say: Callable[[str], None], poll: float = 0.5, conf: dict[str, dict] | None = None):
        self.deployments, self.approve, self.timeout, self.say, self.poll = deployments, approve, timeout, say, poll
        self.conf = conf or {}
        self.since = _now()  # runs queued from here on belong to this drive
        self.followed: set[tuple[str, str]] = set()
        self.answered: list[dict[str, Any]] = []
        self.gates_seen: dict[tuple[str, str, str, str, int], Any] = {}
        self.announced: set[tuple[str, str, str]] = set()
        self.first_gate_at: float | None = None
        self.gate_dags: set[str] = set()
        self.gate_parked = False  # a gate of this drive waits to be answered: poll it twice as often
        self.timings: list[dict[str, Any]] = []

    # -- where a DAG lives

    def locate(self, dag_id: str) -> tuple[Deployment, dict[str, Any]]:
        """The deployment whose Airflow has `dag_id` (waiting while the DAG processors parse)."""
        deadline = time.monotonic() + min(self.timeout, 300.0)
        while True:
            for deployment in self.deployments.values():
                if (dag := deployment.has_dag(dag_id)) is not None:
                    return deployment, dag
            if time.monotonic() > deadline:
                raise DriveFailed(f"no running deployment ({', '.join(self.deployments)}) has the DAG {dag_id}: is its "
                                  "site started (`factory up --site S`), and did the DAG parse (its dag-processor log)?")
            time.sleep(self.poll)

    # -- gates

    def tend_gates(self, only: Deployment | None = None) -> None:
        """Answer (or announce) every settled gate of the selected stages' runs of this drive, in every
        deployment or `only` in one."""
        self.gate_parked = False
        for deployment in [only] if only is not None else self.deployments.values():
            try:
                gates = deployment.pending_gates()
            except ApprovalError as error:
                raise DriveFailed(f"{deployment.site}: listing approval gates failed: {error}") from None
            if any(gate["state"] == "awaiting_input" for gate in gates):
                deployment.observe_scheduler()  # only while a gate is parked: `settled` counts its heartbeats
            for gate in gates:
                if gate["dag_id"] not in self.gate_dags or not self._ours(deployment, gate["dag_id"], gate["run_id"]):
                    continue
                key = (deployment.site, gate["dag_id"], gate["run_id"], gate["task_id"], gate["map_index"])
                if self.first_gate_at is None:
                    self.first_gate_at = _now()
                if gate["state"] != "awaiting_input":  # its process has not parked it yet
                    continue
                seen = self.gates_seen.get(key)
                if seen is None or seen[0] != gate["try_number"]:  # a new try: note when it parked
                    marks = [iso_seconds(gate.get("created_at")), iso_seconds(gate.get("started_at"))]
                    seen = self.gates_seen[key] = (gate["try_number"], max((m for m in marks if m is not None),
                                                                            default=None))
                if self.approve and not (deployment.settled(seen[1]) or deployment.watch_settle(seen[1])):
                    self.gate_parked = True
                    continue
                self._answer(deployment, gate)

    def _ours(self, deployment: Deployment, dag_id: str, run_id: str) -> bool:
        if (deployment.site, run_id) in self.followed:
            return True
        queued = iso_seconds(deployment.run(dag_id, run_id).get("queued_at"))
        return queued is not None and queued >= self.since

    def _answer(self, deployment: Deployment, gate: dict[str, Any]) -> None:
        where = f"{gate['task_id']} of {gate['dag_id']} run {gate['run_id']} at {deployment.site}"
        officer = (gate["assigned_users"] or [None])[0]
        if not self.approve:
            if (deployment.site, gate["run_id"], gate["task_id"]) not in self.announced:
                self.announced.add((deployment.site, gate["run_id"], gate["task_id"]))
                self.say(f"waiting for approval at {deployment.site}: {gate['subject']}\n  answer in {deployment.site}'s "
                         f"Airflow ({deployment.url}, Browse → Required Actions) or with: factory approve --as "
                         f"{officer or 'OFFICER'} --dag {gate['dag_id']} --run {gate['run_id']} --task {gate['task_id']}")
            return
        if officer is None:
            raise DriveFailed(f"gate {where} has no assigned approver; refusing to answer it")
        try:
            answer_gate(deployment.http, officer, deployment.password(officer), gate["dag_id"], gate["run_id"],
                        gate["task_id"], approve=True, comment="approved by factory run --approve",
                        map_index=gate["map_index"])
        except ApprovalError as error:
            if error.status == 409:  # answered meanwhile (by a person in the UI): that answer stands
                return
            raise DriveFailed(f"answering gate {where} as {officer} failed: {error}") from None
        self.say(f"  approved {gate['task_id']} ({gate['dag_id']}) as {officer} in {deployment.site}'s Airflow")
        self.answered.append({**gate, "site": deployment.site, "answered_by": officer, "answered_at": _now()})

    # -- runs

    def _trigger(self, deployment: Deployment, dag_id: str, *, fresh: bool = False) -> str:
        """A new run of `dag_id` (with this drive's conf for it), or, unless `fresh`, one under way."""
        for run in () if fresh else deployment.runs(dag_id):
            if run["state"] in ACTIVE and (deployment.site, run["dag_run_id"]) not in self.followed:
                self.say(f"{dag_id} at {deployment.site}: following run {run['dag_run_id']}, already under way")
                self.since = min(self.since, iso_seconds(run.get("queued_at")) or self.since)
                return run["dag_run_id"]
        engineer = site_user(deployment.site, role="engineer")
        response = deployment.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", engineer,
                                      json={"logical_date": None, "conf": self.conf.get(dag_id, {})})
        if response.status_code >= 300:
            raise DriveFailed(f"triggering {dag_id} at {deployment.site} as {engineer} failed: "
                              f"HTTP {response.status_code} {response.text[:300]}")
        run_id = response.json()["dag_run_id"]
        self.say(f"{dag_id} at {deployment.site}: triggered as {engineer}, run {run_id}")
        return run_id

    def _await_run(self, deployment: Deployment, dag_id: str, watch: tuple[str, ...] = ()) -> str:
        """The first run of an asset-scheduled DAG queued in this drive (or still under way). While
        waiting, a failed run (of this drive) of a DAG in `watch` fails the drive at once."""
        started = time.monotonic()
        self.say(f"{dag_id} at {deployment.site}: waiting for its run (started by an asset event)")
        while True:
            for run in reversed(deployment.runs(dag_id)):  # oldest first
                if (deployment.site, run["dag_run_id"]) in self.followed:
                    continue
                queued = iso_seconds(run.get("queued_at"))
                if run["state"] in ACTIVE or (queued is not None and queued >= self.since):
                    self.say(f"{dag_id} at {deployment.site}: run {run['dag_run_id']} ({run.get('run_type')})")
                    return run["dag_run_id"]
            for watched in watch:
                self._fail_on_failed_runs(watched)
            if time.monotonic() - started > self.timeout:
                raise DriveFailed(
                    f"no run of {dag_id} started at {deployment.site} within {self.timeout:.0f} s. It starts on an "
                    f"asset event: a package delivered to {deployment.site}'s inbox (see `factory outbox list --site "
                    "SENDER` for what is pending and why) or a model registered by an earlier DAG of the site")
            self.tend_gates()
            time.sleep(self.poll / 2 if self.gate_parked else self.poll)

    def _fail_on_failed_runs(self, dag_id: str) -> None:
        """Raise the failure of a run of `dag_id` queued in this drive, at whichever deployment has it."""
        for deployment in self.deployments.values():
            if deployment.has_dag(dag_id) is None:
                continue
            for run in deployment.runs(dag_id):
                queued = iso_seconds(run.get("queued_at"))
                if run["state"] == "failed" and queued is not None and queued >= self.since:
                    raise self._failure(deployment, dag_id, run["dag_run_id"],
                                        deployment.task_instances(dag_id, run["dag_run_id"]))

    def _failure(self, deployment: Deployment, dag_id: str, run_id: str, tis: list[dict[str, Any]]) -> DriveFailed:
        failed = [ti for ti in tis if ti.get("state") == "failed"] or [
            ti for ti in tis if ti.get("state") == "upstream_failed"]
        if not failed:
            return DriveFailed(f"{dag_id} run {run_id} at {deployment.site} failed (no failed task recorded); "
                               f"see {deployment.url}/dags/{dag_id}/runs/{run_id}")
        lines = [f"{dag_id} run {run_id} at {deployment.site} failed:"]
        for ti in failed:
            path = deployment.log_path(ti)
            lines.append(f"  task {ti['task_id']} {ti['state']} (try {ti.get('try_number')}); log: {path}")
            last = _last_error(path)
            if last:
                lines.append(f"    {last}")
        return DriveFailed("\n".join(lines))

    def follow(self, deployment: Deployment, dag_id: str, run_id: str) -> str:
        """Wait for the run to succeed, answering gates meanwhile (`LOOK_WIDE_EVERY` says how often what)."""
        self.followed.add((deployment.site, run_id))
        started = time.monotonic()
        looked_wide = started  # when the run's task instances and the other deployments' gates were last read
        while True:
            run = deployment.run(dag_id, run_id)
            tis: list[dict[str, Any]] = []
            wide = time.monotonic() - looked_wide >= LOOK_WIDE_EVERY
            if run["state"] == "failed" or wide:
                tis = deployment.task_instances(dag_id, run_id)
            if wide:
                looked_wide = time.monotonic()
            if run["state"] == "failed" or any(ti.get("state") == "failed" for ti in tis):
                raise self._failure(deployment, dag_id, run_id, tis)
            if run["state"] == "success":
                seconds = time.monotonic() - started
                self.timings.append({"site": deployment.site, "dag_id": dag_id, "run_id": run_id,
                                     "seconds": round(seconds, 1)})
                self.say(f"{dag_id} at {deployment.site}: success in {seconds:.1f} s")
                return run["state"]
            if time.monotonic() - started > self.timeout:
                tis = deployment.task_instances(dag_id, run_id)
                waiting = sorted({ti["task_id"] for ti in tis if ti.get("state") not in ("success", "skipped")})
                raise DriveFailed(f"{dag_id} run {run_id} at {deployment.site} did not finish within "
                                  f"{self.timeout:.0f} s; unfinished tasks: {', '.join(waiting)}")
            self.tend_gates(None if wide else deployment)
            time.sleep(self.poll / 2 if self.gate_parked else self.poll)

    def start(self, dag_id: str, stage: int | None = None) -> tuple[Deployment, str]:
        """The deployment that has `dag_id` and its run of this drive: triggered there if the DAG has no
        schedule, else the run an asset event started (gates of `gate_dags` are answered meanwhile)."""
        deployment, dag = self.locate(dag_id)
        if stage is not None:
            self.say(f"stage {stage}: {dag_id} at {deployment.site}")
        manual = dag.get("timetable_summary") is None
        return deployment, self._trigger(deployment, dag_id) if manual else self._await_run(deployment, dag_id)

    def run_stages(self, stages: list[int]) -> None:
        config = load_config().stages
        self.gate_dags = {dag for number in stages if not config.skipped_release(number)
                          for dag in config.stage(number).dags}
        for number in stages:
            if skipped := config.skipped_release(number):
                self.say(f"stage {number}: skipped ({skipped})")
                continue
            if config.collaboration_of(number) == "federated":
                self.run_federated(number)
                continue
            for dag_id in config.stage(number).dags:
                deployment, run_id = self.start(dag_id, number)
                self.follow(deployment, dag_id, run_id)

    def run_federated(self, number: int) -> None:
        """A federated stage: start a training at the coordinator (param `start`); the rounds then run
        on the packages' asset events in each site's own Airflow (participant, then coordinator, per
        round); the stage ends with its model intake at the partners, which the last round's release
        starts. A failed round's run fails the drive."""
        coordinator, participant = f"stage_{number}_federated_coordinator", f"stage_{number}_federated_participant"
        deployment, _ = self.locate(coordinator)
        self.say(f"stage {number} (federated): {coordinator} at {deployment.site} starts a training")
        self.conf[coordinator] = {"start": True}
        run_id = self._trigger(deployment, coordinator, fresh=True)  # not a poll run that happens to be under way
        self.follow(deployment, coordinator, run_id)
        for dag_id in (d for d in load_config().stages.stage(number).dags if d.endswith("_model_intake")):
            target, _ = self.locate(dag_id)
            run_id = self._await_run(target, dag_id, watch=(coordinator, participant))
            self.follow(target, dag_id, run_id)


def _last_error(path: Path) -> str | None:
    """The last line of a task log that names an error, if the log is readable here."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if any(word in line for word in ("Error", "error", "Exception", "killed")):
            text = line.strip()
            try:
                record = json.loads(text)
                text = str(record.get("event") or record.get("error_detail") or text)
            except ValueError:
                pass
            return text[:400]
    return None


def drive(home: Path, states: dict[str, dict[str, Any]], stages: list[int], *, approve: bool,
          timeout: float, say: Callable[[str], None], conf: dict[str, dict] | None = None) -> Collaboration:
    """Run `stages` across the running deployments (`states`: the sites' service records)."""
    deployments = {site: Deployment(site, state, home) for site, state in states.items()}
    collaboration = Collaboration(deployments, approve=approve, timeout=timeout, say=say, conf=conf)
    try:
        collaboration.run_stages(stages)
    finally:
        for deployment in deployments.values():
            deployment.close()
    return collaboration
