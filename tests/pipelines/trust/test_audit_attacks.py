"""Attacks on the audit log by someone who controls a site's home, and their refusal.

Heads anchored at partners (issue 15, finding 5): truncating the log and restoring an older head,
or deleting log and head together, is caught by the heads a partner witnessed; forged or forked
heads are refused at the partner and audited there. Also: duplicate JSON keys, torn last lines.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec

from pipelines.cli import main
from pipelines.trust import audit, keys
from pipelines.trust.audit import AuditError, StaleHead
from pipelines.workspace import SitePaths


def _fill(paths: SitePaths, n: int, tag: str = "obj") -> list[dict]:
    return [audit.append(paths, action="policy.decision", actor=f"svc-{paths.site}", object=f"{tag}-{i}",
                         outcome="allow") for i in range(n)]


def _save(paths: SitePaths) -> tuple[bytes, bytes]:
    return paths.audit_log.read_bytes(), (paths.state_dir / "audit.head.json").read_bytes()


def _restore(paths: SitePaths, saved: tuple[bytes, bytes]) -> None:
    paths.audit_log.write_bytes(saved[0])
    (paths.state_dir / "audit.head.json").write_bytes(saved[1])


def _witnessed_file(paths: SitePaths):
    return paths.state_dir / "witnessed-heads.json"


def _actions(paths: SitePaths) -> list[str]:
    return [e["action"] for e in audit.entries(paths)]


def _resign(head: dict, private: ec.EllipticCurvePrivateKey) -> dict:
    head = dict(head)
    head["sig"] = base64.b64encode(private.sign(audit._head_body(head), ec.ECDSA(hashes.SHA256()))).decode()
    return head


# ---------------------------------------------------------------- truncation, anchored at a partner


def test_truncate_and_restore_older_head_fails_when_partner_witnessed_later(origin, destination):
    _fill(origin, 3)
    older = _save(origin)
    _fill(origin, 3, "later")
    audit.witness(destination, audit.signed_head(origin))  # carried by a package origin sent
    _restore(origin, older)

    audit.verify(origin)  # the local head alone cannot see it: this is the attack
    with pytest.raises(AuditError, match=r"truncated or was replaced: it ends at seq 3 but destination "
                                         r"witnessed seq 6 \(entry seq 4 is the first missing\)"):
        audit.verify(origin, audit.witnessed_heads(destination, "origin"))
    result = CliRunner().invoke(main, ["audit", "verify", "--site", "origin"])
    assert result.exit_code == 1
    assert "destination witnessed seq 6" in result.stderr


def test_truncate_restore_and_rewrite_fails_at_the_witnessed_seq(origin, destination):
    _fill(origin, 3)
    older = _save(origin)
    _fill(origin, 3, "later")
    audit.witness(destination, audit.signed_head(origin))
    _restore(origin, older)
    _fill(origin, 4, "rewritten")  # the log grows past seq 6 again, with other entries

    audit.verify(origin)
    with pytest.raises(AuditError, match=r"line 6 \(seq 6\) differs from the head destination witnessed"):
        audit.verify(origin, audit.witnessed_heads(destination, "origin"))


def test_delete_log_and_head_together_fails(origin, destination):
    _fill(origin, 4)
    audit.witness(destination, audit.signed_head(origin))
    origin.audit_log.unlink()
    (origin.state_dir / "audit.head.json").unlink()

    with pytest.raises(AuditError, match=r"missing or empty but site origin has keys"):
        audit.verify(origin)
    with pytest.raises(AuditError, match=r"ends at seq 0 but destination witnessed seq 4"):
        audit.verify(origin, audit.witnessed_heads(destination, "origin"))
    # a fresh log started in its place verifies locally but not against the witnessed head
    _fill(origin, 5, "fresh")
    audit.verify(origin)
    with pytest.raises(AuditError, match=r"line 4 \(seq 4\) differs from the head destination witnessed"):
        audit.verify(origin, audit.witnessed_heads(destination, "origin"))


def test_site_with_keys_and_no_log_fails(destination):
    assert keys.keyring_path(destination).exists() and not destination.audit_log.exists()
    with pytest.raises(AuditError, match=r"missing or empty but site destination has keys"):
        audit.verify(destination)
    destination.audit_log.write_bytes(b"")
    with pytest.raises(AuditError, match=r"missing or empty"):
        audit.verify(destination)


def test_append_refuses_a_log_cut_below_its_head(origin):
    """Appending would overwrite the head and hide the cut; it refuses and writes nothing."""
    _fill(origin, 5)
    cut = b"".join(origin.audit_log.read_bytes().splitlines(keepends=True)[:3])
    origin.audit_log.write_bytes(cut)
    with pytest.raises(AuditError, match=r"ends at seq 3 but the signed head records seq 5"):
        audit.append(origin, action="x", actor="a", object="o", outcome="success")
    with pytest.raises(AuditError, match=r"ends at seq 3 but the signed head records seq 5"):
        audit.signed_head(origin)
    assert origin.audit_log.read_bytes() == cut


def test_intact_log_verifies_against_every_witness(origin, supplier, destination):
    _fill(origin, 2)
    audit.witness(destination, audit.signed_head(origin))
    _fill(origin, 2)
    audit.witness(supplier, audit.signed_head(origin))
    audit.witness(destination, audit.signed_head(origin))
    _fill(origin, 1)
    heads = audit.witnessed_heads(destination, "origin") + audit.witnessed_heads(supplier, "origin")
    assert [h["seq"] for h in heads] == [2, 4, 4]
    audit.verify(origin, heads)
    result = CliRunner().invoke(main, ["audit", "verify", "--site", "origin"])
    assert result.exit_code == 0, result.stderr
    assert "5 entries, 3 heads witnessed" in result.output


def test_cli_witnessed_export_from_a_separate_machine(origin, destination, tmp_path):
    _fill(origin, 3)
    audit.witness(destination, audit.signed_head(origin))
    exported = tmp_path / "destination-saw-origin.json"
    runner = CliRunner()
    result = runner.invoke(main, ["audit", "witnessed", "--site", "destination", "--of", "origin",
                                  "--out", str(exported)])
    assert result.exit_code == 0, result.stderr
    _witnessed_file(destination).unlink()  # as if destination ran on another machine
    origin.audit_log.write_bytes(b"")
    (origin.state_dir / "audit.head.json").unlink()
    assert runner.invoke(main, ["audit", "verify", "--site", "origin"]).exit_code == 1
    result = runner.invoke(main, ["audit", "verify", "--site", "origin", "--witnessed", str(exported)])
    assert result.exit_code == 1
    assert "destination witnessed seq 3" in result.stderr
    # an export about another site is refused, not silently ignored
    result = runner.invoke(main, ["audit", "verify", "--site", "supplier", "--witnessed", str(exported)])
    assert result.exit_code == 1 and "not of supplier" in result.stderr


def test_verify_refuses_a_tampered_witnessed_record(origin, destination):
    """A witnessed head whose hash was changed no longer carries origin's signature: verify fails closed."""
    _fill(origin, 2)
    audit.witness(destination, audit.signed_head(origin))
    head = audit.witnessed_heads(destination, "origin")[0]
    forged = head | {"hash": "0" * 64}
    with pytest.raises(AuditError, match=r"witnessed head #1 .* has no valid signature by a origin key"):
        audit.verify(origin, [forged])


