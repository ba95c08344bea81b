"""verified_approval without Airflow processes: sealed answers, forgeries, refusals, the audit log."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException
from factory_plugin.approvals import approval_gate, verified_approval

from pipelines.approvals import seal
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


def sealed(paths: SitePaths, *, user="origin_officer", option="Approve", comment="ok", **override) -> dict:
    record = {"gate": "data_release", "owner_site": "origin", "required_role": "compliance_officer", **RUN, "task_id": "release_approval",
              "chosen_options": [option], "comment": comment, "responded_by": user,
              "responded_at": "2026-12-02T06:00:00+00:00", "requested_by": "origin_engineer", **override}
    record["seal"] = seal(paths, record)
    return record


def check(paths: SitePaths, value, requested_by="origin_engineer"):
    return verified_approval(ti_xcom_value=value, requested_by=requested_by, site_paths=paths, **GATE, **RUN)


def answers(paths: SitePaths) -> list[dict]:
    return [entry for entry in audit.entries(paths) if entry["action"] == "approval.answered"]


def test_sealed_approval_by_site_officer_returns_record_and_is_audited(origin):
    record = check(origin, sealed(origin, comment="report read"))
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


@pytest.mark.parametrize("change", [{"responded_by": "origin_officer", "chosen_options": ["Reject"]},
                                    {"comment": "edited"}])
def test_altered_or_unsealed_answer_is_refused(origin, change):
    record = {**sealed(origin, user="origin_officer"), **change}
    with pytest.raises(AirflowFailException, match="not sealed by site origin"):
        check(origin, record)
    assert answers(origin)[0]["outcome"] == "forged"


def test_answer_sealed_by_another_site_key_is_refused(origin, tmp_path):
    other = SitePaths.of("origin", tmp_path / "elsewhere")
    with pytest.raises(AirflowFailException, match="not sealed"):
        check(origin, sealed(other))


def test_answer_of_another_run_is_refused(origin):
    with pytest.raises(AirflowFailException, match="not this run"):
        check(origin, sealed(origin, run_id="manual__other"))


def test_requester_approving_own_request_is_refused(origin):
    with pytest.raises(AirflowFailException, match="origin_officer may not answer"):
        check(origin, sealed(origin), requested_by="origin_officer")
    (entry,) = answers(origin)
    assert entry["details"]["allowed"] is False and entry["details"]["reasons"]


def test_officer_of_wrong_site_is_refused(origin):
    with pytest.raises(AirflowFailException, match="destination_officer may not answer"):
        check(origin, sealed(origin, user="destination_officer"))


def test_rejection_names_user_and_comment_and_is_audited(origin):
    with pytest.raises(AirflowFailException, match="rejected by origin_officer: GPS columns remain"):
        check(origin, sealed(origin, option="Reject", comment="GPS columns remain"))
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
