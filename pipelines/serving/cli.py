"""`factory serve` and `factory drift simulate|check`."""

from __future__ import annotations

import json
from typing import Any

import click
import numpy as np

from pipelines.workspace import SitePaths, WorkspaceError

SHIFTS = ("none", "other-sensor", "noise", "rotation")
OTHER_SENSOR = {"origin": "destination", "destination": "origin", "supplier": "origin"}


def shifted_traffic(paths: SitePaths, shift: str, batches: int, batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """Batches of real digits as the site's sensor sees them (its test partition), shifted by `shift`:
    `none` (in-distribution), `noise` (added Gaussian noise), `rotation` (rotated 30 degrees) or
    `other-sensor` (fresh digits through the other operational site's sensor model)."""
    from scipy import ndimage

    from pipelines.data import builder
    from pipelines.serving.drift import read_rows

    if shift not in SHIFTS:
        raise click.BadParameter(f"unknown shift {shift!r}; choose from {', '.join(SHIFTS)}")
    rng = np.random.default_rng([seed, SHIFTS.index(shift)])
    n = batches * batch_size
    if shift == "other-sensor":
        x, _ = builder.digits()
        rows = builder.SENSORS[OTHER_SENSOR[paths.site]](x[rng.choice(len(x), n, replace=n > len(x))], rng)
    else:
        test = paths.data_dir / "test.parquet"
        if not test.is_file():
            raise WorkspaceError(f"{test} is missing: build the site's data first (`factory init`)")
        base = read_rows(test)
        rows = base[rng.choice(len(base), n, replace=n > len(base))]
        if shift == "noise":
            rows = rows + rng.normal(0.0, 0.2, rows.shape)
        elif shift == "rotation":
            images = ndimage.rotate(rows.reshape(-1, 8, 8), 30.0, axes=(1, 2), reshape=False, order=1)
            rows = images.reshape(-1, 64)
    rows = np.clip(rows, 0.0, 1.0).astype(np.float32)
    return [rows[i * batch_size : (i + 1) * batch_size] for i in range(batches)]


def simulate(paths: SitePaths, model_ref: Any, shift: str, *, batches: int, batch_size: int, url: str | None = None,
             seed: int = 0, window: int | None = None) -> dict[str, Any]:
    """Feed shifted traffic to the service (in-process, or the one at `url`), then run the drift check."""
    from pipelines.serving.drift import check_drift, drift_event_extra
    from pipelines.serving.odd import OddGate

    sensors = OddGate().approved_sensors(paths.site) or ["unknown"]
    if url is None:
        from fastapi.testclient import TestClient

        from pipelines.serving.app import create_app

        client = TestClient(create_app(paths, model_ref))
        post = client.post
    else:
        import httpx

        client = httpx.Client(base_url=url.rstrip("/"), timeout=30.0)
        post = client.post
    modes: dict[str, int] = {}
    with client:
        for i, batch in enumerate(shifted_traffic(paths, shift, batches, batch_size, seed)):
            response = post("/predict", json={"inputs": batch.tolist(),
                                              "context": {"sensor_id": sensors[i % len(sensors)]}})
            if response.status_code != 200:
                raise click.ClickException(f"service answered {response.status_code}: {response.text}")
            mode = response.json()["odd"]["mode"]
            modes[mode] = modes.get(mode, 0) + 1
    result = check_drift(paths, model_ref, window=window or batches * batch_size)
    return {"shift": shift, "batches": batches, "batch_size": batch_size, "odd_modes": modes, "check": result,
            "drift_event": drift_event_extra(result)}


def _paths(site: str) -> SitePaths:
    try:
        return SitePaths.of(site)
    except WorkspaceError as exc:
        raise click.ClickException(str(exc)) from None


def _model(paths: SitePaths, ref: str | None):
    from pipelines.serving.drift import DriftError, default_model

    try:
        return default_model(paths, ref)
    except (DriftError, LookupError) as exc:
        raise click.ClickException(str(exc)) from None


@click.command("serve")
@click.option("--site", required=True, type=click.Choice(["origin", "destination", "supplier"]))
@click.option("--model", "model", default=None, help="M1..M8, NAME@ALIAS or NAME/VERSION (default per site: conf/odd.yaml)")
@click.option("--host", default=None, help="bind address (default from conf/odd.yaml: 127.0.0.1)")
@click.option("--port", default=None, type=int, help="port (default from conf/odd.yaml)")
def serve(site: str, model: str | None, host: str | None, port: int | None) -> None:
    """Serve the site's signed ONNX model over HTTP with ODD checks (refuses a bad signature)."""
    import uvicorn

    from pipelines.serving.app import ServingError, create_app
    from pipelines.serving.odd import serving_conf

    paths = _paths(site)
    model_ref = _model(paths, model)
    try:
        app = create_app(paths, model_ref)
    except ServingError as exc:
        raise click.ClickException(str(exc)) from None
    service = serving_conf().get("service", {})
    host, port = host or service.get("host", "127.0.0.1"), port or int(service.get("port", 8085))
    click.echo(f"serving {model_ref.name}/{model_ref.version} for {site} on http://{host}:{port}", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@click.group("drift")
def drift() -> None:
    """Drift detection on the inputs the site's service has seen."""


@drift.command("simulate")
@click.option("--site", required=True, type=click.Choice(["origin", "destination"]))
@click.option("--shift", required=True, type=click.Choice(SHIFTS))
@click.option("--batches", default=None, type=int, help="number of batches (default from conf/odd.yaml)")
@click.option("--batch-size", default=None, type=int)
@click.option("--model", "model", default=None)
@click.option("--url", default=None, help="a running service (default: an in-process one)")
@click.option("--seed", default=0, type=int)
def simulate_command(site: str, shift: str, batches: int | None, batch_size: int | None, model: str | None,
                     url: str | None, seed: int) -> None:
    """Feed the service shifted real data, then check for drift and print the evidence."""
    from pipelines.serving.app import ServingError
    from pipelines.serving.odd import serving_conf

    defaults = serving_conf().get("simulate", {})
    paths = _paths(site)
    model_ref = _model(paths, model)
    try:
        out = simulate(paths, model_ref, shift, batches=batches or int(defaults.get("batches", 5)),
                       batch_size=batch_size or int(defaults.get("batch_size", 32)), url=url, seed=seed)
    except (ServingError, WorkspaceError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(out, indent=2, sort_keys=True))


@drift.command("check")
@click.option("--site", required=True, type=click.Choice(["origin", "destination"]))
@click.option("--model", "model", default=None)
@click.option("--window", default=None, type=int)
def check_command(site: str, model: str | None, window: int | None) -> None:
    """Check the site's recent inference inputs for drift (logged to MLflow and the audit log)."""
    from pipelines.serving.drift import DriftError, check_drift

    paths = _paths(site)
    try:
        result = check_drift(paths, _model(paths, model), window=window)
    except DriftError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result, indent=2, sort_keys=True))
