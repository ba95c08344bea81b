"""Fixtures: the embedded engine by default, a small OPA Data API server backed by it, and allowed
`approval` and `model_release` (export) gate inputs."""

from __future__ import annotations

import copy

import pytest

from pipelines.policy.testing import ALLOWED_EXPORT, serve_data_api


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


@pytest.fixture
def allowed_export():
    """An export of a supplier model trained on supplier and origin data, approved by both officers."""
    return copy.deepcopy(ALLOWED_EXPORT)
