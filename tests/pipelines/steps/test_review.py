"""Stage 5's cross-site export decision, step by step without Airflow, on a small real model.

One module-scoped workspace: the origin releases its export-authorized data to the supplier (a
signed officer answer, the real data_release gate, a sealed package carried by the media
carrier), the supplier trains a short M5 on it and its own data. Each test then makes its own
export request (its own run id) and carries packages between the sites as the carrier would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.approvals import ApprovalRefused, sign_answer, sign_document, verified_document
from pipelines.steps import StepContext, StepError, run_step
from pipelines.trust import audit
from pipelines.workspace import SitePaths

ANSWERED_AT = "2026-12-04T10:00:00+00:00"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    from pipelines.init import init_workspace

    home = tmp_path_factory.mktemp("factory")
    init_workspace(home)
    return home


def _ctx(home: Path, site: str, run_id: str = "test-run", dag_id: str = "test") -> StepContext:
    return StepContext(site=site, paths=SitePaths.of(site, home), run_id=run_id, dag_id=dag_id)


def _carry(home: Path, sender: str, recipient: str) -> dict:
    from pipelines.carrier.media import hand_over

    return hand_over(SitePaths.of(sender, home), SitePaths.of(recipient, home))


def _answer(ctx: StepContext, *, user: str, role: str, option: str = "Approve", comment: str = "read",
            gate: str = "model_release") -> dict:
    """What the gate task of `ctx`'s run records and signs when `user` answers."""
    return sign_answer(ctx.paths, {
        "gate": gate, "owner_site": ctx.site, "required_role": role, "dag_id": ctx.dag_id,
        "run_id": ctx.run_id, "task_id": "approval", "chosen_options": [option], "comment": comment,
        "responded_by": user, "responded_at": ANSWERED_AT})


def _actions(paths: SitePaths, action: str) -> list[dict]:
    return [entry for entry in audit.entries(paths) if entry["action"] == action]


def _requests(home: Path) -> dict:
    return json.loads((SitePaths.of("supplier", home).state_dir / "export-requests.json").read_text())


@pytest.fixture(scope="module")
def m5(home: Path) -> dict:
    """A registered supplier M5 trained on supplier data and the origin's export-authorized data."""
    origin = _ctx(home, "origin", run_id="release-export-data", dag_id="stage_5_export_data_release")
    sanitized = run_step("sanitize_dataset", origin, dataset="export_authorized", purpose="export")
    validated = run_step("validate_dataset", origin, dataset=sanitized, suite="release")
    answer = _answer(origin, user="origin_officer", role="compliance_officer", gate="data_release")
    run_step("release_dataset", origin, dataset=sanitized, recipient="supplier", purpose="export",
             kind="origin-export", approvals=[answer], validation=validated)
    _carry(home, "origin", "supplier")
    supplier = _ctx(home, "supplier", run_id="prepare", dag_id="stage_5_export_preparation")
    received = run_step("receive_dataset", supplier, kind="origin-export", name="origin-export")
    run_step("validate_dataset", supplier, dataset=received, suite="training")
    trained = run_step("train_model", supplier, stage="M5", profile="export", datasets=["train", "origin-export"],
                       variant="default", recipient="destination")  # the destination's watermark, as the DAG asks
    evaluated = run_step("evaluate_model", supplier, trained=trained, test_sets={"supplier_test": "test"})
    exported = run_step("export_model", supplier, trained=evaluated, parity_set="test")
    return run_step("register_model", supplier, trained=exported)


def _request(home: Path, m5: dict, run_id: str, **params) -> dict:
    supplier = _ctx(home, "supplier", run_id=run_id, dag_id="stage_5_export_preparation")
    return run_step("request_review", supplier, model=m5, recipient="origin", kind="m5-review",
                    destination="destination", variant="default", **params)


