"""The inbox service as a process (`factory inbox serve`), hostile names, and the asset event posted
to the receiving site's own Airflow (the real Airflow API app, served by uvicorn on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines.carrier import events, push
from pipelines.carrier.receipt import receive, staging_file
from pipelines.carrier.settings import carrier_settings
from pipelines.cli import main
from pipelines.trust import packages

from .conftest import CHUNK, inbox_files

ROOT = Path(__file__).resolve().parents[3]
SESSION_HOME = Path(os.environ["FACTORY_HOME"])  # tests/conftest.py's embedded Airflow lives here


def test_unsafe_kind_is_refused(supplier, origin, inbox_at, tmp_path):
    src = tmp_path / "x.bin"
    src.write_bytes(b"payload")
    packages.seal(supplier, "origin", src, tmp_path / "evil.sfp", purpose="p", content_type="dataset",
                  metadata={"kind": "../../keys/evil"}, chunk_size=CHUNK)
    with inbox_at(origin) as server:
        answer = push.send(supplier, tmp_path / "evil.sfp", "origin", server.url)
    assert answer.status == 422 and "not a plain name" in answer.body["error"]
    assert inbox_files(origin) == []


def test_inbox_serve_and_outbox_push_commands(supplier, origin, queued, home, monkeypatch):
    header, _ = queued(supplier, "origin")
    env = os.environ | {"FACTORY_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "inbox", "serve", "--site", "origin",
                               "--port", "0"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = server.stderr.readline()
            if not line and server.poll() is not None:
                break
            if found := re.search(r"listening on (https://\S+)", line):
                url = found.group(1)
        assert url, "the inbox service did not start"
        monkeypatch.setenv("FACTORY_PARTNER_INBOX_ORIGIN", url)
        pushed = CliRunner().invoke(main, ["outbox", "push", "--site", "supplier", "--once"])
        assert pushed.exit_code == 0, pushed.output
        assert f"{header['package_id'][:12]} -> origin: delivered (https)" in pushed.output
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)
    assert server.returncode == 0
    assert inbox_files(origin) == [f"supplier-shared-{header['package_id']}.sfp"]


def test_push_once_exits_non_zero_when_something_is_left(supplier, queued, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("FACTORY_PARTNER_INBOX_ORIGIN", f"https://127.0.0.1:{probe.getsockname()[1]}")
    queued(supplier, "origin")
    pushed = CliRunner().invoke(main, ["outbox", "push", "--site", "supplier", "--once"])
    assert pushed.exit_code == 1 and "origin: pending (cannot reach origin" in pushed.output


# ---------------------------------------------------------------- asset events in the site's own Airflow


@pytest.fixture(scope="module")
def airflow_api() -> str:
    """The session's embedded Airflow (tests/conftest.py) with its metadata DB, the API app served by
    uvicorn on an ephemeral port, and the inbox asset of origin registered as an active asset."""
    import uvicorn
    from airflow.api_fastapi.app import create_app
    from airflow.models.asset import AssetActive, AssetModel
    from airflow.utils.session import create_session

    from pipelines.orchestration import prepare_airflow

    prepare_airflow(SESSION_HOME)
    uri = events.asset_uri("origin", "supplier-shared")
    with create_session() as session:  # what the DAG processor does for a deployed DAG scheduled on it
        asset = session.query(AssetModel).filter(AssetModel.uri == uri).first()
        if asset is None:
            asset = AssetModel(name=uri, uri=uri, group="inbox")
            session.add(asset)
            session.flush()
        if not session.query(AssetActive).filter(AssetActive.uri == uri).first():
            session.add(AssetActive.for_asset(asset))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # lifespan off: the execution API's startup (task workers' tokens) is not what is tested here
    server = uvicorn.Server(uvicorn.Config(create_app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the Airflow API did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)


def _origin_can_log_in(origin, user: str) -> None:
    """Give origin's home the password of `user` in the session Airflow (per-site Airflow writes its own)."""
    from pipelines.service.airflow_env import passwords_file

    password = json.loads(passwords_file(SESSION_HOME).read_text())[user]
    events.passwords_file(origin).parent.mkdir(parents=True, exist_ok=True)
    events.passwords_file(origin).write_text(json.dumps({user: password}))


def _events_of(api: str, user: str, origin, uri: str) -> list[dict]:
    import httpx

    password = json.loads(events.passwords_file(origin).read_text())[user]
    token = httpx.post(f"{api}/auth/token", json={"username": user, "password": password}).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    assets = httpx.get(f"{api}/api/v2/assets", params={"uri_pattern": uri}, headers=headers).json()["assets"]
    [asset_id] = [a["id"] for a in assets if a["uri"] == uri]
    found = httpx.get(f"{api}/api/v2/assets/events", params={"asset_id": asset_id, "limit": 100}, headers=headers)
    return found.json()["asset_events"]


