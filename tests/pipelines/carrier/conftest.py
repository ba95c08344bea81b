"""Three sites with keys and exchanged trust under a temporary FACTORY_HOME, and real inbox services
(mutual TLS on 127.0.0.1, ephemeral ports) started in threads."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipelines.carrier import events, outbox
from pipelines.carrier.inbox_service import InboxServer
from pipelines.carrier.settings import (
    AIRFLOW_URL_ENV,
    MAX_PACKAGE_ENV,
    airflow_url_env,
    carrier_settings,
    inbox_url_env,
)
from pipelines.config import SITES, conf_dir
from pipelines.trust import keys
from pipelines.workspace import SitePaths

CHUNK = 4096


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "factory"
    monkeypatch.setenv("FACTORY_HOME", str(home))
    for name in (AIRFLOW_URL_ENV, MAX_PACKAGE_ENV, events.USERNAME_ENV, events.PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)
    for site in SITES:
        monkeypatch.delenv(inbox_url_env(site), raising=False)
        monkeypatch.delenv(airflow_url_env(site), raising=False)
        keys.ensure_site_keys(SitePaths.of(site, home))
    keys.exchange_trust(home)
    return home


@pytest.fixture
def conf_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`conf_with(site, **carrier)`: use a copy of conf/ whose `site` has these carrier settings
    (conf is read once per folder, so each call makes a new copy)."""
    import shutil

    def write(site: str, **carrier) -> Path:
        conf = tmp_path / f"conf-{os.urandom(4).hex()}"
        shutil.copytree(conf_dir(), conf)
        sites = yaml.safe_load((conf / "sites.yaml").read_text())
        sites["sites"][site]["carrier"] = sites["sites"][site].get("carrier", {}) | carrier
        (conf / "sites.yaml").write_text(yaml.safe_dump(sites))
        monkeypatch.setenv("FACTORY_CONF", str(conf))
        return conf

    return write


@contextlib.contextmanager
def running_inbox(paths: SitePaths, **settings) -> Iterator[InboxServer]:
    """The site's inbox service on 127.0.0.1 (ephemeral port) until the block ends."""
    config = carrier_settings(paths.site).model_copy(update=settings)
    server = InboxServer(paths, "127.0.0.1", 0, config)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def inbox_at(monkeypatch: pytest.MonkeyPatch):
    """`with inbox_at(paths) as server:` runs the site's inbox and points its partners at it."""

    @contextlib.contextmanager
    def start(paths: SitePaths, **settings) -> Iterator[InboxServer]:
        with running_inbox(paths, **settings) as server:
            monkeypatch.setenv(inbox_url_env(paths.site), server.url)
            yield server

    return start


@pytest.fixture
def queued(tmp_path: Path):
    """`queued(sender, recipient)`: seal a small random file into the sender's outbox -> (header, record)."""

    def seal(sender: SitePaths, recipient: str, *, size: int = 3 * CHUNK + 100, kind: str | None = None):
        src = tmp_path / f"payload-{os.urandom(4).hex()}.bin"
        src.write_bytes(os.urandom(size))
        return outbox.seal_to_outbox(sender, recipient, src, purpose="collaboration", content_type="dataset",
                                     metadata={"kind": kind or f"{sender.site}-shared"}, chunk_size=CHUNK)

    return seal


def inbox_files(paths: SitePaths) -> list[str]:
    """Every name in the site's inbox folder (temporary files included), sorted."""
    return sorted(p.name for p in paths.inbox.iterdir()) if paths.inbox.exists() else []
