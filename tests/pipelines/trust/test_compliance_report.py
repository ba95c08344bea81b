"""`factory audit report`: a site's decisions, approvals, releases, receipts, quarantines and key events
from its real audit log, every value escaped, the chain's verification at the top.

One module-scoped workspace where real steps write the entries: the origin releases data to the
supplier through the real data_release gate with its officer's signed answer (whose comment is
hostile HTML), a release without an approval is denied, a package damaged in transit is quarantined
at the supplier, and the origin rotates its keys.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from markupsafe import escape

from pipelines.approvals import sign_answer
from pipelines.cli import main
from pipelines.steps import StepContext, StepError, run_step
from pipelines.trust import audit, compliance, rotation
from pipelines.workspace import SitePaths

HOSTILE = "<script>alert('officer')</script> checked the report"


def _ctx(home: Path, site: str, run_id: str = "release-run") -> StepContext:
    return StepContext(site=site, paths=SitePaths.of(site, home), run_id=run_id, dag_id="stage_5_export_data_release")


def _answer(ctx: StepContext, comment: str) -> dict:
    return sign_answer(ctx.paths, {
        "gate": "data_release", "owner_site": ctx.site, "required_role": "compliance_officer",
        "dag_id": ctx.dag_id, "run_id": ctx.run_id, "task_id": "release_approval", "chosen_options": ["Approve"],
        "comment": comment, "responded_by": "origin_officer", "responded_at": "2026-12-04T10:00:00+00:00"})


def _carry(home: Path, sender: str, recipient: str) -> None:
    from pipelines.carrier.media import hand_over

    hand_over(SitePaths.of(sender, home), SitePaths.of(recipient, home))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    from pipelines.init import init_workspace

    home = tmp_path_factory.mktemp("factory")
    init_workspace(home)
    origin = _ctx(home, "origin")
    sanitized = run_step("sanitize_dataset", origin, dataset="export_authorized", purpose="export")
    validated = run_step("validate_dataset", origin, dataset=sanitized, suite="release")
    with pytest.raises(StepError, match="data_release gate denied"):
        run_step("release_dataset", origin, dataset=sanitized, recipient="supplier", purpose="export",
                 kind="origin-export", approvals=None, validation=validated)
    released = run_step("release_dataset", origin, dataset=sanitized, recipient="supplier", purpose="export",
                        kind="origin-export", approvals=[_answer(origin, HOSTILE)], validation=validated)
    damaged = run_step("release_dataset", origin, dataset=sanitized, recipient="supplier", purpose="export",
                       kind="damaged", approvals=[_answer(origin, "second copy")], validation=validated)
    _carry(home, "origin", "supplier")
    supplier = _ctx(home, "supplier", run_id="intake")
    received = run_step("receive_dataset", supplier, kind="origin-export", name="origin-export")
    package = next(supplier.paths.inbox.glob("damaged-*.sfp"))
    data = bytearray(package.read_bytes())
    data[-100] ^= 0x01
    package.write_bytes(bytes(data))
    with pytest.raises(StepError, match="no acceptable damaged package"):
        run_step("receive_dataset", supplier, kind="damaged", name="damaged")
    rotation.rotate_keys(origin.paths)
    return {"home": home, "sanitized": sanitized, "validated": validated, "released": released, "damaged": damaged,
            "received": received}


def _rows(page: str) -> list[str]:
    return re.findall(r"<tr>.*?</tr>", page, flags=re.S)


def test_report_lists_decisions_approvals_releases_and_keys_with_who_why_and_evidence(workspace, tmp_path):
    home, sanitized, released = workspace["home"], workspace["sanitized"], workspace["released"]
    out = tmp_path / "origin.html"
    result = CliRunner().invoke(main, ["audit", "report", "--site", "origin", "--out", str(out)],
                                env={"FACTORY_HOME": str(home)})
    assert result.exit_code == 0, result.output
    assert "audit chain verified" in result.output
    page = out.read_text()
    top = page[: page.index("<table>")]
    assert 'class="ok" id="chain"' in top and "Audit chain verified" in top and "BROKEN" not in top

    rows = _rows(page)
    gate = [r for r in rows if "policy.decision" in r and "<td><code>data_release</code></td>" in r]
    denied = [r for r in gate if 'class="deny"' in r]
    allowed = [r for r in gate if 'class="allow"' in r]
    assert denied and allowed
    # why: the policy's reason; evidence: the dataset, recipient and purpose the gate decided on
    assert any("approval" in r.lower() and "compliance_officer" in r for r in denied)
    assert all(html.escape(sanitized["dataset_id"]) in r and "recipient: <code>supplier</code>" in r for r in gate)
    assert all("input_digest: <code>sha256:" in r and "bundle_digest" in r for r in gate)

    answered = [r for r in rows if "approval.answered" in r]
    assert answered and all("origin_officer" in r for r in answered)
    assert any("second copy" in r for r in answered)

    (sealed,) = [r for r in rows if "package.sealed" in r and released["package_id"] in r]
    assert "release" in sealed and "recipient: <code>supplier</code>" in sealed and "content_digest" in sealed
    assert "key event" in page and any("keys.rotated" in r for r in rows)
    # oldest first: the seq column only grows
    seqs = [int(re.search(r"<td>(\d+)</td>", r).group(1)) for r in rows[1:]]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    # a report path is shown by its name, never the site's full path
    assert str(home) not in page


def test_hostile_values_are_escaped(workspace, tmp_path):
    page = compliance.render(SitePaths.of("origin", workspace["home"]))
    assert "<script>" not in page
    assert str(escape(HOSTILE)) in page


def test_receipts_and_quarantines_at_the_receiving_site(workspace):
    supplier = SitePaths.of("supplier", workspace["home"])
    page = compliance.render(supplier)
    rows = _rows(page)
    opened = [r for r in rows if "package.opened" in r and workspace["released"]["package_id"] in r]
    assert opened and "receipt" in opened[0] and "sender: <code>origin</code>" in opened[0]
    quarantined = [r for r in rows if "package.quarantined" in r or "package.rejected" in r]
    assert quarantined and all("quarantine" in r for r in quarantined)
    assert any(workspace["damaged"]["package_id"] in r for r in quarantined)
    assert any("damaged-" in r and ".sfp" in r for r in quarantined)  # the package file's name


def test_since_leaves_out_older_entries(workspace):
    origin = SitePaths.of("origin", workspace["home"])
    assert compliance.collect(origin, compliance.parse_since("2999-01-01"))["rows"] == []
    everything = compliance.collect(origin, compliance.parse_since("2000-01-01"))
    assert len(everything["rows"]) == len(compliance.collect(origin)["rows"]) > 0
    with pytest.raises(compliance.ReportError, match="not a date"):
        compliance.parse_since("last tuesday")


def test_pdf_is_refused_with_the_reason(workspace, tmp_path):
    result = CliRunner().invoke(main, ["audit", "report", "--site", "origin", "--out", str(tmp_path / "r.pdf")],
                                env={"FACTORY_HOME": str(workspace["home"])})
    assert result.exit_code == 1 and "no PDF renderer" in result.output
    assert not (tmp_path / "r.pdf").exists()


def test_tampered_log_is_reported_broken_at_the_top(home, tmp_path):
    """A log whose third entry was edited: the report still renders, red at the top, naming that entry."""
    from pipelines.policy import evaluate

    origin = SitePaths.of("origin", home)
    for number in range(4):
        evaluate("approval", {"user": {"id": f"user-{number}", "site": "origin", "roles": []},
                              "gate": {"name": "data_release", "owner_site": "origin",
                                       "required_role": "compliance_officer"}, "requested_by": "x"},
                 site="origin", home=home)
    audit.verify(origin, [])  # intact so far
    lines = origin.audit_log.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"user-', b'"evil-', 1)
    origin.audit_log.write_bytes(b"".join(lines))
    out = tmp_path / "broken.html"
    result = CliRunner().invoke(main, ["audit", "report", "--site", "origin", "--out", str(out)],
                                env={"FACTORY_HOME": str(home)})
    assert result.exit_code == 2 and "BROKEN" in result.output
    page = out.read_text()
    top = page[: page.index("<table>")]
    assert 'class="broken" id="chain"' in top and "AUDIT CHAIN BROKEN" in top
    assert re.search(r"line 3 \(seq 3\) was modified", top)
    assert "Audit chain verified" not in page


def test_data_release_gate_evidence_from_the_real_steps(workspace):
    """What the data_release gate page shows comes from the sanitize and validate steps' XComs."""
    from pipelines.evidence import MAX_CHARS

    sanitization, validation = workspace["sanitized"]["evidence_md"], workspace["validated"]["evidence_md"]
    assert "| rows before | 100 |" in sanitization and "| rows after |" in sanitization
    assert r"| columns dropped | sensor\_serial, operator, mission\_id, latitude, longitude |" in sanitization
    assert r"capture\_time: truncated to the week" in sanitization
    assert r"| critical\_outliers |" in sanitization and "classification **restricted**" in sanitization
    assert r"  - origin/export\_authorized@" in sanitization  # lineage back to the raw version
    assert validation.startswith("**Validation** (suite *release*, ") and "): passed" in validation
    assert r"| expect\_table\_columns\_to\_exclude\_sensitive\_names | pass | 1 |  |" in validation
    assert len(sanitization) <= MAX_CHARS and len(validation) <= MAX_CHARS
