"""The audit log: intact chains verify, every kind of tampering is named, concurrent writers are safe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines.cli import main
from pipelines.trust import audit, keys
from pipelines.trust.audit import AuditError
from pipelines.workspace import SitePaths


def _fill(paths: SitePaths, n: int = 5) -> list[dict]:
    return [audit.append(paths, action="policy.decision", actor="svc-origin", object=f"obj-{i}",
                         outcome="allow", details={"i": i}) for i in range(n)]


def _lines(paths: SitePaths) -> list[bytes]:
    return paths.audit_log.read_bytes().splitlines(keepends=True)


def test_intact_log_verifies_and_chains(origin):
    written = _fill(origin)
    audit.verify(origin)
    read = list(audit.entries(origin))
    assert read == written
    assert [e["seq"] for e in read] == [1, 2, 3, 4, 5]
    assert all(b["prev"] == a["hash"] for a, b in zip(read, read[1:], strict=False))


def test_append_without_keys_raises_clear_error(tmp_path):
    paths = SitePaths.of("origin", tmp_path / "empty")
    with pytest.raises(keys.KeysMissing, match="has no keys"):
        audit.append(paths, action="x", actor="a", object="o", outcome="success")
    assert not paths.audit_log.exists()


def test_verify_names_edited_entry(origin):
    _fill(origin)
    lines = _lines(origin)
    lines[2] = lines[2].replace(b'"outcome":"allow"', b'"outcome":"deny"')
    origin.audit_log.write_bytes(b"".join(lines))
    with pytest.raises(AuditError, match=r"line 3 \(seq 3\) was modified"):
        audit.verify(origin)


def test_verify_names_edited_entry_with_recomputed_hash(origin):
    _fill(origin)
    lines = _lines(origin)
    entry = json.loads(lines[1])
    entry["outcome"] = "deny"
    entry["hash"] = audit._entry_hash(entry)
    lines[1] = (json.dumps(entry) + "\n").encode()
    origin.audit_log.write_bytes(b"".join(lines))
    with pytest.raises(AuditError, match=r"line 2 \(seq 2\)"):
        audit.verify(origin)


def test_verify_names_deleted_entry(origin):
    _fill(origin)
    lines = _lines(origin)
    del lines[1]
    origin.audit_log.write_bytes(b"".join(lines))
    with pytest.raises(AuditError, match=r"line 2: expected entry seq 2, found seq 3"):
        audit.verify(origin)


def test_verify_names_inserted_entry(origin):
    _fill(origin)
    lines = _lines(origin)
    lines.insert(3, lines[1])
    origin.audit_log.write_bytes(b"".join(lines))
    with pytest.raises(AuditError, match=r"line 4: expected entry seq 4, found seq 2"):
        audit.verify(origin)


def test_verify_names_reordered_entries(origin):
    _fill(origin)
    lines = _lines(origin)
    lines[1], lines[2] = lines[2], lines[1]
    origin.audit_log.write_bytes(b"".join(lines))
    with pytest.raises(AuditError, match=r"line 2: expected entry seq 2, found seq 3"):
        audit.verify(origin)


def test_verify_detects_truncation_at_entry_boundary(origin):
    _fill(origin)
    origin.audit_log.write_bytes(b"".join(_lines(origin)[:3]))
    with pytest.raises(AuditError, match=r"truncated: it ends at seq 3 but the signed head records seq 5"):
        audit.verify(origin)


def test_verify_detects_truncation_inside_an_entry(origin):
    _fill(origin)
    data = origin.audit_log.read_bytes()
    origin.audit_log.write_bytes(data[:-40])
    with pytest.raises(AuditError, match=r"line 5 is not a valid audit entry"):
        audit.verify(origin)


def test_verify_detects_removed_log_with_head_left(origin):
    _fill(origin)
    origin.audit_log.unlink()
    with pytest.raises(AuditError, match="truncated: it ends at seq 0"):
        audit.verify(origin)


def test_concurrent_writers_in_two_processes(origin):
    script = (
        "import sys; from pathlib import Path; from pipelines.trust import audit; "
        "from pipelines.workspace import SitePaths; p = SitePaths.of('origin', Path(sys.argv[1])); "
        "[audit.append(p, action='x', actor=sys.argv[2], object=str(i), outcome='success') for i in range(40)]"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(origin.home), f"writer-{n}"],
                              cwd=Path(__file__).resolve().parents[3]) for n in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    audit.verify(origin)
    read = list(audit.entries(origin))
    assert [e["seq"] for e in read] == list(range(1, 81))
    assert {e["actor"] for e in read} == {"writer-0", "writer-1"}


def test_cli_verify_show_export(home, origin, tmp_path):
    _fill(origin, 3)
    runner = CliRunner()
    result = runner.invoke(main, ["audit", "verify", "--site", "origin"])
    assert result.exit_code == 0 and "3 entries" in result.output
    shown = json.loads(runner.invoke(main, ["audit", "show", "--site", "origin", "--json"]).output)
    assert [e["object"] for e in shown] == ["obj-0", "obj-1", "obj-2"]
    exported = runner.invoke(main, ["audit", "export", "--site", "origin"]).output.splitlines()
    event = json.loads(exported[0])
    assert {k: event[k] for k in audit.SIEM_FIELDS} == {
        "time": shown[0]["time"], "site": "origin", "actor": "svc-origin", "action": "policy.decision",
        "object": "obj-0", "outcome": "allow"}
    lines = _lines(origin)
    origin.audit_log.write_bytes(b"".join([lines[0], lines[2]]))
    result = runner.invoke(main, ["audit", "verify", "--site", "origin"])
    assert result.exit_code == 1
    assert result.stderr.startswith("audit log broken:") and "expected entry seq 2, found seq 3" in result.stderr
