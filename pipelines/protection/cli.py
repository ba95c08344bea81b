"""`factory watermark verify` and `factory watermark key`: is a model, or a service, marked with
this site's watermark key, and for which recipient?"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from pipelines.workspace import SitePaths, WorkspaceError

TOKEN_ENV = "FACTORY_SERVING_TOKEN"


def _paths(site: str) -> SitePaths:
    try:
        return SitePaths.of(site)
    except WorkspaceError as exc:
        raise click.ClickException(str(exc)) from None


def _target(paths: SitePaths, model: str) -> Path:
    """A model directory or ONNX file; else a model this site registered (M5, NAME/VERSION, NAME@ALIAS)."""
    path = Path(model)
    if path.exists():
        return path
    from pipelines.learning import registry

    try:
        return registry.resolve_model(paths, model).model_dir
    except Exception as exc:  # noqa: BLE001 - a name that is neither a path nor a registered model
        raise click.ClickException(f"{model!r} is neither a model file or directory nor a model of "
                                   f"{paths.site}: {exc}") from None


@click.group("watermark")
def watermark() -> None:
    """Watermarks of the models this site trains (pipelines.protection.watermark)."""


@watermark.command("verify")
@click.argument("model", required=False)
@click.option("--site", default="supplier", type=click.Choice(["supplier", "origin", "destination"]),
              show_default=True, help="the site whose watermark key verifies")
@click.option("--endpoint", default=None, help="a `factory serve` URL to query as a black box (labels only)")
@click.option("--token", default=None, help=f"the endpoint's client token (default: ${TOKEN_ENV})")
@click.option("--sensor-id", default=None, help="the sensor the endpoint's ODD approves (context.sensor_id)")
@click.option("--classes", "n_classes", default=10, type=click.IntRange(2, None), show_default=True,
              help="number of classes of the endpoint's model")
@click.option("--mark", default="owner", show_default=True, help="owner or recipient:SITE")
@click.option("--level", default=None, type=click.FloatRange(0, 1, min_open=True),
              help="p-value below which the mark is verified (default: conf/protection.yaml)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def verify_command(model: str | None, site: str, endpoint: str | None, token: str | None, sensor_id: str | None,
                   n_classes: int, mark: str, level: float | None, as_json: bool) -> None:
    """Verify MODEL (a model directory, an ONNX file or a registered model) or --endpoint carries MARK.

    Prints the trigger accuracy and the p-value against chance; exits 1 when not verified."""
    from pipelines.protection import watermark as wm

    if (model is None) == (endpoint is None):
        raise click.UsageError("give either MODEL or --endpoint URL")
    paths = _paths(site)
    try:
        key = wm.load_key(paths)
        problem = None
    except wm.WatermarkError as exc:
        key, problem = None, str(exc)
    if endpoint is not None:
        result = wm.verify_endpoint(endpoint, key, mark, token=token or os.environ.get(TOKEN_ENV),
                                    sensor_id=sensor_id, n_classes=n_classes, level=level)
    else:
        result = wm.verify(_target(paths, model), key, mark, level=level)
    if problem:
        result["reason"] = problem
    _print(result, as_json)
    if not result["verified"]:
        raise SystemExit(1)


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    accuracy = "n/a" if result["trigger_accuracy"] is None else f"{result['trigger_accuracy']:.4f}"
    p_value = "n/a" if result["p_value"] is None else f"{result['p_value']:.3e}"
    click.echo(f"mark {result['mark']} (key {result['key_id']}): "
               f"{'VERIFIED' if result['verified'] else 'NOT VERIFIED'}")
    click.echo(f"  trigger accuracy {accuracy} on {result['triggers']} triggers, p-value {p_value} "
               f"(level {result['level']:g})")
    click.echo(f"  {result['reason']}")


@watermark.command("key")
@click.option("--site", default="supplier", type=click.Choice(["supplier", "origin", "destination"]),
              show_default=True)
def key_command(site: str) -> None:
    """Print the id (fingerprint) of the site's watermark key; the key itself never leaves keys/."""
    from pipelines.protection import watermark as wm

    try:
        click.echo(wm.load_key(_paths(site)).key_id)
    except wm.WatermarkError as exc:
        raise click.ClickException(str(exc)) from None
