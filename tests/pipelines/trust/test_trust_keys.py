"""Site keys: created once, encrypted at rest, trust exchange, rotation, acceptance, revocation."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization as ser

from pipelines.cli import main
from pipelines.config import SITES
from pipelines.trust import keys, rotation
from pipelines.workspace import SitePaths


def _files(paths: SitePaths) -> dict[str, bytes]:
    return {str(p.relative_to(paths.keys_dir)): p.read_bytes() for p in paths.keys_dir.rglob("*.pem")}


def test_keys_are_private_encrypted_and_stable(home, origin):
    before = _files(origin)
    assert sorted(before) == ["gen-0001/mlkem.pem", "gen-0001/signing.pem", "gen-0001/x25519.pem"]
    for name, data in before.items():
        assert stat.S_IMODE((origin.keys_dir / name).stat().st_mode) == 0o600
        assert b"ENCRYPTED PRIVATE KEY" in data
        with pytest.raises(TypeError):
            ser.load_pem_private_key(data, None)
    assert stat.S_IMODE(origin.secret_file.stat().st_mode) == 0o600
    keys.ensure_site_keys(origin)
    keys.exchange_trust(home)
    assert _files(origin) == before


def test_half_written_run_is_completed_without_replacing_keys(tmp_path):
    paths = SitePaths.of("supplier", tmp_path)
    keys.ensure_site_keys(paths)
    signing = (paths.keys_dir / "gen-0001" / "signing.pem").read_bytes()
    (paths.keys_dir / "keyring.json").unlink()
    (paths.keys_dir / "gen-0001" / "mlkem.pem").unlink()
    keys.ensure_site_keys(paths)
    assert (paths.keys_dir / "gen-0001" / "signing.pem").read_bytes() == signing
    assert (paths.keys_dir / "gen-0001" / "mlkem.pem").exists()
    assert keys.signing_key_id(paths) == keys.signing_key_id_of(keys.signing_key(paths).public_key())


def test_secret_from_environment_is_used_and_not_written(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_KEY_PASSPHRASE_ORIGIN", "correct horse battery staple")
    paths = SitePaths.of("origin", tmp_path)
    keys.ensure_site_keys(paths)
    assert not paths.secret_file.exists()
    pem = (paths.keys_dir / "gen-0001" / "signing.pem").read_bytes()
    ser.load_pem_private_key(pem, b"correct horse battery staple")
    monkeypatch.setenv("FACTORY_KEY_PASSPHRASE_ORIGIN", "wrong")
    with pytest.raises(keys.TrustError, match="wrong key passphrase"):
        keys.ensure_site_keys(paths)


def test_exchange_gives_each_site_the_others_public_keys(home):
    for site in SITES:
        paths = SitePaths.of(site, home)
        assert sorted(p.name for p in paths.trust_dir.glob("*.json")) == sorted(
            [f"{o}.json" for o in SITES if o != site] + ["revoked.json"])
        for other in SITES:
            if other != site:
                assert keys.trusted_record(paths, other)["signing_key_id"] == keys.signing_key_id(
                    SitePaths.of(other, home))


def test_exchange_does_not_undo_a_revocation(home, origin, supplier):
    key_id = keys.signing_key_id(supplier)
    rotation.revoke_key(origin, key_id, "test")
    keys.exchange_trust(home)
    with pytest.raises(keys.TrustError, match="is revoked"):
        keys.public_signing_key(origin, "supplier")


def test_rotation_and_accept(tmp_path, supplier, origin, destination):
    old = keys.signing_key_id(origin)
    updates = rotation.rotate_keys(origin, tmp_path / "updates")
    assert sorted(p.name for p in updates) == ["key-update-origin-gen2-for-destination.json",
                                               "key-update-origin-gen2-for-supplier.json"]
    new = keys.signing_key_id(origin)
    assert new != old
    record = rotation.accept_key_update(supplier, tmp_path / "updates" / "key-update-origin-gen2-for-supplier.json")
    assert record["signing_key_id"] == new == keys.trusted_record(supplier, "origin")["signing_key_id"]
    with pytest.raises(keys.TrustError, match="not the current key"):  # replayed update
        rotation.accept_key_update(supplier, tmp_path / "updates" / "key-update-origin-gen2-for-supplier.json")
    with pytest.raises(keys.TrustError, match="issued for 'destination', not 'supplier'"):
        rotation.accept_key_update(supplier, tmp_path / "updates" / "key-update-origin-gen2-for-destination.json")


def test_accept_rejects_tampered_key_update(tmp_path, supplier, origin):
    update = rotation.rotate_keys(origin, tmp_path)[0]
    envelope = json.loads(update.read_text())
    payload = json.loads(__import__("base64").b64decode(envelope["payload"]))
    payload["record"]["signing_public"] = keys.current_record(supplier)["signing_public"]
    envelope["payload"] = __import__("base64").b64encode(json.dumps(payload).encode()).decode()
    update.write_text(json.dumps(envelope))
    target = "destination" if "for-destination" in update.name else "supplier"
    with pytest.raises(keys.TrustError, match="signature does not verify"):
        rotation.accept_key_update(SitePaths.of(target, origin.home), update)


def test_cli_list_rotate_accept_revoke(home, tmp_path):
    runner = CliRunner()
    listed = json.loads(runner.invoke(main, ["keys", "list", "--site", "supplier", "--json"]).output)
    assert {r["site"] for r in listed} == set(SITES) and all(r["status"] == "current" for r in listed)
    result = runner.invoke(main, ["keys", "rotate", "--site", "origin", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    update = next(Path(line) for line in result.output.splitlines() if line.endswith("for-supplier.json"))
    result = runner.invoke(main, ["keys", "accept", "--as", "supplier", "--in", str(update)])
    assert result.exit_code == 0 and "generation 2" in result.output
    rows = json.loads(runner.invoke(main, ["keys", "list", "--site", "supplier", "--json"]).output)
    assert [r["status"] for r in rows if r["site"] == "origin"] == ["superseded", "current"]
    key_id = rows[-1]["signing_key_id"]
    result = runner.invoke(main, ["keys", "revoke", "--site", "supplier", "--key-id", "nope"])
    assert result.exit_code == 1 and result.stderr.startswith("error: no key with id nope")
    assert runner.invoke(main, ["keys", "revoke", "--site", "supplier", "--key-id", key_id]).exit_code == 0
    rows = json.loads(runner.invoke(main, ["keys", "list", "--site", "supplier", "--json"]).output)
    assert next(r for r in rows if r["signing_key_id"] == key_id)["status"] == "revoked"
