"""`factory step NAME --site SITE --params-json JSON`: the container entry point of a step pod."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

XCOM_RETURN = Path("/airflow/xcom/return.json")


@click.command("step")
@click.argument("name")
@click.option("--site", required=True, help="The site the step runs at.")
@click.option("--params-json", default="{}", help="Step parameters as a JSON object.")
@click.option("--run-id", default="manual", help="The DAG run this step belongs to.")
@click.option("--dag-id", default="manual")
def step_command(name: str, site: str, params_json: str, run_id: str, dag_id: str) -> None:
    """Run one step and print its result as JSON (also written for the pod's XCom sidecar)."""
    from pipelines.steps import StepContext, StepError, run_step
    from pipelines.workspace import WorkspaceError

    try:
        params = json.loads(params_json)
    except json.JSONDecodeError as error:
        raise click.BadParameter(f"not JSON: {error}", param_hint="--params-json") from None
    if not isinstance(params, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--params-json")
    try:
        ctx = StepContext.for_site(site, run_id=run_id, dag_id=dag_id, actor=os.environ.get("FACTORY_ACTOR"))
        ctx.paths.require()
        result = run_step(name, ctx, **params)
    except (StepError, WorkspaceError) as error:
        click.echo(f"step {name} failed: {error}", err=True)
        sys.exit(1)
    text = json.dumps(result, sort_keys=True, default=str)
    if XCOM_RETURN.parent.is_dir():
        XCOM_RETURN.write_text(text)
    click.echo(text)