def _review(home: Path, run_id: str, *, option: str = "Approve", comment: str = "gap to M3 acceptable") -> dict:
    """The origin's part: receive the review, its officer answers, the decision goes back."""
    _carry(home, "supplier", "origin")
    origin = _ctx(home, "origin", run_id=run_id, dag_id="stage_5_export_review")
    review = run_step("receive_review", origin, kind="m5-review", test_sets={"origin_test": "test"})
    answer = _answer(origin, user="origin_officer", role="compliance_officer", option=option, comment=comment)
    sent = run_step("send_approval", origin, review=review, approval=answer, recipient="supplier", kind="m5-approval")
    _carry(home, "origin", "supplier")
    return {"review": review, "sent": sent}


def test_request_review_approval_release_end_to_end(home, m5):
    """Request at the supplier, review at the origin on its own test data, a signed decision back,
    export control, release to the destination with both approvals; the destination receives M5."""
    requested = _request(home, m5, "prepare-1", thresholds={"supplier_test": 0.9})
    request = _requests(home)["prepare-1"]
    assert request["status"] == "in_review" and request["model"] == f"{m5['name']}/{m5['version']}"
    assert request["digest"].startswith("sha256:") and request["thresholds"] == {"supplier_test": 0.9}
    assert requested["kind"] == "m5-review" and requested["recipient"] == "origin"
    assert request["end_use"] == "evaluation"  # the default of the destination's licence (policy data)

    reviewed = _review(home, "review-1")
    review = reviewed["review"]
    assert review["request_id"] == "prepare-1" and review["digest"] == request["digest"]
    assert 0.0 <= review["metrics"]["origin_test"] <= 1.0  # evaluated at the origin, where its test data lives
    assert review["here"].startswith("digits-cnn-m5-default/") and review["end_use"] == "evaluation"
    # the review gate's evidence: M5 on the origin's own test data beside the origin's M3 and M4, and the checks
    evidence = review["evidence"].splitlines()
    assert evidence[0] == r"| model | origin\_test |"
    assert any(line.startswith(r"| **M5 under review** digits\-cnn\-m5\-default/") for line in evidence)
    assert not any("own\\)" in line for line in evidence)  # this workspace's origin holds no M3 or M4 yet
    assert any(line.startswith("| signature | pass | required | ") for line in evidence)
    assert "| privacy | not available |  |  |" in evidence
    # the origin holds no watermark key: the supplier verifies the mark at its export gate
    assert any(line.startswith("| watermark | elsewhere | required | verified by supplier") for line in evidence)
    (robust,) = [line for line in evidence if line.startswith("| robustness | pass |  | ")]
    assert r"fgsm@0\.05" in robust and "measured at origin" in robust  # on the origin's own test data
    assert reviewed["sent"]["decision"] == "approve"

    supplier = _ctx(home, "supplier", run_id="release-1", dag_id="stage_5_export_release")
    decided = run_step("receive_approval", supplier, kind="m5-approval")
    assert decided["request_id"] == "prepare-1" and decided["officer"] == "origin_officer"
    assert _requests(home)["prepare-1"]["status"] == "approved"
    # the export-control gate's evidence at the supplier: M5 on the supplier's test data, the signature checked here
    assert decided["end_use"] == "evaluation"
    assert _requests(home)["prepare-1"]["approval"]["end_use"] == "evaluation"  # what the origin signed
    assert r"| model | supplier\_test |" in decided["evidence_md"]
    assert "| signature | pass | required | verified at supplier" in decided["evidence_md"]
    assert r"| watermark | pass | required | mark recipient:destination of key " in decided["evidence_md"]
    assert "| robustness | pass | required | " in decided["evidence_md"]  # the destination's minimum is met
    export_ok = _answer(supplier, user="supplier_export_officer", role="export_control_officer")
    released = run_step("release_export", supplier, request=decided, approvals=[export_ok],
                        recipient="destination", kind="m5")
    assert _requests(home)["prepare-1"]["status"] == "released"
    (entry,) = [e for e in _actions(supplier.paths, "model.released") if e["details"]["package_id"] == released["package_id"]]
    assert entry["details"]["purpose"] == "export" and entry["details"]["end_use"] == "evaluation"
    assert [(a["user"], a["site"]) for a in entry["details"]["approvals"]] == [
        ("origin_officer", "origin"), ("supplier_export_officer", "supplier")]

    _carry(home, "supplier", "destination")
    destination = _ctx(home, "destination")
    received = run_step("receive_model", destination, kind="m5", test_sets={"destination_test": "test"})
    assert received["package_id"] == released["package_id"] and received["stage"] == "M5"
    # A re-run of the finished release returns what it sealed.
    assert run_step("release_export", supplier, request=decided, approvals=[export_ok], recipient="destination",
                    kind="m5") == released


