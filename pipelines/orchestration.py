"""`factory run`: the collaboration headless, stage by stage, in the order of conf/stages.yaml.

Two ways, one result:
- against the running deployments (`factory up`; the default when one runs): each site's own
  Airflow is driven through its REST API (`pipelines.service.collaboration`), packages travel
  between sites through the carrier and their asset events start the next DAGs;
- `--embedded` (development and tests): every DAG runs in this process with `dag.test()`, one
  Airflow playing all three sites, and outboxes are handed over between DAGs.

At an approval gate the run waits; with `--approve` each gate is answered through Airflow's REST
API as the officer configured for it in conf/, never by skipping or force-marking the gate.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import click
from rich.console import Console

from pipelines.config import PROJECT_ROOT, SITES, load_config
from pipelines.workspace import SitePaths, WorkspaceError, factory_home

console = Console(stderr=True)

class RunFailed(RuntimeError):
    pass


def parse_stages(text: str) -> list[int]:
    """Stage numbers from `1`, `1-3`, `1,4`: each one listed in conf/stages.yaml `order`."""
    known = [s.stage for s in load_config().stages.order]
    stages: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            start, end = int(lo), int(hi or lo)
        except ValueError:
            raise click.BadParameter(f"{text!r}: use stage numbers like 1, 1-3 or 1,4") from None
        if start > end or start not in known or end not in known:
            raise click.BadParameter(f"{text!r}: stages are {known[0]} to {known[-1]}")
        stages.update(n for n in known if start <= n <= end)
    return sorted(stages)


def prepare_airflow(home: Path) -> None:
    """Point this process at the embedded Airflow and make sure its database exists."""
    from pipelines.service.airflow_env import apply_airflow_environment

    apply_airflow_environment(home)
    plugins = str(PROJECT_ROOT / "plugins")
    if plugins not in sys.path:
        sys.path.insert(0, plugins)
    from airflow.utils import db

    marker = home / "airflow" / ".db-ready"
    if not marker.exists():
        with console.status("preparing Airflow's metadata database"):
            db.initdb()
        marker.touch()


def load_dags() -> dict:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags"))
    if bag.import_errors:
        raise RunFailed("DAG import errors: " + "; ".join(f"{k}: {v}" for k, v in bag.import_errors.items()))
    return bag.dags


class GateAnswerer(threading.Thread):
    """Answers waiting approval gates of one DAG run as the configured officers (through the REST API)."""

    def __init__(self, dag_id: str, home: Path) -> None:
        super().__init__(daemon=True, name=f"approve-{dag_id}")
        self.dag_id, self.home = dag_id, home
        self.stop = threading.Event()
        self.answered: list[dict] = []
        self.error: Exception | None = None

    def run(self) -> None:
        from pipelines.service.headless import answer_pending_as_configured

        logging.getLogger("http.access").setLevel(logging.WARNING)  # one line per poll otherwise
        try:
            while not self.stop.wait(2.0):
                self.answered += answer_pending_as_configured(self.dag_id, self.home, console=console)
        except Exception as error:  # surfaced by the runner
            self.error = error


def run_dag(dag, *, approve: bool, home: Path, conf: dict | None = None) -> str:
    answerer = GateAnswerer(dag.dag_id, home) if approve else None
    if answerer:
        answerer.start()
    else:
        from pipelines.service.headless import print_pending_hint

        threading.Thread(target=print_pending_hint, args=(dag.dag_id, home, console), daemon=True).start()
    started = time.monotonic()
    try:
        dag_run = dag.test(run_conf=conf)
    finally:
        if answerer:
            answerer.stop.set()
            answerer.join(timeout=5)
    if answerer and answerer.error:
        raise RunFailed(f"{dag.dag_id}: answering a gate failed: {answerer.error}")
    state = str(getattr(dag_run, "state", "unknown"))
    console.print(f"{dag.dag_id}: {state} in {time.monotonic() - started:.1f} s")
    if "success" not in state:
        raise RunFailed(f"{dag.dag_id} ended {state}; see the task logs above")
    return state


def run_stages(stages: list[int], *, approve: bool, home: Path | None = None) -> None:
    home = (home or factory_home()).resolve()
    try:
        SitePaths.of("supplier", home).require()
    except WorkspaceError as error:
        raise RunFailed(str(error)) from None
    prepare_airflow(home)
    dags = load_dags()
    for stage in stages:
        if skipped := load_config().stages.skipped_release(stage):
            console.rule(f"stage {stage}: skipped ({skipped})")
            continue
        if load_config().stages.collaboration_of(stage) == "federated":
            run_federated_stage(stage, dags, approve=approve, home=home)
            continue
        for dag_id in load_config().stages.stage(stage).dags:
            if dag_id not in dags:
                raise RunFailed(f"DAG {dag_id} is not loaded (FACTORY_SITE may exclude its site)")
            console.rule(f"stage {stage}: {dag_id}")
            run_dag(dags[dag_id], approve=approve, home=home)
            deliver_embedded(home)


def run_federated_stage(stage: int, dags: dict, *, approve: bool, home: Path) -> None:
    """A federated stage (conf/stages.yaml `collaboration`): the coordinator DAG starts a training, then
    each round the participant DAG(s) answer and the coordinator DAG collects, until it finishes and
    releases the model; last the stage's model intake DAGs (`..._model_intake` of its order) run."""
    from pipelines.fileio import read_json

    conf = load_config().stages
    plan, entry = conf.federated_stage(stage), conf.stage(stage)
    coordinator, participant = f"stage_{stage}_federated_coordinator", f"stage_{stage}_federated_participant"
    for dag_id in (coordinator, participant):
        if dag_id not in dags:
            raise RunFailed(f"DAG {dag_id} is not loaded (FACTORY_SITE may exclude its site)")
    record = SitePaths.of(entry.site, home).state_dir / "federated" / f"stage-{stage}.json"
    console.rule(f"stage {stage} (federated): {coordinator} starts a training")
    run_dag(dags[coordinator], approve=approve, home=home, conf={"start": True})
    deliver_embedded(home)
    # secure aggregation adds its setup (keys, shares) before round 1 and may add an unmask exchange a round
    exchanges = plan.rounds + (2 + plan.rounds if plan.secure_aggregation else 0)
    for number in range(1, exchanges + 1):
        console.rule(f"stage {stage} (federated): exchange {number}")
        run_dag(dags[participant], approve=approve, home=home)
        deliver_embedded(home)
        run_dag(dags[coordinator], approve=approve, home=home, conf={"start": False})  # collect, go on
        deliver_embedded(home)
        if read_json(record).get("status") == "finished":
            break
    else:
        raise RunFailed(f"stage {stage}: the federated training did not finish in {plan.rounds} rounds "
                        f"({exchanges} exchanges)")
    for dag_id in (d for d in entry.dags if d.endswith("_model_intake")):
        console.rule(f"stage {stage}: {dag_id}")
        run_dag(dags[dag_id], approve=approve, home=home)
        deliver_embedded(home)


