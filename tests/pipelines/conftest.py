"""The three sites of a test's `home` (each area's conftest says what a `home` holds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.workspace import SitePaths


@pytest.fixture
def supplier(home: Path) -> SitePaths:
    return SitePaths.of("supplier", home)


@pytest.fixture
def origin(home: Path) -> SitePaths:
    return SitePaths.of("origin", home)


@pytest.fixture
def destination(home: Path) -> SitePaths:
    return SitePaths.of("destination", home)