def test_rejection_by_the_origin_ends_the_request_and_releases_nothing(home, m5):
    _request(home, m5, "prepare-2")
    assert _review(home, "review-2", option="Reject", comment="too far below M3")["sent"]["decision"] == "reject"
    supplier = _ctx(home, "supplier", run_id="release-2", dag_id="stage_5_export_release")
    before = set(supplier.paths.outbox.glob("m5-*.sfp"))
    with pytest.raises(StepError, match="rejected by origin_officer of origin: too far below M3; the request is ended"):
        run_step("receive_approval", supplier, kind="m5-approval")
    assert _requests(home)["prepare-2"]["status"] == "rejected"
    assert [e["outcome"] for e in _actions(supplier.paths, "export.rejected") if e["object"] == "prepare-2"] == ["reject"]
    export_ok = _answer(supplier, user="supplier_export_officer", role="export_control_officer")
    with pytest.raises(StepError, match="prepare-2 is rejected"):
        run_step("release_export", supplier, request="prepare-2", approvals=[export_ok], recipient="destination",
                 kind="m5")
    assert set(supplier.paths.outbox.glob("m5-*.sfp")) == before
    with pytest.raises(StepError, match="rejected by origin_officer"):  # a retried intake says the same
        run_step("receive_approval", supplier, kind="m5-approval")


def test_release_needs_an_approved_request_the_recipient_and_export_control(home, m5):
    _request(home, m5, "prepare-3")
    supplier = _ctx(home, "supplier", run_id="release-3", dag_id="stage_5_export_release")
    export_ok = _answer(supplier, user="supplier_export_officer", role="export_control_officer")
    with pytest.raises(StepError, match="prepare-3 is in_review; only a request its data owner approved"):
        run_step("release_export", supplier, request="prepare-3", approvals=[export_ok], recipient="destination",
                 kind="m5")
    _review(home, "review-3")
    decided = run_step("receive_approval", supplier, kind="m5-approval")
    with pytest.raises(StepError, match="is for destination, not origin"):
        run_step("release_export", supplier, request=decided, approvals=[export_ok], recipient="origin", kind="m5")
    with pytest.raises(StepError, match="model_release gate denied: .*no approval by an export_control_officer"):
        run_step("release_export", supplier, request=decided, approvals=[], recipient="destination", kind="m5")
    other_run = _answer(_ctx(home, "supplier", run_id="release-elsewhere"), user="supplier_export_officer",
                        role="export_control_officer")
    with pytest.raises(ApprovalRefused, match="not this run"):
        run_step("release_export", supplier, request=decided, approvals=[other_run], recipient="destination",
                 kind="m5")
    with pytest.raises(StepError, match="has no export request"):
        run_step("release_export", supplier, request="made-up", approvals=[export_ok], recipient="destination",
                 kind="m5")
    assert _requests(home)["prepare-3"]["status"] == "approved"


def test_review_goes_only_to_a_data_owner_of_the_model(home, m5):
    supplier = _ctx(home, "supplier", run_id="prepare-4", dag_id="stage_5_export_preparation")
    with pytest.raises(StepError, match="model_release gate denied: destination owns no source in the lineage"):
        run_step("request_review", supplier, model=m5, recipient="destination", kind="m5-review",
                 destination="destination")
    with pytest.raises(StepError, match="below this variant's threshold 0.999"):
        _request(home, m5, "prepare-5", thresholds={"supplier_test": 0.999})
    assert "prepare-4" not in _requests(home) and "prepare-5" not in _requests(home)


