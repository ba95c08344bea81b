"""Fixtures for the data-governance tests: real site repos (git + DVC) with keys, in tmp folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.workspace import SitePaths


def make_site(home: Path, site: str, *, build: bool = True) -> SitePaths:
    from pipelines.data.builder import build_site_data
    from pipelines.data.repo import init_site_repo
    from pipelines.trust.keys import ensure_site_keys

    paths = SitePaths.of(site, home)
    init_site_repo(paths)
    ensure_site_keys(paths)
    if build:
        build_site_data(paths)
    return paths


@pytest.fixture(scope="module")
def data_home(tmp_path_factory) -> Path:
    """One FACTORY_HOME per test module (site repos are slow to create)."""
    home = tmp_path_factory.mktemp("data-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FACTORY_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def origin(data_home: Path) -> SitePaths:
    return make_site(data_home, "origin")


@pytest.fixture(scope="module")
def supplier(data_home: Path) -> SitePaths:
    return make_site(data_home, "supplier")
