"""verified_approval without Airflow processes: signed answers, forgeries, refusals, the audit log."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException
from factory_plugin.approvals import approval_gate, verified_approval

from pipelines.approvals import sign_answer
from pipelines.trust import audit
from pipelines.trust.keys import ensure_site_keys
from pipelines.workspace import SitePaths

GATE = {"gate_name": "data_release", "owner_site": "origin", "required_role": "compliance_officer"}
RUN = {"dag_id": "stage_2_sovereign_data_release", "run_id": "manual__1"}


@pytest.fixture
def origin(tmp_path) -> SitePaths:
    paths = SitePaths.of("origin", tmp_path)
    ensure_site_keys(paths)
    return paths


def signed(paths: SitePaths, *, user="origin_officer", option="Approve", comment="ok", **override) -> dict:
    record = {"gate": "data_release", "owner_site": "origin", "required_role": "compliance_officer", **RUN, "task_id": "release_approval",
              "chosen_options": [option], "comment": comment, "responded_by": user,
              "responded_at": "2026-12-02T06:00:00+00:00", "requested_by": "origin_engineer", **override}
    return sign_answer(paths, record)


def check(paths: SitePaths, value, requested_by="origin_engineer"):
    return verified_approval(ti_xcom_value=value, requested_by=requested_by, site_paths=paths, **GATE, **RUN)


def answers(paths: SitePaths) -> list[dict]:
    return [entry for entry in audit.entries(paths) if entry["action"] == "approval.answered"]


def test_signed_approval_by_site_officer_returns_record_and_is_audited(origin):
    record = check(origin, signed(origin, comment="report read"))
    assert record == {"user": "origin_officer", "site": "origin", "roles": ["compliance_officer"],
                      "decision": "approve", "comment": "report read",
                      "responded_at": "2026-12-02T06:00:00+00:00"}
    (entry,) = answers(origin)
    assert (entry["actor"], entry["object"], entry["outcome"]) == ("origin_officer", "data_release", "approve")
    assert entry["details"]["comment"] == "report read" and entry["details"]["run_id"] == RUN["run_id"]
    audit.verify(origin)


def test_force_marked_gate_without_response_is_refused(origin):
    with pytest.raises(AirflowFailException, match="no recorded response .*force-marked"):
        check(origin, None)
    assert answers(origin)[0]["outcome"] == "no_response"


@pytest.mark.parametrize("change", [{"chosen_options": ["Reject"]}, {"comment": "edited"},
                                    {"responded_by": "origin_auditor"}, {"signature": None},
                                    {"signature": "bm90IGEgc2lnbmF0dXJl"}, {"signed_at": "2020-01-01T00:00:00Z"}])
def test_altered_or_unsigned_answer_is_refused(origin, change):
    record = {**signed(origin, user="origin_officer"), **change}
    with pytest.raises(AirflowFailException, match="not signed by site origin|no recorded response"):
        check(origin, record)
    assert answers(origin)[0]["outcome"] in ("forged", "no_response")


def test_answer_signed_by_another_sites_key_is_refused(origin, tmp_path):
    """The supplier's key (trusted for the supplier) does not sign for the origin."""
    from pipelines.trust.keys import exchange_trust

    supplier = SitePaths.of("supplier", tmp_path)
    ensure_site_keys(supplier)
    exchange_trust(tmp_path)
    with pytest.raises(AirflowFailException, match="not signed by site origin .*unknown signing key"):
        check(origin, signed(supplier))
    assert answers(origin)[0]["outcome"] == "forged"


def test_answer_signed_by_an_untrusted_key_of_the_same_name_is_refused(origin, tmp_path):
    other = SitePaths.of("origin", tmp_path / "elsewhere")
    ensure_site_keys(other)
    with pytest.raises(AirflowFailException, match="not signed by site origin"):
        check(origin, signed(other))


def test_answer_verifies_at_another_site_with_its_trust_store_only(origin, tmp_path):
    """The supplier checks an origin answer with the origin's public key from its trust store,
    audits it and evaluates the policy there: nothing of the origin's home is read."""
    from pipelines.trust.keys import exchange_trust

    supplier = SitePaths.of("supplier", tmp_path)
    ensure_site_keys(supplier)
    exchange_trust(tmp_path)
    record = signed(origin)
    hidden = origin.root.with_name("origin-away")
    origin.root.rename(hidden)  # nothing of the origin's home exists while the supplier verifies
    try:
        approval = check(supplier, record)
    finally:
        hidden.rename(origin.root)
    assert approval["user"] == "origin_officer" and approval["site"] == "origin"
    assert [e["outcome"] for e in answers(supplier)] == ["approve"] and not answers(origin)


def test_owner_site_that_is_not_configured_is_refused(origin):
    with pytest.raises(AirflowFailException, match="not a configured site"):
        verified_approval(ti_xcom_value=signed(origin), requested_by="origin_engineer", site_paths=origin,
                          gate_name="data_release", owner_site="../origin", required_role="compliance_officer", **RUN)


def test_answer_of_another_run_is_refused(origin):
    with pytest.raises(AirflowFailException, match="not this run"):
        check(origin, signed(origin, run_id="manual__other"))


def test_requester_approving_own_request_is_refused(origin):
    with pytest.raises(AirflowFailException, match="origin_officer may not answer"):
        check(origin, signed(origin), requested_by="origin_officer")
    (entry,) = answers(origin)
    assert entry["details"]["allowed"] is False and entry["details"]["reasons"]


def test_officer_of_wrong_site_is_refused(origin):
    with pytest.raises(AirflowFailException, match="destination_officer may not answer"):
        check(origin, signed(origin, user="destination_officer"))


def test_rejection_names_user_and_comment_and_is_audited(origin):
    with pytest.raises(AirflowFailException, match="rejected by origin_officer: GPS columns remain"):
        check(origin, signed(origin, option="Reject", comment="GPS columns remain"))
    (entry,) = answers(origin)
    assert entry["outcome"] == "reject" and entry["details"]["comment"] == "GPS columns remain"


def test_gate_is_assigned_to_the_owner_site_officers_only():
    gate = approval_gate(task_id="g", subject="s", body="b", requested_by="{{ dag_run.triggering_user_name }}",
                         **GATE)
    assert [user["id"] for user in gate.assigned_users] == ["origin_officer"]
    assert gate.retries == 0 and "comment" in gate.params


def test_gate_nobody_may_answer_is_a_clear_error():
    with pytest.raises(ValueError, match="no user may answer gate 'data_release' of site 'origin'"):
        approval_gate(task_id="g", subject="s", body="b", requested_by="origin_officer", **GATE)