def test_end_use_the_licence_does_not_cover_is_denied_by_the_export_gate(home, m5):
    """The end use is a parameter of the request, shown to both officers and decided by model_release
    (the real policy engine) against the destination's licence."""
    with pytest.raises(StepError, match="end use 'Targeting!' is not a short name"):
        _request(home, m5, "prepare-9", end_use="Targeting!")
    _request(home, m5, "prepare-8", end_use="targeting")
    assert _requests(home)["prepare-8"]["end_use"] == "targeting"
    review = _review(home, "review-8")["review"]
    assert review["end_use"] == "targeting"
    # an earlier review registered M5 here before: the page shows it as the version this one would replace
    (previous,) = [line for line in review["evidence"].splitlines() if line.startswith("| previous version")]
    assert r"digits\-cnn\-m5\-default/" in previous and "(M5 " in previous
    supplier = _ctx(home, "supplier", run_id="release-8", dag_id="stage_5_export_release")
    decided = run_step("receive_approval", supplier, kind="m5-approval")
    assert decided["request_id"] == "prepare-8" and decided["end_use"] == "targeting"
    before = set(supplier.paths.outbox.glob("m5-*.sfp"))
    export_ok = _answer(supplier, user="supplier_export_officer", role="export_control_officer")
    with pytest.raises(StepError, match="model_release gate denied: export licence EL-2026-0042 of destination "
                                        "does not cover end use targeting"):
        run_step("release_export", supplier, request=decided, approvals=[export_ok], recipient="destination",
                 kind="m5")
    assert set(supplier.paths.outbox.glob("m5-*.sfp")) == before
    denied = [e for e in _actions(supplier.paths, "policy.decision") if e["outcome"] == "deny"
              and e["details"].get("subject", {}).get("end_use") == "targeting"]
    assert denied and denied[-1]["details"]["subject"]["recipient"] == "destination"
    assert _requests(home)["prepare-8"]["status"] == "approved"  # not released


def test_default_end_use_comes_from_the_destination_licence():
    from pipelines.policy import default_end_use

    assert default_end_use("destination") == "evaluation"
    assert default_end_use("origin") is None  # no licence: no end use, and the export gate denies


