"""Membership-inference audits where the data lives (pipelines.protection.membership).

The attack on real models (a small network overfitted on few digits rows, one that never saw the
audited rows); the model_release gate through the real policy engine and the shipped policy data;
then one module workspace: the origin releases its export-authorized data, the supplier trains M5 on
it, the origin audits it at review (figures on the page, in the review, as tags and audit entries,
signed into its approval), the supplier's export gate reads the signed figures; the origin audits a
model it receives at intake; `factory privacy audit` by hand.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipelines.protection import membership
from pipelines.steps import StepContext, StepError, run_step
from pipelines.trust import audit
from pipelines.workspace import SitePaths

ANSWERED_AT = "2026-12-04T10:00:00+00:00"


# ---------------------------------------------------------------------------- the attack on real models


def _digits(rows: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    from pipelines.data.builder import digits

    x, y = digits()
    return x.reshape(len(x), -1)[offset:offset + rows].astype(np.float32), y[offset:offset + rows]


def _fit(x: np.ndarray, y: np.ndarray, steps: int = 400):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        optimiser.step()
    return model


def _figures(model, members, non_members) -> dict:
    return membership.audit_logits((membership.model_logits(model, members[0]), members[1]),
                                   (membership.model_logits(model, non_members[0]), non_members[1]))


def test_an_overfitted_model_gives_its_few_training_rows_away():
    members, non_members = _digits(40, 0), _digits(200, 400)
    figures = _figures(_fit(*members), members, (non_members[0][:40], non_members[1][:40]))
    assert figures["auc"] > 0.9 and figures["advantage"] > 0.6
    # members found before any non-member is guessed: above the 1 % of chance (a loss threshold is weak at
    # low FPR on digits, where many unseen images are easy too)
    assert figures["tpr_at_1pct_fpr"] > 0.05
    assert figures["members"] == figures["non_members"] == 40


def test_a_model_that_never_saw_the_rows_tells_nothing():
    model = _fit(*_digits(200, 0))
    figures = _figures(model, _digits(150, 600), _digits(150, 900))  # neither side trained on
    assert abs(figures["auc"] - 0.5) < 0.1


def test_gate_audit_takes_only_well_formed_figures_and_the_verified_signer_as_owner():
    figures = {"auc": 0.6, "tpr_at_1pct_fpr": 0.05, "advantage": 0.2, "members": 100, "non_members": 100,
               "attack": "loss-threshold", "model_digest": "sha256:" + "a" * 64, "owner": "destination"}
    entry = membership.gate_audit(figures, owner="origin")
    assert entry["owner"] == "origin" and entry["auc"] == 0.6 and entry["model_digest"] == "sha256:" + "a" * 64
    for broken in ({"auc": 1.5}, {"auc": "0.6"}, {"tpr_at_1pct_fpr": True}, {"members": 0},
                   {"model_digest": "sha256:12"}, {"model_digest": None}):
        assert membership.gate_audit({**figures, **broken}, owner="origin") is None
    assert membership.gate_audit(None, owner="origin") is None


# ---------------------------------------------------------------------------- the gate (real policy engine)


@pytest.fixture
def export_input() -> dict:
    from pipelines.policy.testing import ALLOWED_EXPORT

    document = copy.deepcopy(ALLOWED_EXPORT)
    document["model"]["digest"] = "sha256:" + "b" * 64
    document["model"]["membership_audits"] = []
    return document


def _audit(digest: str, **figures) -> dict:
    return {"owner": "origin", "model_digest": digest, "attack": "loss-threshold", "auc": 0.6,
            "tpr_at_1pct_fpr": 0.05, "advantage": 0.2, "members": 100, "non_members": 100, **figures}


def _membership_reasons(document: dict) -> tuple[bool, list[str]]:
    from pipelines.policy import evaluate

    decision = evaluate("model_release", document)
    return decision.allow, [r for r in decision.reasons if "membership" in r]


def test_the_shipped_policy_denies_an_export_without_the_origins_audit(export_input):
    allowed, reasons = _membership_reasons(export_input)
    assert not allowed and len(reasons) == 1
    assert "holds data of origin, whose export policy requires its membership-inference audit" in reasons[0]
    assert '"auc": 0.8' in reasons[0] and '"tpr_at_1pct_fpr": 0.2' in reasons[0]


def test_the_shipped_policy_denies_an_audit_over_the_limit_or_of_other_weights(export_input):
    digest = export_input["model"]["digest"]
    export_input["model"]["membership_audits"] = [_audit(digest, auc=0.93)]
    allowed, reasons = _membership_reasons(export_input)
    assert not allowed and reasons == [
        "membership-inference audit of model digits-cnn-export/3 by origin: auc 0.93 is above the export limit 0.8"]
    export_input["model"]["membership_audits"] = [_audit("sha256:" + "c" * 64)]
    allowed, reasons = _membership_reasons(export_input)
    assert not allowed and "requires its membership-inference audit of this model" in reasons[0]
    export_input["model"]["membership_audits"] = [_audit(digest) | {"owner": "supplier"}]
    assert not _membership_reasons(export_input)[0]


def test_the_shipped_policy_allows_an_export_the_origin_audited_within_the_limits(export_input):
    export_input["model"]["membership_audits"] = [_audit(export_input["model"]["digest"], auc=0.8)]
    assert _membership_reasons(export_input) == (True, [])


# ---------------------------------------------------------------------------- where the data lives


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    from pipelines.init import init_workspace

    home = tmp_path_factory.mktemp("factory")
    init_workspace(home)
    return home


def _ctx(home: Path, site: str, run_id: str = "test-run", dag_id: str = "test") -> StepContext:
    return StepContext(site=site, paths=SitePaths.of(site, home), run_id=run_id, dag_id=dag_id)


def _carry(home: Path, sender: str, recipient: str) -> None:
    from pipelines.carrier.media import hand_over

    hand_over(SitePaths.of(sender, home), SitePaths.of(recipient, home))


def _answer(ctx: StepContext, *, user: str, role: str, gate: str = "model_release") -> dict:
    from pipelines.approvals import sign_answer

    return sign_answer(ctx.paths, {
        "gate": gate, "owner_site": ctx.site, "required_role": role, "dag_id": ctx.dag_id, "run_id": ctx.run_id,
        "task_id": "approval", "chosen_options": ["Approve"], "comment": "read", "responded_by": user,
        "responded_at": ANSWERED_AT})


@pytest.fixture(scope="module")
def m5(home: Path) -> dict:
    """M5 on the supplier's data and the origin's export-authorized data, as stage 5 trains it."""
    origin = _ctx(home, "origin", run_id="release-export-data", dag_id="stage_5_export_data_release")
    sanitized = run_step("sanitize_dataset", origin, dataset="export_authorized", purpose="export")
    validated = run_step("validate_dataset", origin, dataset=sanitized, suite="release")
    run_step("release_dataset", origin, dataset=sanitized, recipient="supplier", purpose="export",
             kind="origin-export", validation=validated,
             approvals=[_answer(origin, user="origin_officer", role="compliance_officer", gate="data_release")])
    _carry(home, "origin", "supplier")
    supplier = _ctx(home, "supplier", run_id="prepare", dag_id="stage_5_export_preparation")
    received = run_step("receive_dataset", supplier, kind="origin-export", name="origin-export")
    run_step("validate_dataset", supplier, dataset=received, suite="training")
    trained = run_step("train_model", supplier, stage="M5", profile="export", datasets=["train", "origin-export"],
                       variant="default", recipient="destination")
    evaluated = run_step("evaluate_model", supplier, trained=trained, test_sets={"supplier_test": "test"})
    exported = run_step("export_model", supplier, trained=evaluated, parity_set="test")
    return {**run_step("register_model", supplier, trained=exported), "sanitized": sanitized["dataset_id"],
            "raw": sanitized["source_id"]}


def _review(home: Path, m5: dict, run_id: str) -> dict:
    supplier = _ctx(home, "supplier", run_id=f"prepare-{run_id}", dag_id="stage_5_export_preparation")
    run_step("request_review", supplier, model=m5, recipient="origin", kind="m5-review", destination="destination",
             variant="default")
    _carry(home, "supplier", "origin")
    origin = _ctx(home, "origin", run_id=f"review-{run_id}", dag_id="stage_5_export_review")
    return run_step("receive_review", origin, kind="m5-review", test_sets={"origin_test": "test"})


@pytest.fixture(scope="module")
def reviewed(home: Path, m5: dict) -> dict:
    """The origin's review of M5 (the first: its audit is the origin's first)."""
    return _review(home, m5, "a")


def _approve_and_release(home: Path, review: dict, run_id: str) -> dict:
    origin = _ctx(home, "origin", run_id=f"review-{run_id}", dag_id="stage_5_export_review")
    answer = _answer(origin, user="origin_officer", role="compliance_officer")
    run_step("send_approval", origin, review=review, approval=answer, recipient="supplier", kind="m5-approval")
    _carry(home, "origin", "supplier")
    supplier = _ctx(home, "supplier", run_id=f"release-{run_id}", dag_id="stage_5_export_release")
    decided = run_step("receive_approval", supplier, kind="m5-approval")
    return run_step("release_export", supplier, request=decided, recipient="destination", kind="m5",
                    approvals=[_answer(supplier, user="supplier_export_officer", role="export_control_officer")])


def _member_ids(home: Path, m5: dict) -> set[str]:
    from pipelines.data.catalog import load_dataset
    from pipelines.data.schema import ID_COLUMN

    frame, _ = load_dataset(SitePaths.of("origin", home), m5["sanitized"])
    return set(frame[ID_COLUMN].astype(str))


def test_the_origin_audits_m5_at_review_and_keeps_only_the_figures(home, m5, reviewed):
    from pipelines.learning import registry
    from pipelines.learning.artifacts import model_digest

    review = reviewed
    origin = SitePaths.of("origin", home)
    result = review["membership"]
    assert result["audited"] and result["attack"] == "loss-threshold"
    # members: the sanitized release the model trained on (100 rows), never the raw partition it came from
    assert result["member_datasets"] == [m5["sanitized"]] and m5["raw"] not in json.dumps(result)
    (tested,) = result["non_member_datasets"]
    assert tested.startswith("origin/test@") and result["members"] == result["non_members"] == 100
    # the default M5 measures AUC 0.62-0.72 and TPR 0-0.08 (watermark keys, draws): within the shipped limits
    assert 0.55 < result["auc"] < 0.8 and 0.0 <= result["tpr_at_1pct_fpr"] < 0.2
    here = registry.resolve_model(origin, review["here"])
    assert result["model_digest"] == model_digest(here.model_dir) == review["digest"]
    # on the officer's page and in the record
    (row,) = [line for line in review["evidence"].splitlines() if line.startswith("| membership inference |")]
    auc = f"{result['auc']:.3f}".replace(".", "\\.")
    assert row.startswith(f"| membership inference | pass | required | AUC {auc}, TPR@1%FPR ")
    assert row.endswith("\\(100 members, 100 non\\-members\\); limits auc 0\\.8, tpr\\_at\\_1pct\\_fpr 0\\.2 |")
    assert review["membership_summary"].startswith(f"loss-threshold attack AUC {result['auc']:.3f}")
    assert here.tags["factory.membership.auc"] == str(result["auc"])
    assert here.tags["factory.membership.member_datasets"] == m5["sanitized"]
    (entry,) = [e for e in audit.entries(origin)
                if e["action"] == "model.membership_audit" and e["object"] == review["here"]]
    assert entry["details"]["auc"] == result["auc"] and entry["details"]["members"] == 100
    # no member record id anywhere the audit wrote: the review record, the log entry
    written = json.dumps(review) + json.dumps(entry) + (origin.state_dir / "export-reviews.json").read_text()
    assert not any(record_id in written for record_id in _member_ids(home, m5))


def test_the_signed_approval_carries_the_audit_and_the_export_gate_allows_it(home, m5):
    review = _review(home, m5, "b")
    released = _approve_and_release(home, review, "b")
    supplier = SitePaths.of("supplier", home)
    requests = json.loads((supplier.state_dir / "export-requests.json").read_text())
    signed = requests["prepare-b"]["approval"]["membership_audit"]
    assert signed["model_digest"] == review["digest"] and signed["auc"] == review["membership"]["auc"]
    assert requests["prepare-b"]["status"] == "released" and released["recipient"] == "destination"
    # the destination holds none of its own data in M5: it receives it without an audit of its own
    _carry(home, "supplier", "destination")
    received = run_step("receive_model", _ctx(home, "destination"), kind="m5", test_sets={"destination_test": "test"})
    assert received["membership"]["no_members"] and not received["membership"]["audited"]
    assert not [e for e in audit.entries(SitePaths.of("destination", home)) if e["action"] == "model.membership_audit"]


def test_an_approval_without_the_owners_audit_is_denied_at_the_export_gate(home, m5):
    from pipelines.fileio import update_json

    review = _review(home, m5, "c")
    origin = SitePaths.of("origin", home)
    with update_json(origin.state_dir / "export-reviews.json", {}) as reviews:  # an origin that did not audit
        reviews[review["review_id"]].pop("membership")
    with pytest.raises(StepError, match="whose export policy requires its membership-inference audit of this model"):
        _approve_and_release(home, review, "c")
    requests = json.loads((SitePaths.of("supplier", home).state_dir / "export-requests.json").read_text())
    assert "membership_audit" not in requests["prepare-c"]["approval"]
    assert requests["prepare-c"]["status"] == "approved"  # approved by the origin, not released


def test_the_origin_audits_a_model_holding_its_data_at_intake(home, m5):
    supplier = _ctx(home, "supplier", run_id="share-m5", dag_id="test")
    run_step("release_model", supplier, model=m5, recipient="origin", purpose="collaboration", kind="m5-shared")
    _carry(home, "supplier", "origin")
    received = run_step("receive_model", _ctx(home, "origin", run_id="intake"), kind="m5-shared",
                        test_sets={"origin_test": "test"})
    result = received["membership"]
    assert result["audited"] and result["member_datasets"] == [m5["sanitized"]] and result["members"] == 100
    origin = SitePaths.of("origin", home)
    objects = [e["object"] for e in audit.entries(origin) if e["action"] == "model.membership_audit"]
    assert f"{received['name']}/{received['version']}" in objects


def test_privacy_audit_command_runs_the_audit_by_hand(home, m5, reviewed, monkeypatch):
    from pipelines.cli import main

    monkeypatch.setenv("FACTORY_HOME", str(home))
    monkeypatch.setenv("FACTORY_ACTOR", "origin_officer")
    runner = CliRunner()
    shown = runner.invoke(main, ["privacy", "audit", "--site", "origin", "--model", "M5", "--json"])
    assert shown.exit_code == 0, shown.output
    result = json.loads(shown.output)
    assert result["audited"] and result["site"] == "origin" and result["member_datasets"] == [m5["sanitized"]]
    entries = [e for e in audit.entries(SitePaths.of("origin", home)) if e["action"] == "model.membership_audit"]
    assert entries[-1]["actor"] == "origin_officer" and entries[-1]["details"]["auc"] == result["auc"]
    # another draw, named datasets: the raw partition the model never saw as members is close to chance
    other = runner.invoke(main, ["privacy", "audit", "--site", "origin", "--model", "M5", "--members", "private",
                                 "--seed", "3", "--json"])
    assert other.exit_code == 0, other.output
    assert abs(json.loads(other.output)["auc"] - 0.5) < 0.12
    missing = runner.invoke(main, ["privacy", "audit", "--site", "origin", "--model", "M5", "--members", "nope"])
    assert missing.exit_code == 1 and "nope" in missing.output
    supplier_side = runner.invoke(main, ["privacy", "audit", "--site", "supplier", "--model", "M1"])
    assert supplier_side.exit_code != 0


def test_report_shows_the_owners_audit_beside_the_model(home, m5, reviewed):
    from pipelines.report import build_report, render_membership

    report = build_report(home)
    (row,) = [r for r in report["stages"] if r["model"] == "M5"]
    assert set(row["membership"]) == {"origin"}  # only the data owner audits; the destination holds none of its data
    figures = row["membership"]["origin"]
    assert 0.5 < figures["auc"] < 0.8 and figures["members"] == 100
    assert render_membership(report).row_count == 1
