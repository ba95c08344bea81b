"""The environment the embedded Airflow runs with (headless `factory run` and `factory up` alike).

Airflow reads its configuration from the environment at import time, so callers
apply `airflow_environment()` to `os.environ` before importing anything from airflow.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from pipelines.config import PROJECT_ROOT, load_config
from pipelines.fileio import write_json
from pipelines.workspace import airflow_home, factory_home


def passwords_file(home: Path | None = None) -> Path:
    return airflow_home(home) / "passwords.json"


def ensure_passwords(home: Path | None = None) -> dict[str, str]:
    """Generate one password per configured user into a 0600 file (kept across runs)."""
    path = passwords_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else {}
    users = [user.id for user in load_config().users]
    wanted = {user: existing.get(user) or secrets.token_urlsafe(12) for user in users}
    if wanted != existing:
        write_json(path, wanted, mode=0o600)
    os.chmod(path, 0o600)
    return wanted


# SQLite under several Airflow processes: wait for a lock instead of failing after sqlite3's 5 s.
SQLITE_CONNECT_ARGS = {"timeout": 60}


def simple_auth_users() -> str:
    return ",".join(f"{user.id}:{user.airflow_role}" for user in load_config().users)


def airflow_environment(
    home: Path | None = None, *, port: int = 8080, db_url: str | None = None, dags_folder: Path | None = None
) -> dict[str, str]:
    """Variables that point Airflow at the factory's DAGs, plugin, database and users.

    `db_url` defaults to env FACTORY_AIRFLOW_DB_URL (set by `FACTORY_DB=postgres`), else SQLite;
    `dags_folder` to env FACTORY_DAGS_FOLDER, else the project's `dags/`.
    """
    home = home or factory_home()
    db_url = db_url or os.environ.get("FACTORY_AIRFLOW_DB_URL")
    dags = Path(dags_folder or os.environ.get("FACTORY_DAGS_FOLDER") or PROJECT_ROOT / "dags").resolve()
    ahome = airflow_home(home)
    ahome.mkdir(parents=True, exist_ok=True)
    ensure_passwords(home)
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
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": simple_auth_users(),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file(home)),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://localhost:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(ahome / "logs"),
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT / "plugins"), os.environ.get("PYTHONPATH")])),
    }
    if db_url.startswith("sqlite"):
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] = "pipelines.service.airflow_env.SQLITE_CONNECT_ARGS"
    return env


def apply_airflow_environment(home: Path | None = None, **kwargs) -> dict[str, str]:
    env = airflow_environment(home, **kwargs)
    os.environ.update(env)
    return env
