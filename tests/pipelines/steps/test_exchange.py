"""release_model and receive_model with a small real model, without Airflow.

One module-scoped workspace: the supplier trains a short M1 (real data, real MLflow, real DVC),
then each test releases or receives it through the real gate, sealed package and registry.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from pipelines.learning import registry
from pipelines.steps import StepContext, StepError, run_step
from pipelines.trust import audit
from pipelines.workspace import SitePaths


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    from pipelines.init import init_workspace

    home = tmp_path_factory.mktemp("factory")
    init_workspace(home)
    return home


@pytest.fixture(scope="module")
def m1(home: Path) -> dict:
    """A registered supplier M1, trained with the short `local` profile."""
    ctx = _ctx(home, "supplier")
    trained = run_step("train_model", ctx, stage="M1", profile="local", datasets=["train"])
    evaluated = run_step("evaluate_model", ctx, trained=trained, test_sets={"supplier_test": "test"})
    exported = run_step("export_model", ctx, trained=evaluated, parity_set="test")
    return run_step("register_model", ctx, trained=exported)


def _ctx(home: Path, site: str) -> StepContext:
    return StepContext(site=site, paths=SitePaths.of(site, home), run_id="test-run", dag_id="test")


def _inbox(home: Path, site: str) -> list[Path]:
    return sorted(SitePaths.of(site, home).inbox.glob("*.sfp"))


def _outbox(home: Path, site: str) -> list[Path]:
    return sorted(SitePaths.of(site, home).outbox.glob("*.sfp"))


def _carry(home: Path, sender: str, recipient: str) -> dict:
    from pipelines.carrier.media import hand_over

    return hand_over(SitePaths.of(sender, home), SitePaths.of(recipient, home))


def _actions(paths: SitePaths, action: str) -> list[dict]:
    return [entry for entry in audit.entries(paths) if entry["action"] == action]


def test_release_model_seals_signed_model_for_recipient_once(home, m1):
    """The sender writes only to its own outbox; nothing appears in the recipient's home."""
    supplier = _ctx(home, "supplier")
    before, inbox_before = set(_outbox(home, "supplier")), set(_inbox(home, "origin"))
    record = run_step("release_model", supplier, model=m1, recipient="origin", purpose="collaboration", kind="m1")
    package = Path(record["package"])
    assert set(_outbox(home, "supplier")) - before == {package}
    assert set(_inbox(home, "origin")) == inbox_before
    assert record["model"] == f"{m1['name']}/{m1['version']}" and record["recipient"] == "origin"
    released = [e for e in _actions(supplier.paths, "model.released") if e["details"]["package_id"] == record["package_id"]]
    assert len(released) == 1 and released[0]["details"]["recipient"] == "origin"
    # A re-run of the finished step returns the same package instead of sealing a second one.
    again = run_step("release_model", supplier, model=m1, recipient="origin", purpose="collaboration", kind="m1")
    assert again == record and set(_outbox(home, "supplier")) - before == {package}


def test_release_model_below_run_threshold_seals_nothing(home, m1):
    supplier = _ctx(home, "supplier")
    before = set(_outbox(home, "supplier"))
    with pytest.raises(StepError, match="below this run's threshold"):
        run_step("release_model", supplier, model=m1, recipient="destination", purpose="collaboration",
                 kind="m1-strict", thresholds={"supplier_test": 1.01})
    assert set(_outbox(home, "supplier")) == before


def test_release_model_denied_by_gate_seals_nothing(home, m1):
    """An export without licence evidence, approvals or watermark is denied by model_release."""
    supplier = _ctx(home, "supplier")
    before = set(_outbox(home, "supplier"))
    with pytest.raises(StepError, match="model_release gate denied"):
        run_step("release_model", supplier, model=m1, recipient="destination", purpose="export", kind="m5")
    assert set(_outbox(home, "supplier")) == before
    denials = [e for e in _actions(supplier.paths, "policy.decision") if e["outcome"] == "deny"]
    assert denials, "the denial is in the supplier's audit log"


def test_receive_model_verifies_registers_and_evaluates_where_the_data_lives(home, m1):
    supplier, origin = _ctx(home, "supplier"), _ctx(home, "origin")
    sent = run_step("release_model", supplier, model=m1, recipient="origin", purpose="collaboration", kind="m1")
    _carry(home, "supplier", "origin")
    record = run_step("receive_model", origin, kind="m1", test_sets={"origin_test": "test"})
    assert record["package_id"] == sent["package_id"] and record["from"] == "supplier"
    assert 0.0 <= record["metrics"]["origin_test"] <= 1.0
    ref = registry.resolve_model(origin.paths, f"{record['name']}/{record['version']}")
    assert ref.metadata["stage"] == "M1" and (ref.model_dir / "model.sig").is_file()
    # Receiving again returns what the last intake gave; nothing is registered twice.
    assert run_step("receive_model", origin, kind="m1", test_sets={"origin_test": "test"}) == record