def test_restricted_variant_carries_its_restrictions_to_the_gate_and_the_destination_serves_them(home, m5):
    """An export variant trained with restrictions records them in its signed metadata and in MLflow;
    the request, both gate pages and the export gate's input carry them; the destination's service
    built from the received package never returns an abstained class nor a confidence above the cap."""
    import numpy as np
    import pandas as pd
    from fastapi.testclient import TestClient

    from pipelines.data.schema import FEATURE_COLUMNS
    from pipelines.learning import registry
    from pipelines.serving.app import create_app
    from pipelines.steps.exchange import _release_input

    supplier = _ctx(home, "supplier", run_id="prepare-r", dag_id="stage_5_export_preparation")
    with pytest.raises(StepError, match=r"abstain_classes names no class \[12\] of this data"):
        run_step("train_model", supplier, stage="M5", profile="export", datasets=["train", "origin-export"],
                 variant="restricted", restrictions={"abstain_classes": [3, 12]})
    wanted = {"abstain_classes": [7, 3], "max_confidence": 0.6}
    trained = run_step("train_model", supplier, stage="M5", profile="export", datasets=["train", "origin-export"],
                       variant="restricted", restrictions=wanted, recipient="destination")
    evaluated = run_step("evaluate_model", supplier, trained=trained, test_sets={"supplier_test": "test"})
    exported = run_step("export_model", supplier, trained=evaluated, parity_set="test")
    registered = run_step("register_model", supplier, trained=exported)
    ref = registry.resolve_model(supplier.paths, f"{registered['name']}/{registered['version']}")
    assert ref.metadata["restrictions"] == {"abstain_classes": [3, 7], "max_confidence": 0.6}  # signed with it
    assert json.loads(ref.tags["factory.restrictions"]) == ref.metadata["restrictions"]
    assert "restrictions" not in registry.resolve_model(supplier.paths, f"{m5['name']}/{m5['version']}").metadata
    assert _release_input(supplier, ref, recipient="destination", purpose="export", approvals=[],
                          requested_by="x")["model"]["restrictions"] == {"abstain_classes": [3, 7],
                                                                         "max_confidence": 0.6}

    with pytest.raises(StepError, match="is restricted to abstains on classes 3, 7; confidence capped at 0.6, "
                                        "not abstains on classes 3 as this run asks"):
        run_step("request_review", supplier, model=registered, recipient="origin", kind="m5-review",
                 destination="destination", variant="restricted", restrictions={"abstain_classes": [3]})
    run_step("request_review", supplier, model=registered, recipient="origin", kind="m5-review",
             destination="destination", variant="restricted", restrictions=wanted)
    assert _requests(home)["prepare-r"]["restrictions"] == {"abstain_classes": [3, 7], "max_confidence": 0.6}
    review = _review(home, "review-r")["review"]
    assert review["restrictions"] == {"abstain_classes": [3, 7], "max_confidence": 0.6}
    row = "| abstains on classes 3, 7; confidence capped at 0\\.6 | by factory serve wherever the model runs"
    assert row in review["evidence"]
    supplier = _ctx(home, "supplier", run_id="release-r", dag_id="stage_5_export_release")
    decided = run_step("receive_approval", supplier, kind="m5-approval")
    assert decided["request_id"] == "prepare-r" and row in decided["evidence_md"]
    export_ok = _answer(supplier, user="supplier_export_officer", role="export_control_officer")
    run_step("release_export", supplier, request=decided, approvals=[export_ok], recipient="destination", kind="m5")

    _carry(home, "supplier", "destination")
    destination = _ctx(home, "destination", run_id="intake-r")
    received = run_step("receive_model", destination, kind="m5", test_sets={"destination_test": "test"})
    served = registry.resolve_model(destination.paths, f"{received['name']}/{received['version']}")
    assert served.metadata["restrictions"] == {"abstain_classes": [3, 7], "max_confidence": 0.6}
    rows = pd.read_parquet(destination.paths.data_dir / "test.parquet")[list(FEATURE_COLUMNS)].to_numpy(np.float32)
    with TestClient(create_app(destination.paths, served, auth=False)) as client:
        response = client.post("/predict", json={"inputs": rows[:256].tolist(), "context": {
            "sensor_id": "DST-SN-0001", "location": {"lat": 59.33, "lon": 18.07}}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["restrictions"] == {"abstain_classes": [3, 7], "max_confidence": 0.6}
    assert not {3, 7} & set(body["predictions"])
    abstained = [o for o in body["outputs"] if o["abstained"]]
    assert abstained and all(o == {"label": None, "confidence": None, "abstained": True} for o in abstained)
    confidences = [o["confidence"] for o in body["outputs"] if not o["abstained"]]
    assert confidences and max(confidences) == 0.6  # a well-trained M5 is surer than that: the cap holds it


# ---------------------------------------------------------------- the approval document itself


@pytest.fixture(scope="module")
def request_a(home, m5) -> dict:
    _request(home, m5, "prepare-a")
    return _requests(home)["prepare-a"]


def _document(home: Path, request: dict, *, signer: str = "origin", **override) -> dict:
    approval = {"user": "origin_officer", "site": "origin", "roles": ["compliance_officer"], "decision": "approve",
                "comment": "ok", "responded_at": ANSWERED_AT}
    fields = {"request_id": request["request_id"], "model_uri": request["model"], "model_digest": request["digest"],
              "end_use": request.get("end_use"), **override}
    return sign_document(SitePaths.of(signer, home), recipient="supplier", gate_name="model_release",
                         approval=approval, **fields)


def _verify(home: Path, document: dict, request: dict) -> dict:
    return verified_document(document, site_paths=SitePaths.of("supplier", home), owner_site="origin",
                             gate_name="model_release", required_role="compliance_officer",
                             request_id=request["request_id"], model_uri=request["model"],
                             model_digest=request["digest"], requested_by=request["requested_by"],
                             end_use=request.get("end_use"))


def test_document_signed_by_the_origin_verifies_at_the_supplier(home, request_a):
    approval = _verify(home, _document(home, request_a), request_a)
    assert (approval["user"], approval["site"], approval["decision"]) == ("origin_officer", "origin", "approve")
    assert approval["signed_by"] == "origin" and approval["request_id"] == "prepare-a"


@pytest.mark.parametrize("case,match", [
    ("altered", "not signed by site origin .*forged or altered"),
    ("forged", "not signed by site origin .*forged or altered"),
    ("other-key", "not signed by site origin .*unknown signing key"),
    ("other-request", "it answers request prepare-b, not this one"),
    ("other-digest", "it names model .* not "),
    ("other-end-use", "it approves end use 'targeting', not 'evaluation'"),
    ("not-an-officer", "may not decide it"),
])
def test_document_that_does_not_hold_is_refused_and_audited(home, request_a, case, match):
    supplier = SitePaths.of("supplier", home)
    if case == "altered":
        document = {**_document(home, request_a), "decision": "approve", "comment": "edited in transit"}
    elif case == "forged":
        document = {**_document(home, request_a), "signature": "MEUCIQ" + "A" * 90}
    elif case == "other-key":  # the supplier signs a document claiming to be the origin's
        document = {**_document(home, request_a, signer="supplier"), "signer": "origin"}
    elif case == "other-request":  # replayed into another request
        document = _document(home, request_a, request_id="prepare-b")
    elif case == "other-digest":
        document = _document(home, request_a, model_digest="sha256:" + "0" * 64)
    elif case == "other-end-use":  # approved for one end use, released for another
        document = _document(home, request_a, end_use="targeting")
    else:
        document = sign_document(SitePaths.of("origin", home), recipient="supplier", gate_name="model_release",
                                 request_id="prepare-a", model_uri=request_a["model"], model_digest=request_a["digest"],
                                 approval={"user": "origin_engineer", "site": "origin", "roles": ["engineer"],
                                           "decision": "approve"}, end_use=request_a["end_use"])
    before = len(_actions(supplier, "approval.document"))
    with pytest.raises(ApprovalRefused, match=match):
        _verify(home, document, request_a)
    (entry,) = _actions(supplier, "approval.document")[before:]
    assert entry["outcome"] != "approve"


def test_approval_for_another_request_or_model_is_refused_at_intake_and_kept_aside(home, m5, request_a):
    """An origin-signed approval naming no request in review, or another model digest, arrives in a
    real package: intake moves it to inbox/rejected with the reason and the request stays in review."""
    from pipelines.steps.exchange import _seal_to_outbox

    origin = _ctx(home, "origin")
    supplier = _ctx(home, "supplier", run_id="release-a", dag_id="stage_5_export_release")
    rejected = supplier.paths.inbox / "rejected"
    for name, document, reason in (
        ("unknown", _document(home, request_a, request_id="never-asked"),
         "'never-asked', which is not an export request in review"),
        ("digest", _document(home, request_a, model_digest="sha256:" + "1" * 64), "it names model"),
    ):
        content = origin.paths.state_dir / f"{name}-approval.json"
        content.write_text(json.dumps(document))
        header, _ = _seal_to_outbox(origin, "supplier", content, purpose="review", content_type="approval",
                                    metadata={"kind": "m5-approval-bad"})
        _carry(home, "origin", "supplier")
        with pytest.raises(StepError, match="no acceptable m5-approval-bad package"):
            run_step("receive_approval", supplier, kind="m5-approval-bad")
        kept = rejected / f"m5-approval-bad-{header['package_id']}.sfp"
        assert kept.is_file() and reason in json.loads(Path(f"{kept}.reason.json").read_text())["reason"]
    assert _requests(home)["prepare-a"]["status"] == "in_review"


def test_review_package_whose_model_is_not_the_requested_one_is_refused(home, m5):
    """The origin computes the digest of what it received; a request naming another digest is refused."""
    from pipelines.learning import registry
    from pipelines.steps.exchange import release_checked_model

    supplier = _ctx(home, "supplier", run_id="prepare-x")
    ref = registry.resolve_model(supplier.paths, f"{m5['name']}/{m5['version']}")
    request = {"request_id": "prepare-x", "model": ref.uri, "digest": "sha256:" + "2" * 64, "stage": "M5",
               "destination": "destination", "variant": "default", "thresholds": {}, "requested_by": "svc-supplier"}
    release_checked_model(supplier, ref, recipient="origin", purpose="review", kind="m5-review-bad",
                          key="m5-review-bad:prepare-x", approvals=[], metadata={"request": request})
    _carry(home, "supplier", "origin")
    origin = _ctx(home, "origin")
    with pytest.raises(StepError, match="no acceptable m5-review-bad package"):
        run_step("receive_review", origin, kind="m5-review-bad", test_sets={"origin_test": "test"})
    (reason,) = [json.loads(p.read_text())["reason"]
                 for p in (origin.paths.inbox / "rejected").glob("m5-review-bad-*.reason.json")]
    assert "the model's digest is not" in reason


def test_send_approval_refuses_an_answer_not_signed_here_and_sends_nothing(home, m5):
    _request(home, m5, "prepare-6")
    _carry(home, "supplier", "origin")
    origin = _ctx(home, "origin", run_id="review-6", dag_id="stage_5_export_review")
    review = run_step("receive_review", origin, kind="m5-review", test_sets={"origin_test": "test"})
    before = set(origin.paths.outbox.glob("m5-approval-*.sfp"))
    supplier_signed = _answer(_ctx(home, "supplier", run_id="review-6", dag_id="stage_5_export_review"),
                              user="origin_officer", role="compliance_officer")
    forged = {**supplier_signed, "owner_site": "origin"}
    with pytest.raises(ApprovalRefused, match="not signed by site origin"):
        run_step("send_approval", origin, review=review, approval=forged, recipient="supplier", kind="m5-approval")
    with pytest.raises(StepError, match="came from supplier; its decision goes back there, not to destination"):
        run_step("send_approval", origin, review=review, approval=forged, recipient="destination", kind="m5-approval")
    assert set(origin.paths.outbox.glob("m5-approval-*.sfp")) == before


def test_evidence_shows_the_reviewed_model_beside_the_sites_own_models():
    from pipelines.steps.review import _evidence

    text = _evidence({"stage": "M5", "here": "digits-cnn-m5-default/2", "metrics": {"origin_test": 0.87},
                      "comparison": [
                          {"label": "previous version (it would replace)", "model": "digits-cnn-m5-default/1",
                           "metrics": {"origin_test": 0.86}},
                          {"label": "M3 (origin's own)", "model": "digits-cnn-m3/1", "metrics": {"origin_test": 0.92}},
                          {"label": "M4 (origin's own)", "model": "digits-cnn-m4/2", "metrics": {}}]})
    assert text.splitlines()[:7] == [
        r"| model | origin\_test |", "|---|---|",
        r"| **M5 under review** digits\-cnn\-m5\-default/2 | 0.8700 |",
        r"| previous version \(it would replace\) digits\-cnn\-m5\-default/1 | 0.8600 (M5 +0.0100) |",
        r"| M3 \(origin's own\) digits\-cnn\-m3/1 | 0.9200 (M5 -0.0500) |",
        r"| M4 \(origin's own\) digits\-cnn\-m4/2 |  |",
        "",
    ]