# ---------------------------------------------------------------- forged and forked heads at the witness


def _forgeries(origin: SitePaths, destination: SitePaths, attacker: ec.EllipticCurvePrivateKey) -> dict[str, dict]:
    _fill(origin, 2)
    genuine = audit.signed_head(origin)
    attacker_id = keys.signing_key_id_of(attacker.public_key())
    return {
        "bad signature": genuine | {"seq": genuine["seq"] + 10},
        "traversal site": _resign(genuine | {"site": "../x", "key_id": attacker_id}, attacker),
        "absolute site": _resign(genuine | {"site": str(destination.root / "x"), "key_id": attacker_id}, attacker),
        "own site": audit.signed_head(destination),
        "unknown site": _resign(genuine | {"site": "mallory", "key_id": attacker_id}, attacker),
        "unknown key": _resign(genuine | {"key_id": attacker_id}, attacker),
        "future time": _resign(genuine | {"time": "2999-01-01T00:00:00.000000Z"}, keys.signing_key(origin)),
        "extra field": genuine | {"note": "x"},
        "boolean seq": _resign(genuine | {"seq": True}, keys.signing_key(origin)),
        "not an object": ["origin", 2],
    }


@pytest.mark.parametrize("kind", ["bad signature", "traversal site", "absolute site", "own site", "unknown site",
                                  "unknown key", "future time", "extra field", "boolean seq", "not an object"])
def test_witness_refuses_forged_head_and_stores_nothing(origin, destination, kind):
    attacker = ec.generate_private_key(ec.SECP256R1())
    # a trust file where a path joined from "../x" would find it, naming the attacker's key
    planted = {"site": "x", "keys": [{
        "site": "x", "generation": 1, "created": keys.iso(keys.now()), "superseded_at": None,
        "signing_key_id": keys.signing_key_id_of(attacker.public_key()), "kem_key_id": "0" * 16,
        "signing_public": attacker.public_key().public_bytes(
            ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo).decode(),
        "x25519_public": "", "mlkem_public": ""}]}
    (destination.root / "x.json").write_text(json.dumps(planted))
    head = _forgeries(origin, destination, attacker)[kind]

    with pytest.raises(AuditError, match="partner audit head refused"):
        audit.witness(destination, head)
    assert not _witnessed_file(destination).exists()
    refused = [e for e in audit.entries(destination) if e["action"] == "audit.head_refused"]
    assert len(refused) == 1 and refused[0]["outcome"] == "refused"
    audit.verify(destination)


