"""`factory contribution revoke --owner SITE --dataset ID`: withdraw a contribution.

Triggers the owner's `contribution_revocation_request_<owner>` DAG (`pipelines.steps.revocation`):
against the owner's running deployment through its REST API (the run is then carried on by the
sites' own Airflows: the request package wakes the supplier's `contribution_revocation`, whose
compliance officer answers in Required Actions, and its notices wake the holders'
`contribution_revocation_notice_<site>`), or `--embedded`, every DAG of the flow in this process
with `dag.test()` and packages handed over between them (development and tests; `--approve`
answers the officer's gate as the officer configured for it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipelines.config import SITES
from pipelines.workspace import SitePaths, WorkspaceError, factory_home

OWNERS = tuple(site for site in SITES if site != "supplier")  # the supplier trains; the others contribute


def request_dag(owner: str) -> str:
    return f"contribution_revocation_request_{owner}"


def _pending_notices(home: Path) -> list[str]:
    """The sites with a revocation notice in their inbox that no run has opened yet."""
    from pipelines.steps import StepContext
    from pipelines.steps.exchange import _pending_packages
    from pipelines.steps.revocation import NOTICE_KIND

    return [site for site in OWNERS
            if _pending_packages(StepContext(site=site, paths=SitePaths.of(site, home)), NOTICE_KIND)]


def run_embedded(home: Path, owner: str, dataset: str, *, approve: bool) -> list[str]:
    """The whole flow in this process: the owner's request, the supplier's decision, the holders' notices.
    Returns the DAG ids run, in order."""
    from pipelines.orchestration import deliver_embedded, load_dags, prepare_airflow, run_dag

    prepare_airflow(home)
    dags = load_dags()
    ran = [request_dag(owner)]
    run_dag(dags[request_dag(owner)], approve=approve, home=home, conf={"dataset": dataset})
    deliver_embedded(home)
    from pipelines.steps import StepContext
    from pipelines.steps.exchange import _pending_packages
    from pipelines.steps.revocation import REQUEST_KIND

    if _pending_packages(StepContext(site="supplier", paths=SitePaths.of("supplier", home)), REQUEST_KIND):
        ran.append("contribution_revocation")
        run_dag(dags["contribution_revocation"], approve=approve, home=home)
        deliver_embedded(home)
        for site in _pending_notices(home):
            ran.append(f"contribution_revocation_notice_{site}")
            run_dag(dags[f"contribution_revocation_notice_{site}"], approve=approve, home=home)
    return ran


def trigger(home: Path, state: dict, owner: str, dataset: str, user: str | None) -> str:
    """Trigger the owner's request DAG in its running deployment as `user` (default: its engineer)."""
    from pipelines.service.collaboration import Deployment, site_user

    deployment = Deployment(owner, state, home)
    try:
        user = user or site_user(owner, role="engineer")
        response = deployment.request("POST", f"/api/v2/dags/{request_dag(owner)}/dagRuns", user,
                                      json={"logical_date": None, "conf": {"dataset": dataset}})
    finally:
        deployment.close()
    if response.status_code >= 300:
        raise click.ClickException(f"triggering {request_dag(owner)} at {owner} as {user} failed: "
                                   f"HTTP {response.status_code} {response.text[:300]}")
    return response.json()["dag_run_id"]


@click.group("contribution")
def contribution() -> None:
    """A data owner's contributions to models trained elsewhere."""


@contribution.command("revoke")
@click.option("--owner", required=True, type=click.Choice(OWNERS), help="The site that owns the dataset.")
@click.option("--dataset", required=True, help="site/name@md5, name@md5 or a name (its latest version).")
@click.option("--as", "user", default=None, help="Trigger as this user of the owner's Airflow (default: its engineer).")
@click.option("--embedded", is_flag=True, help="Run the whole flow in this process (development and tests).")
@click.option("--approve", is_flag=True, help="With --embedded: answer the supplier officer's gate as configured.")
def revoke(owner: str, dataset: str, user: str | None, embedded: bool, approve: bool) -> None:
    """Withdraw DATASET: models trained on it are retrained without it and their old versions revoked."""
    from pipelines.orchestration import RunFailed
    from pipelines.service.processes import running_sites

    home = factory_home()
    try:
        SitePaths.of(owner, home).require()
    except WorkspaceError as error:
        raise click.ClickException(str(error)) from None
    states = {} if embedded else running_sites(home)
    if not embedded and owner not in states:
        raise click.ClickException(f"{owner}'s deployment is not running (start it with `factory up --site {owner}`), "
                                   "or run the flow in this process with --embedded")
    if embedded:
        try:
            ran = run_embedded(home, owner, dataset, approve=approve)
        except RunFailed as error:
            click.echo(f"revocation failed: {error}", err=True)
            sys.exit(1)
        click.echo(f"ran {', '.join(ran)}")
        if len(ran) == 1:
            click.echo(f"nothing was sent: {owner} never released {dataset} (see the run's log)")
        return
    run_id = trigger(home, states[owner], owner, dataset, user)
    click.echo(f"{request_dag(owner)} triggered at {owner} (run {run_id}); the supplier's contribution_revocation "
               "runs when the request arrives and waits for its compliance officer (Required Actions)")