def test_package_tampered_in_transit_is_refused_and_nothing_registered(home, m1, tmp_path):
    supplier, destination = _ctx(home, "supplier"), _ctx(home, "destination")
    sent = run_step("release_model", supplier, model=m1, recipient="destination", purpose="collaboration",
                    kind="m1-tamper")
    package = Path(sent["package"])
    data = bytearray(package.read_bytes())
    data[-100] ^= 0x01
    package.write_bytes(bytes(data))
    models_before = sorted(p for p in destination.paths.models_dir.rglob("*")) if destination.paths.models_dir.exists() else []
    (row,) = _carry(home, "supplier", "destination")["files"]
    assert row["status"] == "refused" and row["reason"]
    assert not [p for p in _inbox(home, "destination") if "m1-tamper" in p.name]
    with pytest.raises(StepError, match="no acceptable m1-tamper package"):
        run_step("receive_model", destination, kind="m1-tamper", test_sets={"destination_test": "test"})
    models_after = sorted(p for p in destination.paths.models_dir.rglob("*")) if destination.paths.models_dir.exists() else []
    assert models_after == models_before
    assert not list(destination.paths.state_dir.glob("open-*")), "no scratch left behind"
    assert not (destination.paths.state_dir / "received.json").exists() or \
        sent["package_id"] not in json.loads((destination.paths.state_dir / "received.json").read_text())


def test_release_dir_with_approvals_is_a_copy_with_its_own_provenance(home, m1):
    from pipelines.steps.exchange import _release_dir
    from pipelines.trust.provenance import PROVENANCE_FILE

    supplier = _ctx(home, "supplier")
    ref = registry.resolve_model(supplier.paths, f"{m1['name']}/{m1['version']}")
    registered = (ref.model_dir / PROVENANCE_FILE).read_bytes()
    approvals = [{"user": "origin_officer", "site": "origin", "roles": ["compliance_officer"], "decision": "approve"}]
    with _release_dir(supplier, ref, approvals) as release:
        assert release != ref.model_dir
        envelope = json.loads((release / PROVENANCE_FILE).read_text())
        assert "origin_officer" in base64.b64decode(envelope["payload"]).decode()
        scratch = release.parent
    assert not scratch.exists(), "the release copy is removed after sealing"
    assert (ref.model_dir / PROVENANCE_FILE).read_bytes() == registered, "the registered model is untouched"
    with _release_dir(supplier, ref, []) as release:
        assert release == ref.model_dir


FORGED = [
    {"user": "origin_officer", "site": "origin", "roles": ["compliance_officer"], "decision": "approve"},
    {"gate": "model_release", "owner_site": "origin", "dag_id": "test", "run_id": "test-run",
     "chosen_options": ["Approve"], "responded_by": "origin_officer", "key_id": "0" * 16,
     "signed_at": "2026-12-04T10:00:00Z", "signature": "AAAA"},
    {"gate": "model_release", "owner_site": "../origin", "responded_by": "origin_officer", "signature": "AAAA"},
]


@pytest.mark.parametrize("forged", FORGED, ids=["recheck-output", "bad-signature", "owner-path"])
def test_release_refuses_forged_approval_and_seals_nothing(home, m1, forged):
    """An approval written through the API (a re-check's plain output, a made-up signature, a path as
    owner) is refused by the release step itself; the refusal is audited where it was checked (the
    releasing site) and nothing is sealed."""
    from pipelines.approvals import ApprovalRefused

    supplier, origin = _ctx(home, "supplier"), _ctx(home, "origin")
    before = set(_outbox(home, "supplier"))
    at_origin = len(_actions(origin.paths, "approval.answered"))
    refusals = len(_actions(supplier.paths, "approval.answered"))
    with pytest.raises(ApprovalRefused, match="not signed by site origin|not a configured site"):
        run_step("release_model", supplier, model=m1, recipient="destination", purpose="collaboration",
                 kind="m1-forged", approvals=[forged])
    assert set(_outbox(home, "supplier")) == before
    expected = "forged" if forged.get("owner_site") == "origin" else "invalid"
    assert [e["outcome"] for e in _actions(supplier.paths, "approval.answered")[refusals:]] == [expected]
    assert len(_actions(origin.paths, "approval.answered")) == at_origin, "nothing is written at the origin"


