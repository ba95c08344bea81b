"""The full eight-stage collaboration through Airflow (approvals answered through the REST API)
versus the same training and evaluation steps called directly in one process.

Two ways to run the collaboration:
- embedded (default): every DAG in this process with `dag.test()`, one Airflow for the three sites;
  prints the share of the run per kind of work (step functions timed in this process);
- `--deployments`: the three sites' own deployments (`factory up`), driven through their REST APIs
  as `factory run` does; prints the seconds from `factory up` to the first approval gate, the PSS
  memory of the three deployments (after the run, and the peak sampled every 2 s), the share of the
  run per kind of task (task instance durations from each site's Airflow), and the floor: an empty
  Airflow task on the same deployment.
`--scale N` (repeatable) builds the workspaces with `factory init --scale N`: one line of figures per scale.

`--floor RUNS`: only the supplier's deployment, only the floor DAG: where an empty task's time goes.

    .venv/bin/python benchmarks/collaboration_overhead.py
    .venv/bin/python benchmarks/collaboration_overhead.py --deployments --scale 1800 --scale 5000 --scale 10000
    .venv/bin/python benchmarks/collaboration_overhead.py --floor 8

Where the floor goes (`--deployments`, the supplier's deployment after the run, medians of 5; 0.21 s trigger
to done, it was 0.70 s before the SQLite `now()` rule below):

    trigger -> run started (scheduler loop)                             0.05 s  (0.39-0.55 s on SQLite's now())
    run started -> task queued (scheduler loop)                         0.01 s
    task queued -> task running (worker, supervisor fork, /run call)    0.02 s
    task running -> DAG file parsed in the task process                 0.05 s  (steps' imports preloaded)
    parsed -> task body done, XCom, success call                        0.02 s
    task done -> run marked success (scheduler loop)                    0.05 s

What cost time, and what was done (pipelines.service.up sets the Airflow options; all are options Airflow 3.3
reads):

    first task of each deployment: its /run call took 3.5-9.4 s      the execution API (a Cadwyn app) builds its
      (Cadwyn builds its versioned routes on the first request)      routes at `factory up` (wait_ready)
    every task's supervisor noticed its process's exit up to 5 s     [workers] min_heartbeat_interval 1
      late: slot held, a parked gate's exit read that late
    the DAG processors re-parsed ~25 unchanged files every 30 s      [dag_processor] min_file_process_interval 600
    every run started up to 1 s late (median 0.47 s): the            on SQLite the scheduler compiles now() with
      scheduler starts a queued run once run_after <= now(),         milliseconds (airflow_env.
      and SQLite's CURRENT_TIMESTAMP has whole seconds               sqlite_now_in_milliseconds); Postgres: 0.02 s
    a task's successor waited for the idle scheduler (0.17 s)        scheduler_idle_sleep_time 0.1 (0.09 s); an
                                                                     idle scheduler then takes 11.5 % of a core
    a package waited for the outbox pusher's pass                    the release step pushes it itself
    every step pushed each key of its result as an XCom of its own   run_local_step: multiple_outputs=False, one
      besides return_value (a `dict` return annotation does that):     XCom a task
      ~6 API calls a task, read by nothing
    `factory run` read every site's gates and the followed run's     the followed run's state and its site's gates
      task instances every poll: ~20 s of the API servers' CPU in     every poll, the rest every 2 s
      a 120 s run, taken from the steps                              (collaboration.LOOK_WIDE_EVERY)
    each task process parsed conf/ with PyYAML's pure-Python         libyaml's safe loader (config.parse_yaml);
      loader (~25 ms) and imported the DAG files' helpers (~20 ms)    the helpers preloaded in the scheduler
    a parked gate was answered 3.6 s after its park (the Airflow     bound = park + 1 s + 1 s, the park taken from
      3.3.2 race: collaboration.Deployment.settled)                  the gate's request or its try's start (was:
                                                                     when the driver first saw it); two heartbeats
                                                                     later, watched closely; heartbeat every 0.1 s:
                                                                     2.3-2.4 s (0.25 s: 2.7-3.1 s); an idle
                                                                     scheduler then takes 2.3 % of a core more

Measured at the end (one command per line, each with its own direct baseline; SQLite; the 2-core machine):

    scale     run      in steps   orchestration   of which gates   ratio to direct training + evaluation
    default   112.8 s  82.0 s     30.8 s  27.3 %  18.0 s           10.8x
    5000      122.1 s  90.7 s     31.4 s  25.7 %  17.8 s            8.1x
    15000     139.9 s  112.2 s    27.7 s  19.8 %  17.5 s            6.0x
    40000     209.8 s  180.4 s    29.4 s  14.0 %  17.9 s            3.6x

The default line with a 0.25 s heartbeat instead: 107.7 s, 76.2 s in steps, 31.5 s (29.3 %), gates 20.5 s.

What is left (~30 s at every scale): the six gates' wait for their answer, ~18 s (~2.4 s each from the request:
the scheduler reads a parked gate's exit 0.07-1.2 s after the park; the driver answers two scheduler heartbeats
after park + 2 s); the rest, ~12 s, is Airflow's per-task cost over 67 step tasks and 18 runs (~0.1 s scheduler
loop + ~0.05 s worker start between tasks, ~0.15 s inside each task outside its step: parse, XCom, state calls).
Time inside the steps varies by 10 s between runs of the same code on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))  # factory_plugin.steps.STEP_FINISHED

from _timing import KIND_OF_STEP, fresh_home, shares, step_timer, warm_imports  # noqa: E402

FACTORY = [sys.executable, "-m", "pipelines.cli"]
STAGES = list(range(1, 9))
FLOOR_DAG = '''"""Benchmark floor: one task that does nothing, on the same deployment as the stages."""
from airflow.sdk import dag, task


@dag(dag_id="floor_probe", schedule=None, catchup=False, tags=["benchmark"])
def floor_probe():
    @task
    def nothing() -> None:
        return None

    nothing()


floor_probe()
'''

# (site, stage, profile, datasets, test sets): the seven trained models, each on the data its site
# holds before any exchange (so slightly fewer records than the collaborative runs see).
PLAN = (
    ("supplier", "M1", "initial", ["train"], {"supplier_test": "test"}),
    ("supplier", "M3", "collaborative", ["train"], {"supplier_test": "test"}),
    ("supplier", "M5", "export", ["train"], {"supplier_test": "test"}),
    ("supplier", "M6", "collaborative", ["train"], {"supplier_test": "test"}),
    ("supplier", "M8", "collaborative", ["train"], {"supplier_test": "test"}),
    ("origin", "M4", "local", ["shared", "private", "export_authorized"], {"origin_test": "test"}),
    ("destination", "M7", "local", ["shared", "private"], {"destination_test": "test"}),
)


def direct(home: Path) -> float:
    """Only training + evaluation: the work the collaboration exists for, with no exchange around it."""
    from pipelines.steps import StepContext, run_step
    from pipelines.workspace import SitePaths

    start = time.perf_counter()
    for site, stage, profile, datasets, test_sets in PLAN:
        ctx = StepContext(site=site, paths=SitePaths.of(site, home), run_id="bench", dag_id="direct")
        trained = run_step("train_model", ctx, stage=stage, profile=profile, datasets=datasets)
        run_step("evaluate_model", ctx, trained=trained, test_sets=test_sets)
    return time.perf_counter() - start


def embedded(scale: int | None) -> None:
    from pipelines.orchestration import run_stages

    airflow_home, direct_home = fresh_home("bench-collab-af-", scale), fresh_home("bench-collab-direct-", scale)
    os.environ["FACTORY_HOME"] = str(airflow_home)
    warm_imports()
    with step_timer() as totals:
        start = time.perf_counter()
        run_stages(STAGES, approve=True, home=airflow_home)
        t_airflow = time.perf_counter() - start
    t_direct = direct(direct_home)
    print(f"training + evaluation called directly : {t_direct:8.2f} s")
    print(f"eight stages through Airflow          : {t_airflow:8.2f} s")
    print(f"ratio                                 : {t_airflow / t_direct:8.2f}x")
    print("share of the Airflow run:")
    for kind, seconds in sorted(shares(totals, t_airflow).items(), key=lambda kv: -kv[1]):
        print(f"  {kind:32s} {seconds:8.2f} s  {100 * seconds / t_airflow:5.1f} %")


# --- three deployments ------------------------------------------------------------------------------

def _dags_with_floor(folder: Path) -> Path:
    from pipelines.config import PROJECT_ROOT

    folder.mkdir()
    for dag_file in (PROJECT_ROOT / "dags").glob("*.py"):
        (folder / dag_file.name).symlink_to(dag_file)
    (folder / "floor_probe.py").write_text(FLOOR_DAG)
    return folder


def _pss_mib(states: dict) -> float:
    from pipelines.service.up import deployment_pids

    total = 0
    for state in states.values():
        for pid in deployment_pids(state):
            try:
                total += sum(int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                             if line.startswith("Pss:"))
            except OSError:
                pass
    return total / 1024


class PeakPss(threading.Thread):
    def __init__(self, states: dict):
        super().__init__(daemon=True)
        self.states, self.peak, self.halt = states, 0.0, threading.Event()

    def run(self) -> None:
        while not self.halt.wait(2.0):
            self.peak = max(self.peak, _pss_mib(self.states))


def _kind(task_id: str) -> str:
    name = task_id.rsplit(".", 1)[-1]
    if name.endswith("_approval"):
        return "approval gates (until answered)"
    if name.startswith("validate_"):
        return "validation + sanitization"
    return KIND_OF_STEP.get(name, f"other tasks ({name})")


def _step_interval(log_file: Path) -> tuple[float, float] | None:
    """(start, end) in epoch seconds of the step inside one task try, from the line
    factory_plugin.steps logs when the step returns; None when it did not return."""
    from factory_plugin.steps import STEP_FINISHED

    from pipelines.service.collaboration import iso_seconds

    finished = re.compile(re.escape(STEP_FINISHED).replace("%s", r"\S+").replace("%\\.3f", r"([0-9.]+)"))
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if "finished in" not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        match = finished.fullmatch(str(event.get("event", "")))
        if match:
            end = iso_seconds(event["timestamp"])
            return end - float(match.group(1)), end
    return None


def _union(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _task_shares(home: Path, states: dict, timings: list[dict]) -> tuple[dict, dict, list, dict[str, list[float]]]:
    """Per kind of task: seconds of task instance durations and seconds inside the step functions
    (from each task's log); the intervals of every step on the run's timeline; the gaps between them."""
    from pipelines.service.collaboration import Deployment, iso_seconds

    durations: dict[str, float] = {}
    in_steps: dict[str, float] = {}
    intervals: list[tuple[float, float]] = []
    gaps: dict[str, list[float]] = {label: [] for label in GAPS}
    deployments = {site: Deployment(site, state, home) for site, state in states.items()}
    for entry in timings:
        deployment = deployments[entry["site"]]
        tis = deployment.task_instances(entry["dag_id"], entry["run_id"])
        _run_gaps(deployment.run(entry["dag_id"], entry["run_id"]), tis, gaps)
        for ti in tis:
            if ti.get("duration") is None:
                continue
            kind = _kind(ti["task_id"])
            durations[kind] = durations.get(kind, 0.0) + ti["duration"]
            interval = _step_interval(deployment.log_path(ti))
            if interval:
                in_steps[kind] = in_steps.get(kind, 0.0) + interval[1] - interval[0]
                intervals.append(interval)
    for deployment in deployments.values():
        for gate in deployment.get("/api/v2/dags/~/dagRuns/~/hitlDetails", response_received="true",
                                   limit=1000)["hitl_details"]:
            if (gate["task_instance"]["dag_id"], gate["task_instance"]["dag_run_id"]) in {
                    (t["dag_id"], t["run_id"]) for t in timings if t["site"] == deployment.site}:
                gaps[GATE_GAP].append(iso_seconds(gate["responded_at"]) - iso_seconds(gate["created_at"]))
    return durations, in_steps, intervals, gaps


# The time between the steps, where Airflow moves a run along (from the runs' and task instances' dates).
GATE_GAP = "gate asked -> answered (factory run --approve)"
GAPS = ("run queued -> started (scheduler loop)", "task done -> next task queued (scheduler loop)",
        "task queued -> running (worker, supervisor, /run)", "last task done -> run done (scheduler loop)", GATE_GAP)


def _run_gaps(run: dict, tis: list[dict], gaps: dict[str, list[float]]) -> None:
    from pipelines.service.collaboration import iso_seconds

    done = sorted(end for ti in tis if (end := iso_seconds(ti.get("end_date"))) is not None)
    if iso_seconds(run.get("start_date")) and iso_seconds(run.get("queued_at")):
        gaps[GAPS[0]].append(iso_seconds(run["start_date"]) - iso_seconds(run["queued_at"]))
    for ti in tis:
        queued, started = iso_seconds(ti.get("queued_when")), iso_seconds(ti.get("start_date"))
        if queued is None or started is None:
            continue
        if started >= queued:  # a resumed gate's start is its first try's
            gaps[GAPS[2]].append(started - queued)
        before = [end for end in done if end <= queued]
        if before and not ti["task_id"].endswith("_approval"):
            gaps[GAPS[1]].append(queued - before[-1])
    if done and iso_seconds(run.get("end_date")):
        gaps[GAPS[3]].append(iso_seconds(run["end_date"]) - done[-1])


# The floor's run, phase by phase: (label, from, to) over the timestamps `_floor_marks` reads from the
# run, its task instance and the task's log.
FLOOR_PHASES = (
    ("trigger -> run started (scheduler loop)", "queued_at", "run_start"),
    ("run started -> task queued (scheduler loop)", "run_start", "ti_queued"),
    ("task queued -> task running (worker, supervisor fork, /run call)", "ti_queued", "ti_start"),
    ("task running -> DAG file parsed in the task process", "ti_start", "parsed"),
    ("parsed -> task body done, XCom, success call", "parsed", "ti_end"),
    ("task done -> run marked success (scheduler loop)", "ti_end", "run_end"),
)


def _floor_marks(deployment, run_id: str) -> dict[str, float]:
    from pipelines.service.collaboration import iso_seconds

    run = deployment.run("floor_probe", run_id)
    (ti,) = deployment.task_instances("floor_probe", run_id)
    marks = {"queued_at": iso_seconds(run["queued_at"]), "run_start": iso_seconds(run["start_date"]),
             "ti_queued": iso_seconds(ti.get("queued_when")), "ti_start": iso_seconds(ti["start_date"]),
             "ti_end": iso_seconds(ti["end_date"]), "run_end": iso_seconds(run["end_date"])}
    try:
        for line in deployment.log_path(ti).read_text(errors="replace").splitlines():
            if "Worker startup parse complete" in line:
                marks["parsed"] = iso_seconds(json.loads(line)["timestamp"])
                break
    except (OSError, ValueError):
        pass
    return marks


def _floor(home: Path, state: dict, runs: int = 5) -> tuple[float, float, dict[str, float]]:
    """Median seconds of an empty task's run (trigger to done) and of the task itself, at one deployment,
    and the median of each of FLOOR_PHASES."""
    from pipelines.service.collaboration import Collaboration, Deployment, site_user

    deployment = Deployment(state["site"], state, home)
    collaboration = Collaboration({state["site"]: deployment}, approve=False, timeout=300, say=lambda _: None)
    collaboration.locate("floor_probe")
    run_seconds, task_seconds, phases = [], [], {label: [] for label, _, _ in FLOOR_PHASES}
    for _ in range(runs):
        response = deployment.request("POST", "/api/v2/dags/floor_probe/dagRuns", site_user(state["site"], role="engineer"),
                                      json={"logical_date": None, "conf": {}})
        response.raise_for_status()
        run_id = response.json()["dag_run_id"]
        collaboration.follow(deployment, "floor_probe", run_id)
        marks = _floor_marks(deployment, run_id)
        run_seconds.append(marks["run_end"] - marks["queued_at"])
        task_seconds.append(marks["ti_end"] - marks["ti_start"])
        for label, begin, end in FLOOR_PHASES:
            if marks.get(begin) is not None and marks.get(end) is not None:
                phases[label].append(marks[end] - marks[begin])
    return (statistics.median(run_seconds), statistics.median(task_seconds),
            {label: statistics.median(values) for label, values in phases.items() if values})


def _print_floor(phases: dict[str, float]) -> None:
    print("the floor's run, phase by phase (medians):")
    for label, seconds in phases.items():
        print(f"  {label:66s} {seconds:6.2f} s")


def deployments(scale: int | None) -> None:
    from pipelines.service.collaboration import drive
    from pipelines.service.processes import running_sites
    from pipelines.service.up import conf_with_free_ports

    home, direct_home = fresh_home("bench-collab-3d-", scale), fresh_home("bench-collab-direct-", scale)
    os.environ["FACTORY_CONF"] = str(conf_with_free_ports(home.parent / "conf"))
    os.environ["FACTORY_HOME"] = str(home)
    dags = _dags_with_floor(home.parent / "dags")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW__", "AIRFLOW_HOME"))}
    started = time.time()
    up = subprocess.run([*FACTORY, "up", "--detach", "--no-trigger", "--dags-folder", str(dags)], env=env,
                        capture_output=True, text=True)
    if up.returncode:
        sys.exit(f"factory up failed:\n{up.stdout}\n{up.stderr}")
    t_up = time.time() - started
    try:
        states = running_sites(home)
        peak = PeakPss(states)
        peak.start()
        start = time.perf_counter()
        collaboration = drive(home, states, STAGES, approve=True, timeout=1800, say=lambda _: None)
        t_run = time.perf_counter() - start
        peak.halt.set()
        pss_after = _pss_mib(states)
        durations, in_steps, intervals, gaps = _task_shares(home, states, collaboration.timings)
        floor_run, floor_task, floor_phases = _floor(home, states["supplier"])
    finally:
        subprocess.run([*FACTORY, "down"], env=env, capture_output=True, text=True)
    t_direct = direct(direct_home)
    first_gate = (collaboration.first_gate_at - started) if collaboration.first_gate_at else float("nan")
    print(f"scale {scale or 'default'}: three deployments")
    print(f"factory up (three deployments)        : {t_up:8.2f} s")
    print(f"factory up to the first approval gate : {first_gate:8.2f} s")
    print(f"PSS of the three deployments          : {pss_after:8.0f} MiB after the run, {peak.peak:.0f} MiB peak")
    print(f"training + evaluation called directly : {t_direct:8.2f} s")
    work = _union(intervals)
    print(f"eight stages across the deployments   : {t_run:8.2f} s ({len(collaboration.timings)} DAG runs, "
          f"{len(intervals)} step tasks, {len(collaboration.answered)} gates)")
    print(f"ratio                                 : {t_run / t_direct:8.2f}x")
    print(f"floor: an empty task at the supplier  : {floor_run:8.2f} s trigger to done, {floor_task:.2f} s in the task")
    _print_floor(floor_phases)
    print(f"inside step functions (union in time) : {work:8.2f} s  {100 * work / t_run:5.1f} % of the run")
    print(f"orchestration (the rest)              : {t_run - work:8.2f} s  {100 * (t_run - work) / t_run:5.1f} % of the run")
    gates = durations.get("approval gates (until answered)", 0.0) - in_steps.get("approval gates (until answered)", 0.0)
    print(f"  of which gates waiting for an answer: {gates:8.2f} s; without them {t_run - work - gates:.2f} s, "
          f"{100 * (t_run - work - gates) / t_run:.1f} % of the run")
    print(f"run / time inside the steps           : {t_run / work:8.2f}x (1.0 would be no orchestration at all)")
    print("between the steps: count, seconds in all, median (runs at different sites may overlap):")
    for label, values in gaps.items():
        if values:
            print(f"  {label:50s} {len(values):3d} {sum(values):8.2f} s  {statistics.median(values):6.2f} s")
    print("per kind of task: task instance seconds, of which inside the step (runs at different sites may overlap):")
    for kind, seconds in sorted(durations.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:40s} {seconds:8.2f} s  {in_steps.get(kind, 0.0):8.2f} s in the step")


def floor_only(runs: int) -> None:
    """Only the supplier's deployment, with only the floor DAG: where an empty task's time goes."""
    from pipelines.service.processes import running_sites
    from pipelines.service.up import conf_with_free_ports

    home = fresh_home("bench-floor-")
    os.environ["FACTORY_CONF"] = str(conf_with_free_ports(home.parent / "conf"))
    os.environ["FACTORY_HOME"] = str(home)
    dags = home.parent / "dags"
    dags.mkdir()
    (dags / "floor_probe.py").write_text(FLOOR_DAG)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW__", "AIRFLOW_HOME"))}
    up = subprocess.run([*FACTORY, "up", "--site", "supplier", "--detach", "--no-trigger", "--no-mlflow",
                         "--no-carrier", "--dags-folder", str(dags)], env=env, capture_output=True, text=True)
    if up.returncode:
        sys.exit(f"factory up failed:\n{up.stdout}\n{up.stderr}")
    try:
        floor_run, floor_task, phases = _floor(home, running_sites(home)["supplier"], runs=runs)
    finally:
        subprocess.run([*FACTORY, "down"], env=env, capture_output=True, text=True)
    print(f"floor: an empty task at the supplier  : {floor_run:8.2f} s trigger to done, {floor_task:.2f} s in the task "
          f"(median of {runs})")
    _print_floor(phases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deployments", action="store_true", help="the three sites' own deployments")
    parser.add_argument("--scale", type=int, action="append", help="factory init --scale N (repeatable)")
    parser.add_argument("--floor", type=int, metavar="RUNS",
                        help="only the floor: RUNS empty-task runs on the supplier's deployment alone, phase by phase")
    args = parser.parse_args()
    if args.floor:
        floor_only(args.floor)
        return
    for scale in args.scale or [None]:
        (deployments if args.deployments else embedded)(scale)


if __name__ == "__main__":
    main()
