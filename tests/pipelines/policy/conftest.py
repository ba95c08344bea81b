"""Fixtures: the embedded engine by default, a small OPA Data API server backed by it, and allowed
`approval` and `model_release` (export) gate inputs."""

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


@pytest.fixture
def allowed_export():
    """An export of a supplier model trained on supplier and origin data, approved by both officers."""
    return {
        "model": {
            "id": "digits-cnn-export/3", "site": "supplier", "metrics": {"supplier_test": 0.93},
            "watermark": {"verified": True}, "signature": {"verified": True},
            "lineage": [
                {"dataset_id": "supplier/train@1", "owner": "supplier", "local_only": False,
                 "export_authorized": True, "releasable_to": ["origin", "destination"]},
                {"dataset_id": "origin/export_authorized@1", "owner": "origin", "local_only": False,
                 "export_authorized": True, "releasable_to": ["supplier", "destination"]},
            ],
        },
        "recipient": "destination", "purpose": "export", "requested_by": "supplier_engineer",
        "approvals": [
            {"user": "origin_officer", "site": "origin", "roles": ["compliance_officer"], "decision": "approve"},
            {"user": "supplier_export_officer", "site": "supplier", "roles": ["export_control_officer"],
             "decision": "approve"},
        ],
    }
