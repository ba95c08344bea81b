"""Fixtures: the embedded engine by default, a small OPA Data API server backed by it, and an
allowed `approval` gate input."""

from __future__ import annotations

import pytest

from pipelines.policy.testing import serve_data_api


@pytest.fixture
def fake_opa():
    with serve_data_api() as server:
        yield server


@pytest.fixture(autouse=True)
def embedded(monkeypatch):
    """Every test here uses the embedded engine unless it asks for the OPA-server path."""
    monkeypatch.delenv("FACTORY_OPA_URL", raising=False)


@pytest.fixture
def allowed_approval():
    """The origin officer answering the origin's data-release gate, requested by an engineer."""
    return {
        "user": {"id": "origin_officer", "site": "origin", "roles": ["compliance_officer"]},
        "gate": {"name": "stage_2_data_release", "owner_site": "origin", "required_role": "compliance_officer"},
        "requested_by": "origin_engineer",
    }
