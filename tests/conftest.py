"""Shared fixtures. Airflow reads its configuration at import, so one embedded Airflow (and one
FACTORY_HOME for the headless collaboration) is set up for the whole session, before anything
imports airflow. Tests that need an empty workspace use their own `tmp_path`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SESSION_HOME = Path(tempfile.mkdtemp(prefix="factory-session-"))

os.environ["FACTORY_HOME"] = str(SESSION_HOME / "home")
os.environ.pop("FACTORY_SITE", None)
os.environ.pop("FACTORY_RUNTIME", None)
os.environ.pop("FACTORY_OPA_URL", None)
sys.path.insert(0, str(ROOT / "plugins"))

from pipelines.service.airflow_env import apply_airflow_environment  # noqa: E402

apply_airflow_environment(Path(os.environ["FACTORY_HOME"]))


@pytest.fixture(scope="session")
def session_home() -> Path:
    """The session's FACTORY_HOME, initialised once (three sites, default data)."""
    from pipelines.fileio import write_atomic
    from pipelines.init import init_workspace
    from pipelines.protection.watermark import KEY_BYTES, key_path
    from pipelines.workspace import SitePaths

    home = Path(os.environ["FACTORY_HOME"])
    init_workspace(home)
    # A fixed watermark key, as the training seed is fixed: the trigger rows (derived from the key)
    # are part of what the supplier trains on, so a random key would move the collaboration's metrics
    # from run to run. Real sites make a random key on first use.
    supplier = key_path(SitePaths.of("supplier", home))
    if not supplier.exists():
        supplier.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(supplier, bytes(range(KEY_BYTES)), mode=0o600)
    return home


@pytest.fixture(scope="session")
def collaboration(session_home: Path) -> Path:
    """All eight stages run headless through Airflow, each approval answered by its officer."""
    from pipelines.orchestration import run_stages

    run_stages(list(range(1, 9)), approve=True, home=session_home)
    return session_home