def test_fork_is_refused_and_audited(origin, destination):
    _fill(origin, 3)
    older = _save(origin)
    _fill(origin, 2)
    first = audit.signed_head(origin)
    audit.witness(destination, first)
    _restore(origin, older)
    _fill(origin, 2, "forked")  # seq 5 again, with another hash
    forked = audit.signed_head(origin)
    assert forked["seq"] == first["seq"] and forked["hash"] != first["hash"]

    stored = _witnessed_file(destination).read_bytes()
    with pytest.raises(AuditError, match=r"origin forked its audit log: seq 5 was witnessed with hash"):
        audit.witness(destination, forked)
    assert _witnessed_file(destination).read_bytes() == stored
    fork = [e for e in audit.entries(destination) if e["action"] == "audit.fork_witnessed"]
    assert len(fork) == 1 and fork[0]["object"] == "origin" and fork[0]["outcome"] == "fork"
    assert fork[0]["details"]["received"]["hash"] == forked["hash"]
    assert fork[0]["details"]["witnessed"]["hash"] == first["hash"]
    audit.verify(destination)


def test_older_head_is_refused_and_the_same_head_is_a_no_op(origin, destination):
    _fill(origin, 2)
    old = audit.signed_head(origin)
    _fill(origin, 2)
    new = audit.signed_head(origin)
    audit.witness(destination, new)
    audit.witness(destination, new)
    stored = _witnessed_file(destination).read_bytes()
    with pytest.raises(StaleHead, match=r"seq 2 is older than the one witnessed at seq 4"):
        audit.witness(destination, old)
    assert _witnessed_file(destination).read_bytes() == stored
    assert [h["seq"] for h in audit.witnessed_heads(destination, "origin")] == [4]


def test_signed_head_document(origin):
    empty = audit.signed_head(origin)
    assert empty["seq"] == 0 and empty["hash"] == audit._genesis("origin")
    written = _fill(origin, 3)
    head = audit.signed_head(origin)
    assert set(head) == set(audit.HEAD_FIELDS)
    assert json.loads(json.dumps(head)) == head
    assert (head["type"], head["site"], head["seq"], head["hash"], head["key_id"]) == (
        audit.HEAD_TYPE, "origin", 3, written[-1]["hash"], keys.signing_key_id(origin))


# ---------------------------------------------------------------- duplicate keys, torn lines


def test_duplicate_keys_in_a_line_fail_verify(origin):
    _fill(origin, 3)
    lines = origin.audit_log.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"{", b'{"outcome":"deny",', 1)  # readers keeping the first key see "deny"
    entry = json.loads(lines[1])
    assert entry["outcome"] == "allow" and entry["hash"] == audit._entry_hash(entry)  # hash and sig still hold
    origin.audit_log.write_bytes(b"".join(lines))
    with pytest.raises(AuditError, match=r"line 2 is not a valid audit entry: duplicate key 'outcome'"):
        audit.verify(origin)


def test_torn_last_line_is_recovered_at_the_next_append(origin, destination):
    _fill(origin, 3)
    audit.witness(destination, audit.signed_head(origin))
    whole = origin.audit_log.read_bytes()
    torn = b'{"action":"policy.decision","actor":"svc-origin","details":{},"hash":"ab'
    origin.audit_log.write_bytes(whole + torn)  # a writer killed in the middle of its write

    with pytest.raises(AuditError, match=r"line 4 is not a valid audit entry \(torn"):
        audit.verify(origin)
    entry = audit.append(origin, action="policy.decision", actor="svc-origin", object="next", outcome="allow")

    assert entry["seq"] == 5
    recovered = list(audit.entries(origin))[3]
    assert recovered["action"] == "audit.recovered" and recovered["seq"] == 4
    assert recovered["details"] == {
        "cut_at_byte": len(whole), "cut_bytes": len(torn), "cut_sha256": hashlib.sha256(torn).hexdigest(),
        "moved_to": "audit.log.torn", "after_seq": 3}
    kept = json.loads(origin.audit_log.with_name("audit.log.torn").read_bytes())
    assert base64.b64decode(kept["data_b64"]) == torn
    assert origin.audit_log.read_bytes().startswith(whole)
    audit.verify(origin, audit.witnessed_heads(destination, "origin"))


def test_recovery_cannot_be_used_to_cut_a_complete_entry(origin):
    """Dropping the last entry's end of line makes it look torn, but the head records it: refused."""
    _fill(origin, 5)
    data = origin.audit_log.read_bytes()[:-1]
    origin.audit_log.write_bytes(data)
    with pytest.raises(AuditError, match=r"ends at seq 4 but the signed head records seq 5"):
        audit.append(origin, action="x", actor="a", object="o", outcome="success")
    assert origin.audit_log.read_bytes() == data
    assert not origin.audit_log.with_name("audit.log.torn").exists()
