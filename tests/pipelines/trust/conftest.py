"""Three site workspaces with keys and exchanged trust, under a temporary FACTORY_HOME."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import SITES
from pipelines.trust import keys
from pipelines.workspace import SitePaths


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "factory"
    monkeypatch.setenv("FACTORY_HOME", str(home))
    for variable in ("FACTORY_KEY_PASSPHRASE", "FACTORY_KEY_PASSPHRASE_FILE"):
        monkeypatch.delenv(variable, raising=False)
    for site in SITES:
        monkeypatch.delenv(f"FACTORY_KEY_PASSPHRASE_{site.upper()}", raising=False)
        keys.ensure_site_keys(SitePaths.of(site, home))
    keys.exchange_trust(home)
    return home


def _snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>") for p in folder.rglob("*")}


@pytest.fixture
def snapshot():
    """Everything under a folder (None when it does not exist), to show a failure changed nothing."""
    return _snapshot
