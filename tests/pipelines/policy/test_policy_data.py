"""Policy data at data.factory, read by the gates and by Python; approvers assigned from conf alone."""

from __future__ import annotations

import json

import pytest

from pipelines.config import load_config
from pipelines.policy import assigned_approvers, evaluate, policy_data, release_thresholds
from pipelines.policy.bundle import BundleError, load_bundle


def test_policy_data_is_loaded_at_data_factory():
    bundle = load_bundle()
    shipped = json.loads((bundle.root / "factory" / "data.json").read_text())
    assert bundle.data == {"factory": shipped}  # no other JSON file in policies/, nothing at data.data
    assert policy_data() == shipped
    assert not set(shipped) & set(bundle.gates), "a policy data key may not be a gate package name"


def test_policy_data_is_a_copy():
    policy_data()["release_thresholds"]["export"]["supplier_test"] = 0.0
    assert release_thresholds("export") == load_bundle().data["factory"]["release_thresholds"]["export"]


def test_release_thresholds_are_those_the_model_release_gate_enforces(allowed_export):
    thresholds = release_thresholds("export")
    assert thresholds == {"supplier_test": 0.9}
    bar = thresholds["supplier_test"]
    model = allowed_export["model"]
    at_bar = evaluate("model_release", {**allowed_export, "model": {**model, "metrics": {"supplier_test": bar}}})
    below = evaluate("model_release", {**allowed_export, "model": {**model, "metrics": {"supplier_test": bar - 0.01}}})
    assert at_bar.allow and at_bar.reasons == ()
    assert not below.allow
    assert below.reasons == (f"metric supplier_test of model digits-cnn-export/3 is {bar - 0.01}, "
                             f"below the export threshold {bar}",)
    assert release_thresholds("collaboration") == {}


def test_release_thresholds_of_an_unknown_purpose_fail_naming_it():
    with pytest.raises(BundleError, match="no entry for purpose 'research' .entries: collaboration, export"):
        release_thresholds("research")


def test_assigned_approvers_come_from_conf():
    def ids(*args, **kwargs):
        return [user.id for user in assigned_approvers(*args, **kwargs)]

    assert ids("supplier", "export_control_officer") == ["supplier_export_officer"]
    assert ids("origin", "compliance_officer") == ["origin_officer"]
    assert ids("origin", "compliance_officer", requested_by="origin_officer") == []
    assert ids("origin", "compliance_officer", requested_by="origin_engineer") == ["origin_officer"]
    assert ids("destination", "export_control_officer") == []


def test_assigned_approvers_run_no_policy(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTORY_POLICIES", str(tmp_path / "no-policies-here"))
    assert [user.id for user in assigned_approvers("origin", "compliance_officer")] == ["origin_officer"]


def test_assigned_approvers_are_the_users_the_approval_policy_allows():
    """For every approving role of every site (policy data officers.site_roles) the users assigned
    from conf are exactly those the run-time `approval` gate lets answer."""
    users = load_config().users
    site_roles = policy_data()["officers"]["site_roles"]
    for site, roles in site_roles.items():
        for role in roles:
            for requester in (None, f"{site}_engineer", f"{site}_officer"):
                gate = {"name": "gate", "owner_site": site, "required_role": role}
                allowed = [user for user in users if evaluate("approval", {
                    "user": {"id": user.id, "site": user.site, "roles": list(user.roles)},
                    "gate": gate, "requested_by": requester}).allow]
                assigned = assigned_approvers(site, role, requester)
                assert assigned == allowed, (site, role, requester)
                assert assigned or requester == f"{site}_officer", (site, role)
