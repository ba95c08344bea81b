"""`factory serve`, `factory serve token add|list|revoke`, `factory serve throttle clear` and
`factory drift simulate|check`."""

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
             token: str | None = None, seed: int = 0, window: int | None = None) -> dict[str, Any]:
    """Feed shifted traffic to the service (in-process, or the one at `url` with a client's `token`),
    then run the drift check. The in-process service runs without authentication: nothing listens."""
    from pipelines.serving.drift import check_drift, drift_event_extra
    from pipelines.serving.odd import OddGate

    sensors = OddGate().approved_sensors(paths.site) or ["unknown"]
    if url is None:
        from fastapi.testclient import TestClient

        from pipelines.serving.app import create_app

        client = TestClient(create_app(paths, model_ref, auth=False))
        post = client.post
    else:
        import httpx

        if not token:
            raise click.ClickException("a service at --url needs a client token: set FACTORY_SERVING_TOKEN")
        client = httpx.Client(base_url=url.rstrip("/"), timeout=30.0, headers={"Authorization": f"Bearer {token}"})
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


LOOPBACK = ("127.0.0.1", "::1", "localhost")


@click.group("serve", invoke_without_command=True)
@click.option("--site", default=None, type=click.Choice(["origin", "destination", "supplier"]))
@click.option("--model", "model", default=None, help="M1..M8, NAME@ALIAS or NAME/VERSION (default per site: conf/odd.yaml)")
@click.option("--host", default=None, help="bind address (default from conf/odd.yaml: 127.0.0.1)")
@click.option("--port", default=None, type=int, help="port (default from conf/odd.yaml)")
@click.option("--no-auth", is_flag=True, help="let any caller in without a token (local development, loopback only)")
@click.pass_context
def serve(ctx: click.Context, site: str | None, model: str | None, host: str | None, port: int | None,
          no_auth: bool) -> None:
    """Serve the site's signed ONNX model over HTTP with ODD checks (refuses a bad signature).

    Every client needs its own token (`factory serve token add`); without one the service does not start."""
    if ctx.invoked_subcommand is not None:
        return
    if site is None:
        raise click.UsageError("Missing option '--site'.")
    import uvicorn

    from pipelines.serving.app import ServingError, create_app
    from pipelines.serving.odd import serving_conf

    service = serving_conf().get("service", {})
    host, port = host or service.get("host", "127.0.0.1"), port or int(service.get("port", 8085))
    if no_auth and host not in LOOPBACK:
        raise click.ClickException(f"--no-auth serves only on a loopback address ({', '.join(LOOPBACK)}), not {host}")
    paths = _paths(site)
    model_ref = _model(paths, model)
    try:
        app = create_app(paths, model_ref, auth=not no_auth)
    except ServingError as exc:
        raise click.ClickException(str(exc)) from None
    if no_auth:
        click.echo("WARNING: --no-auth: /predict and /metrics answer any local caller, recorded as 'anonymous'; "
                   "for local development only", err=True)
    click.echo(f"serving {model_ref.name}/{model_ref.version} for {site} on http://{host}:{port}", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@serve.group("token")
def token() -> None:
    """The bearer tokens of the service's clients (stored hashed in the site's state folder)."""


def _operator() -> str:
    import getpass
    import os

    return os.environ.get("FACTORY_ACTOR") or f"operator:{getpass.getuser()}"


def _audit_client(paths: SitePaths, action: str, client: str) -> None:
    from pipelines.trust import audit

    audit.append(paths, action=action, actor=_operator(), object=f"serving-client:{client}", outcome="ok",
                 details={"client": client})


@token.command("add")
@click.option("--site", required=True, type=click.Choice(["origin", "destination", "supplier"]))
@click.option("--client", "client", required=True, help="the client's name: a-z, 0-9 and '-', 2-32 characters")
def token_add(site: str, client: str) -> None:
    """Issue a token for a new client and print it once (only its SHA-256 is kept)."""
    from pipelines.serving.clients import ClientError, add_client, check_client_name
    from pipelines.trust.keys import TrustError, keyring

    paths = _paths(site)
    try:
        check_client_name(client)
        keyring(paths)  # the audit entry can be written: checked before a token exists
        secret = add_client(paths, client)
    except (ClientError, TrustError) as exc:
        raise click.ClickException(str(exc)) from None
    _audit_client(paths, "serving.client_added", client)
    click.echo(f"token for client {client} at {site} (shown only now; send it as 'Authorization: Bearer <token>'):",
               err=True)
    click.echo(secret)


@token.command("list")
@click.option("--site", required=True, type=click.Choice(["origin", "destination", "supplier"]))
@click.option("--json", "as_json", is_flag=True)
def token_list(site: str, as_json: bool) -> None:
    """The site's serving clients and whether their token is active."""
    from pipelines.serving.clients import ClientError, list_clients

    try:
        clients = list_clients(_paths(site))
    except ClientError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(clients, indent=2))
        return
    for c in clients:
        state = f"revoked {c['revoked']}" if c["revoked"] else "active"
        click.echo(f"{c['client']:<32} created {c['created']}  {state}")