@pytest.mark.parametrize("credentials", ["site home", "environment"])
def test_receipt_posts_the_asset_event_to_the_sites_own_airflow(supplier, origin, queued, airflow_api,
                                                                credentials, monkeypatch):
    _origin_can_log_in(origin, "origin_platform")
    if credentials == "environment":  # as the chart mounts them from a Secret
        monkeypatch.setenv("FACTORY_AIRFLOW_USERNAME", "origin_platform")
        monkeypatch.setenv("FACTORY_AIRFLOW_PASSWORD", json.loads(events.passwords_file(origin).read_text())
                           ["origin_platform"])
        events.passwords_file(origin).unlink()
        monkeypatch.setenv("FACTORY_AIRFLOW_URL", airflow_api)
        settings = carrier_settings("origin")
    else:
        settings = carrier_settings("origin").model_copy(update={"airflow_url": airflow_api,
                                                                 "airflow_user": "origin_platform"})
    header, record = queued(supplier, "origin")
    temp = staging_file(origin)
    temp.write_bytes((supplier.outbox / record["file"]).read_bytes())
    receipt = receive(origin, temp, peer="supplier", transport="https", settings=settings)
    assert receipt.status == "stored" and receipt.event.startswith("posted (event ")
    _origin_can_log_in(origin, "origin_platform")
    posted = [e for e in _events_of(airflow_api, "origin_platform", origin, events.asset_uri("origin", "supplier-shared"))
              if e["extra"].get("package_id") == header["package_id"]]
    assert len(posted) == 1
    assert posted[0]["extra"]["sender"] == "supplier" and posted[0]["extra"]["kind"] == "supplier-shared"
    assert posted[0]["extra"]["file"] == receipt.file and posted[0]["extra"]["transport"] == "https"


def test_event_kept_while_airflow_is_down_then_posted(supplier, origin, queued, airflow_api):
    _origin_can_log_in(origin, "origin_platform")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{probe.getsockname()[1]}"
    base = carrier_settings("origin").model_copy(update={"airflow_user": "origin_platform"})
    header, record = queued(supplier, "origin")
    temp = staging_file(origin)
    temp.write_bytes((supplier.outbox / record["file"]).read_bytes())
    receipt = receive(origin, temp, peer="supplier", transport="https",
                      settings=base.model_copy(update={"airflow_url": down}))
    assert receipt.status == "stored" and receipt.event.startswith("pending: cannot post the event")
    assert events.flush_events(origin, base.model_copy(update={"airflow_url": down})) == (0, 1)
    assert events.flush_events(origin, base.model_copy(update={"airflow_url": airflow_api})) == (1, 0)
    posted = [e for e in _events_of(airflow_api, "origin_platform", origin, events.asset_uri("origin", "supplier-shared"))
              if e["extra"].get("package_id") == header["package_id"]]
    assert len(posted) == 1


def test_wrong_airflow_password_keeps_the_event(supplier, origin, queued, airflow_api):
    events.passwords_file(origin).parent.mkdir(parents=True, exist_ok=True)
    events.passwords_file(origin).write_text(json.dumps({"origin_platform": "not-the-password"}))
    settings = carrier_settings("origin").model_copy(update={"airflow_url": airflow_api,
                                                             "airflow_user": "origin_platform"})
    _, record = queued(supplier, "origin")
    temp = staging_file(origin)
    temp.write_bytes((supplier.outbox / record["file"]).read_bytes())
    receipt = receive(origin, temp, peer="supplier", transport="https", settings=settings)
    assert receipt.status == "stored" and "Airflow refused a token for origin_platform" in receipt.event


def test_without_an_airflow_url_the_package_is_only_stored(supplier, origin, queued):
    _, record = queued(supplier, "origin")
    temp = staging_file(origin)
    temp.write_bytes((supplier.outbox / record["file"]).read_bytes())
    receipt = receive(origin, temp, peer="supplier", transport="https")
    assert receipt.status == "stored" and receipt.event == "not posted: no Airflow URL configured"


# ---------------------------------------------------------------- settings and certificate location


def test_environment_overrides_the_configured_carrier_settings(monkeypatch):
    from pipelines.carrier.settings import CarrierError

    monkeypatch.setenv("FACTORY_PARTNER_INBOX_ORIGIN", "https://inbox.origin.example:8443")
    monkeypatch.setenv("FACTORY_AIRFLOW_URL", "http://airflow-api:8080")
    monkeypatch.setenv("FACTORY_INBOX_MAX_PACKAGE_BYTES", "1048576")
    settings = carrier_settings("origin")
    assert settings.inbox_url == "https://inbox.origin.example:8443"
    assert settings.airflow_url == "http://airflow-api:8080" and settings.max_package_bytes == 1 << 20
    monkeypatch.setenv("FACTORY_AIRFLOW_URL_ORIGIN", "http://origin-airflow:8080")
    assert carrier_settings("origin").airflow_url == "http://origin-airflow:8080"
    monkeypatch.setenv("FACTORY_PARTNER_INBOX_ORIGIN", "http://plain.example")
    with pytest.raises(CarrierError, match="inbox_url"):
        carrier_settings("origin")


def test_certificate_goes_to_a_private_folder_when_the_keys_folder_cannot_take_it(supplier, origin, inbox_at,
                                                                                   queued):
    from pipelines.carrier import tls

    tls.certificate_file(supplier).mkdir()  # stands in for a read-only keys folder (a mounted Secret)
    written = tls.ensure_certificate(supplier)
    assert written != tls.certificate_file(supplier) and written.stat().st_mode & 0o777 == 0o600
    assert written.parent.stat().st_mode & 0o777 == 0o700
    header, _ = queued(supplier, "origin")
    with inbox_at(origin):
        [result] = push.push_pending(supplier)
    assert result["state"] == "delivered"