def deliver_embedded(home: Path) -> None:
    """Carry what each site's outbox holds to its recipient (media hand-over with every check), as the
    carriers between three deployments would; the embedded run plays all three sites in one process."""
    from pipelines.carrier.media import hand_over

    for sender in SITES:
        for recipient in SITES:
            if recipient != sender and (result := hand_over(SitePaths.of(sender, home), SitePaths.of(recipient, home))):
                console.print(f"carried {len(result['files'])} package(s) {sender} -> {recipient}")


def drive_deployments(home: Path, states: dict[str, dict], stages: list[int], *, approve: bool,
                      timeout: float) -> None:
    """Run `stages` across the running deployments, through their REST APIs."""
    from pipelines.service.collaboration import DriveFailed, drive

    absent = [site for site in SITES if site not in states]
    console.print(f"driving the deployments of {', '.join(states)} through their Airflow APIs"
                  + (f" ({', '.join(absent)} not running here)" if absent else ""))
    started = time.time()
    try:
        collaboration = drive(home, states, stages, approve=approve, timeout=timeout, say=console.print)
    except DriveFailed as error:
        raise RunFailed(str(error)) from None
    console.print(f"stages {stages[0]}-{stages[-1]} done in {time.time() - started:.0f} s "
                  f"({len(collaboration.answered)} gate(s) answered)")


@click.command("run")
@click.option("--stages", "stages_text", default="1-8", show_default=True, help="Stages to run, e.g. 1, 1-3, 1,4.")
@click.option("--approve", is_flag=True, help="Answer each approval gate as the officer configured for it.")
@click.option("--embedded", is_flag=True,
              help="Run every DAG in this process with dag.test() (one Airflow for all sites; development and "
                   "tests) instead of driving the running deployments.")
@click.option("--timeout", type=float, default=1800.0, show_default=True,
              help="Seconds to wait for one DAG run of a deployment to start or to finish.")
@click.option("--report/--no-report", default=True, show_default=True,
              help="Print the accuracy report of every site at the end.")
def run_command(stages_text: str, approve: bool, embedded: bool, timeout: float, report: bool) -> None:
    """Run collaboration stages headless through Airflow, in order."""
    stages = parse_stages(stages_text)
    home = factory_home()
    states = {}
    if not embedded:
        from pipelines.service.processes import running_sites

        states = running_sites(home)
        if not states:
            console.print("no site deployment is running (start them with `make run` or `factory up`): running "
                          "embedded instead, every DAG in this process (`--embedded`)")
    try:
        if states:
            drive_deployments(home, states, stages, approve=approve, timeout=timeout)
        else:
            run_stages(stages, approve=approve)
    except RunFailed as error:
        click.echo(f"run failed: {error}", err=True)
        sys.exit(1)
    if report:
        from pipelines.report import print_summary

        print_summary(home)
