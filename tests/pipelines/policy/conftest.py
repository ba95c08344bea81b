"""Fixture: a small OPA Data API server backed by the embedded engine."""

from __future__ import annotations

import pytest

from pipelines.policy.testing import serve_data_api


@pytest.fixture
def fake_opa():
    with serve_data_api() as server:
        yield server