@token.command("revoke")
@click.option("--site", required=True, type=click.Choice(["origin", "destination", "supplier"]))
@click.option("--client", "client", required=True)
def token_revoke(site: str, client: str) -> None:
    """Revoke a client's token; a running service refuses it from its next request on."""
    from pipelines.serving.clients import ClientError, revoke_client

    paths = _paths(site)
    try:
        entry = revoke_client(paths, client)
    except ClientError as exc:
        raise click.ClickException(str(exc)) from None
    _audit_client(paths, "serving.client_revoked", client)
    click.echo(f"revoked the token of client {client} at {site} ({entry['revoked']})", err=True)


@serve.group("throttle")
def throttle() -> None:
    """Clients the extraction detector throttled (pipelines.protection.extraction)."""


@throttle.command("clear")
@click.option("--site", required=True, type=click.Choice(["origin", "destination", "supplier"]))
@click.option("--client", "client", required=True)
def throttle_clear(site: str, client: str) -> None:
    """Release a throttled client now; the running service lets it in again from its next request
    (with a fresh detector history, so a resumed attack is detected again)."""
    from pipelines.protection.extraction import ExtractionConfError, clear_client
    from pipelines.serving.clients import ClientError, check_client_name
    from pipelines.trust import audit
    from pipelines.trust.keys import TrustError, keyring

    paths = _paths(site)
    try:
        check_client_name(client)
        keyring(paths)
        clear_client(paths, client)
    except (ClientError, TrustError, ExtractionConfError) as exc:
        raise click.ClickException(str(exc)) from None
    audit.append(paths, action="serving.extraction_cleared", actor=_operator(), object=f"serving-client:{client}",
                 outcome="ok", details={"client": client})
    click.echo(f"cleared client {client} at {site}: the service releases it at its next request", err=True)


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
@click.option("--token", envvar="FACTORY_SERVING_TOKEN", default=None, show_envvar=True,
              help="client token for --url (prefer the environment variable: a command line is visible to others)")
@click.option("--seed", default=0, type=int)
def simulate_command(site: str, shift: str, batches: int | None, batch_size: int | None, model: str | None,
                     url: str | None, token: str | None, seed: int) -> None:
    """Feed the service shifted real data, then check for drift and print the evidence."""
    from pipelines.serving.app import ServingError
    from pipelines.serving.odd import serving_conf

    defaults = serving_conf().get("simulate", {})
    paths = _paths(site)
    model_ref = _model(paths, model)
    try:
        out = simulate(paths, model_ref, shift, batches=batches or int(defaults.get("batches", 5)),
                       batch_size=batch_size or int(defaults.get("batch_size", 32)), url=url, token=token,
                       seed=seed)
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