def test_release_accepts_an_answer_of_this_run_signed_by_its_owner_site(home, m1):
    from pipelines.approvals import ApprovalRefused, sign_answer

    supplier, origin = _ctx(home, "supplier"), _ctx(home, "origin")
    answer = sign_answer(origin.paths, {
        "gate": "model_release", "owner_site": "origin", "required_role": "compliance_officer",
        "dag_id": supplier.dag_id, "run_id": supplier.run_id, "task_id": "origin_approval",
        "chosen_options": ["Approve"], "comment": "metrics read", "responded_by": "origin_officer",
        "responded_at": "2026-12-04T10:00:00+00:00"})
    record = run_step("release_model", supplier, model=m1, recipient="origin", purpose="collaboration",
                      kind="m1-approved", approvals=[answer])
    released = [e for e in _actions(supplier.paths, "model.released") if e["details"]["package_id"] == record["package_id"]]
    assert released[0]["details"]["approvals"][0]["user"] == "origin_officer"
    # The same signed answer replayed into another run is refused.
    other = StepContext(site="supplier", paths=supplier.paths, run_id="another-run", dag_id="test")
    with pytest.raises(ApprovalRefused, match="not this run"):
        run_step("release_model", other, model=m1, recipient="destination", purpose="collaboration",
                 kind="m1-replayed", approvals=[answer])
    # Signed by the supplier's own key but claiming the origin as owner: refused.
    claimed = sign_answer(supplier.paths, {**{k: v for k, v in answer.items()
                                              if k not in ("key_id", "signed_at", "signature")}})
    with pytest.raises(ApprovalRefused, match="not signed by site origin"):
        run_step("release_model", supplier, model=m1, recipient="destination", purpose="collaboration",
                 kind="m1-claimed", approvals=[claimed])


def test_junk_in_the_inbox_is_moved_aside_and_intake_goes_on(home, m1):
    """A junk file (deeply nested JSON where a header belongs) with a future mtime no longer blocks
    the inbox: it is rejected with a reason, audited, and the valid package behind it is taken."""
    import os
    import time

    supplier, origin = _ctx(home, "supplier"), _ctx(home, "origin")
    sent = run_step("release_model", supplier, model=m1, recipient="origin", purpose="collaboration", kind="m1-junk")
    _carry(home, "supplier", "origin")
    junk = origin.paths.inbox / "m1-junk-000000000000.sfp"
    junk.write_bytes(b"SFP" + b"[" * 200_000)
    future = time.time() + 3600
    os.utime(junk, (future, future))
    record = run_step("receive_model", origin, kind="m1-junk", test_sets={"origin_test": "test"})
    assert record["package_id"] == sent["package_id"]
    rejected = origin.paths.inbox / "rejected"
    assert (rejected / junk.name).is_file() and not junk.exists()
    assert json.loads((rejected / f"{junk.name}.reason.json").read_text())["reason"]
    assert [e for e in _actions(origin.paths, "package.quarantined") if e["object"] == junk.name]


@pytest.mark.parametrize("name", ["../../inbox/evil", "/tmp/evil", "a/../../b"])
def test_received_model_with_unsafe_name_is_refused_and_nothing_written(home, m1, tmp_path, name):
    """A keyed but malicious partner signs a model whose metadata names a path: refused, kept aside."""
    from pipelines.steps.training import publish_model_dir
    from pipelines.trust import packages

    supplier, origin = _ctx(home, "supplier"), _ctx(home, "origin")
    ref = registry.resolve_model(supplier.paths, f"{m1['name']}/{m1['version']}")
    evil = tmp_path / "evil-model"
    shutil.copytree(ref.model_dir, evil)
    meta = json.loads((evil / "metadata.json").read_text())
    (evil / "metadata.json").write_text(json.dumps({**meta, "name": name}))
    for stale in ("model.sig", "provenance.dsse.json", "bom.cdx.json"):
        (evil / stale).unlink()
    publish_model_dir(supplier, evil)  # signed by the supplier's real key: only the name is hostile
    package = origin.paths.inbox / "m1-evil-000000000001.sfp"
    packages.seal(supplier.paths, "origin", evil, package, purpose="collaboration", content_type="model")
    models_before = sorted(origin.paths.models_dir.rglob("*"))
    outside = sorted(p for p in home.rglob("evil*"))
    with pytest.raises(StepError, match="no acceptable m1-evil package"):
        run_step("receive_model", origin, kind="m1-evil", test_sets={"origin_test": "test"})
    assert sorted(origin.paths.models_dir.rglob("*")) == models_before
    assert sorted(p for p in home.rglob("evil*")) == outside
    reason = json.loads((origin.paths.inbox / "rejected" / f"{package.name}.reason.json").read_text())["reason"]
    assert "not a plain name" in reason


def test_any_step_first_removes_plaintext_a_killed_open_left(home):
    """A step killed while opening leaves decrypted content in `.opening-*`; the next step at that
    site removes it before doing anything else."""
    import os
    import time

    origin = _ctx(home, "origin")
    leftover = origin.paths.state_dir / "open-killed" / ".opening-abc123"
    leftover.mkdir(parents=True)
    (leftover / "plaintext.parquet").write_bytes(b"secret rows")
    old = time.time() - 60
    os.utime(leftover, (old, old))
    with pytest.raises(StepError):
        run_step("receive_dataset", origin, kind="nothing-pending", name="nothing")
    assert not leftover.exists()
