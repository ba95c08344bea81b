"""The environment an Airflow runs with: a site's own deployment (`factory up --site S`) or the
embedded development mode (`factory run --embedded`, one in-process Airflow for all three sites).

A site's deployment has AIRFLOW_HOME in the site's home (`SitePaths.airflow_home`), loads only the
site's DAGs (FACTORY_SITE) and knows only the site's users from conf/users.yaml plus the site's
service account (`service_identities`, OP: the inbox service posts asset events as it); their
passwords are generated into `passwords.json` there (0600).

Airflow reads its configuration from the environment at import time, so callers apply
`airflow_environment()` to `os.environ` before importing anything from airflow.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from pipelines.config import PROJECT_ROOT, load_config
from pipelines.fileio import write_json
from pipelines.workspace import SitePaths, airflow_home, factory_home


def site_airflow_home(home: Path | None = None, site: str | None = None) -> Path:
    """AIRFLOW_HOME of `site`'s deployment; with no site, the embedded mode's."""
    return SitePaths.of(site, home).airflow_home if site else airflow_home(home or factory_home())


def airflow_users(site: str | None = None) -> list[tuple[str, str]]:
    """(user, Airflow role) of everyone `site`'s Airflow knows: its people and its service account.
    With no site (embedded mode), every configured person."""
    config = load_config()
    if site is None:
        return [(user.id, user.airflow_role) for user in config.users]
    identity = config.service_identities[site]
    return [(user.id, user.airflow_role) for user in config.site_users(site)] + [(identity.id, identity.airflow_role)]


def passwords_file(home: Path | None = None, site: str | None = None) -> Path:
    return site_airflow_home(home, site) / "passwords.json"


def ensure_passwords(home: Path | None = None, site: str | None = None) -> dict[str, str]:
    """One generated password per user of the Airflow (kept across runs) in a 0600 file; a user
    that Airflow no longer knows loses its password."""
    path = passwords_file(home, site)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else {}
    wanted = {user: existing.get(user) or secrets.token_urlsafe(12) for user, _ in airflow_users(site)}
    if wanted != existing:
        write_json(path, wanted, mode=0o600)
    os.chmod(path, 0o600)
    return wanted


# SQLite under several Airflow processes: wait for a lock instead of failing after sqlite3's 5 s.
SQLITE_CONNECT_ARGS = {"timeout": 60}
SQLITE_NOW = "STRFTIME('%Y-%m-%d %H:%M:%f', 'now')"


def sqlite_now_in_milliseconds() -> None:
    """Compile SQLAlchemy's `func.now()` for SQLite as SQLITE_NOW (UTC, milliseconds, the text form Airflow
    stores its dates in) instead of CURRENT_TIMESTAMP, which has whole seconds: Airflow's scheduler starts
    a queued run only once `run_after <= now()`, so on SQLite every run started up to a second late (median
    0.47 s; 0.02 s on Postgres). `pipelines.service.preload` applies it in the scheduler process
    (sqlalchemy.ext.compiler, SQLAlchemy's public hook for dialect-specific SQL)."""
    from sqlalchemy.ext.compiler import compiles
    from sqlalchemy.sql.functions import now

    compiles(now, "sqlite")(lambda element, compiler, **kw: SQLITE_NOW)


def simple_auth_users(site: str | None = None) -> str:
    return ",".join(f"{user}:{role}" for user, role in airflow_users(site))


def airflow_environment(
    home: Path | None = None,
    *,
    site: str | None = None,
    port: int = 8080,
    db_url: str | None = None,
    dags_folder: Path | None = None,
) -> dict[str, str]:
    """Variables that point Airflow at the factory's DAGs, plugin, database and users.

    `site`: that site's deployment (its home, its DAGs, its users); None: the embedded mode.
    `db_url` defaults to SQLite in the Airflow home (embedded mode: env FACTORY_AIRFLOW_DB_URL first);
    `dags_folder` to env FACTORY_DAGS_FOLDER, else the project's `dags/`.
    """
    home = home or factory_home()
    db_url = db_url or (None if site else os.environ.get("FACTORY_AIRFLOW_DB_URL"))
    dags = Path(dags_folder or os.environ.get("FACTORY_DAGS_FOLDER") or PROJECT_ROOT / "dags").resolve()
    ahome = site_airflow_home(home, site)
    ahome.mkdir(parents=True, exist_ok=True)
    ensure_passwords(home, site)
    db_url = db_url or f"sqlite:///{ahome / 'airflow.db'}"
    env = {
        "FACTORY_HOME": str(home),
        "AIRFLOW_HOME": str(ahome),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__AUTH_MANAGER": (
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
        ),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": simple_auth_users(site),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file(home, site)),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://localhost:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(ahome / "logs"),
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT / "plugins"), os.environ.get("PYTHONPATH")])),
    }
    if site:
        env["FACTORY_SITE"] = site  # only this site's DAGs load (factory_plugin.flows.site_enabled)
    if db_url.startswith("sqlite"):
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] = "pipelines.service.airflow_env.SQLITE_CONNECT_ARGS"
    return env


def apply_airflow_environment(home: Path | None = None, **kwargs) -> dict[str, str]:
    env = airflow_environment(home, **kwargs)
    os.environ.update(env)
    return env
