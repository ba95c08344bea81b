"""The "package arrived" asset event, posted to the receiving site's own Airflow through its REST API.

`factory://<site>/inbox/<kind>` is the asset the site's intake DAGs are scheduled on. The inbox
service posts it as the site's own service account: FACTORY_AIRFLOW_USERNAME and
FACTORY_AIRFLOW_PASSWORD (the chart mounts them from a Secret), else conf `carrier.airflow_user`
(default the site's service identity) with its password from the site's home
(`<site>/airflow/passwords.json`, 0600):
`POST /auth/token`, `GET /api/v2/assets?uri_pattern=` for the asset id, `POST /api/v2/assets/events`.
An event that cannot be posted (Airflow down, asset not deployed yet) is kept in
`state/carrier/events.json` and retried (`flush_events`); the package is stored either way.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import httpx

from pipelines.carrier.settings import CarrierError, carrier_settings
from pipelines.config import Carrier, load_config
from pipelines.fileio import update_json
from pipelines.workspace import SitePaths

log = logging.getLogger("factory.carrier")
TIMEOUT = 15.0
USERNAME_ENV, PASSWORD_ENV = "FACTORY_AIRFLOW_USERNAME", "FACTORY_AIRFLOW_PASSWORD"


def asset_uri(site: str, kind: str) -> str:
    return f"factory://{site}/inbox/{kind}"


def passwords_file(paths: SitePaths) -> Path:
    """The site's Airflow users and passwords (written by whoever deploys the site's Airflow)."""
    return paths.root / "airflow" / "passwords.json"


def _events_file(paths: SitePaths) -> Path:
    return paths.state_dir / "carrier" / "events.json"


def _credentials(paths: SitePaths, settings: Carrier) -> tuple[str, str]:
    """FACTORY_AIRFLOW_USERNAME/PASSWORD (a mounted Secret), else the configured user's password in
    the site's home."""
    if os.environ.get(USERNAME_ENV) and os.environ.get(PASSWORD_ENV):
        return os.environ[USERNAME_ENV], os.environ[PASSWORD_ENV]
    user = settings.airflow_user or load_config().service_identities[paths.site].id
    file = passwords_file(paths)
    try:
        password = json.loads(file.read_text())[user]
    except FileNotFoundError:
        raise CarrierError(f"no Airflow passwords file {file} for {paths.site}") from None
    except (KeyError, TypeError, ValueError):
        raise CarrierError(f"{file} holds no password for the Airflow user {user!r}") from None
    return user, password


def post_asset_event(paths: SitePaths, uri: str, extra: dict[str, Any], settings: Carrier | None = None) -> int:
    """Post one event of asset `uri` to the site's own Airflow; returns the event id. CarrierError
    names the step that failed."""
    settings = settings or carrier_settings(paths.site)
    if not settings.airflow_url:
        raise CarrierError(f"no Airflow URL configured for {paths.site}")
    user, password = _credentials(paths, settings)
    try:
        with httpx.Client(base_url=settings.airflow_url.rstrip("/"), timeout=TIMEOUT) as client:
            answer = client.post("/auth/token", json={"username": user, "password": password})
            if answer.status_code not in (200, 201):
                raise CarrierError(f"Airflow refused a token for {user}: HTTP {answer.status_code}")
            client.headers["Authorization"] = f"Bearer {answer.json()['access_token']}"
            answer = client.get("/api/v2/assets", params={"uri_pattern": uri, "limit": 100})
            answer.raise_for_status()
            ids = [asset["id"] for asset in answer.json().get("assets", []) if asset.get("uri") == uri]
            if not ids:
                raise CarrierError(f"Airflow at {settings.airflow_url} knows no active asset {uri} "
                                   "(is the DAG scheduled on it deployed?)")
            answer = client.post("/api/v2/assets/events", json={"asset_id": ids[0], "extra": extra})
            if answer.status_code not in (200, 201):
                raise CarrierError(f"Airflow refused the event of {uri}: HTTP {answer.status_code} "
                                   f"{answer.text[:200]}")
            return answer.json()["id"]
    except httpx.HTTPError as error:
        raise CarrierError(f"cannot post the event of {uri} to {settings.airflow_url}: {error}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise CarrierError(f"unexpected answer from Airflow at {settings.airflow_url}: {error}") from None


def notify(paths: SitePaths, uri: str, extra: dict[str, Any], settings: Carrier | None = None) -> str:
    """Post the event, or keep it for `flush_events`. Returns what happened, in words."""
    settings = settings or carrier_settings(paths.site)
    if not settings.airflow_url:
        log.info("%s: no Airflow URL configured; %s stored without an asset event", paths.site, uri)
        return "not posted: no Airflow URL configured"
    try:
        return f"posted (event {post_asset_event(paths, uri, extra, settings)})"
    except CarrierError as error:
        log.warning("%s: asset event of %s kept for a retry: %s", paths.site, uri, error)
        with update_json(_events_file(paths), {"pending": []}) as state:
            state["pending"].append({"uri": uri, "extra": extra, "error": str(error)})
        return f"pending: {error}"


def flush_events(paths: SitePaths, settings: Carrier | None = None) -> tuple[int, int]:
    """Retry the kept events, oldest first: (posted, still pending)."""
    settings = settings or carrier_settings(paths.site)
    if not settings.airflow_url or not _events_file(paths).exists():
        return 0, 0
    posted = 0
    with update_json(_events_file(paths), {"pending": []}) as state:
        left = []
        for event in state["pending"]:
            if left:  # keep the order: once one fails, the rest wait for the next flush
                left.append(event)
                continue
            try:
                post_asset_event(paths, event["uri"], event["extra"], settings)
                posted += 1
            except CarrierError as error:
                left.append(event | {"error": str(error)})
        state["pending"] = left
    return posted, len(left)
