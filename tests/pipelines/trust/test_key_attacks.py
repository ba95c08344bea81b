"""Attacks on the trust store and the private keys (issue 15: finding 1 for every keys.* entry point
and for key-update documents; finding 9c, the key passphrase)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.dsse import Envelope
from securesystemslib.signer import CryptoSigner, SSlibKey

from pipelines.cli import main
from pipelines.fileio import write_json
from pipelines.trust import audit, keys, packages, rotation
from pipelines.workspace import SitePaths

HOSTILE_NAMES = ["../inbox/evil", "/tmp/evil", "", "supplier/../origin", "SUPPLIER", 123, None, ["supplier"],
                 {"site": "supplier"}]


# ---------------------------------------------------------------- finding 1: site names are looked up, never joined


@pytest.fixture
def planted(origin):
    """A trust file for an attacker's key, dropped where a path-joined name would find it."""
    private = ec.generate_private_key(ec.SECP256R1())
    record = dict(keys.current_record(origin), site="evil",
                  signing_key_id=keys.signing_key_id_of(private.public_key()),
                  signing_public=private.public_key().public_bytes(
                      ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo).decode())
    origin.inbox.mkdir(parents=True, exist_ok=True)
    write_json(origin.inbox / "evil.json", {"site": "evil", "keys": [record]})
    return record


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_every_keys_function_refuses_a_name_that_is_not_a_partner(origin, planted, name):
    calls = [
        lambda: keys.peer(origin, name),
        lambda: keys.trust_path(origin, name),
        lambda: keys.records(origin, name),
        lambda: keys.trusted_record(origin, name),
        lambda: keys.public_signing_key(origin, name),
        lambda: keys.check_signing_key(origin, name, planted["signing_key_id"]),
    ]
    for call in calls:
        with pytest.raises(keys.TrustError, match="not a configured partner of 'origin'"):
            call()


def test_the_site_itself_is_not_a_partner(origin):
    for call in (lambda: keys.peer(origin, "origin"), lambda: keys.trust_path(origin, "origin"),
                 lambda: keys.trusted_record(origin, "origin")):
        with pytest.raises(keys.TrustError, match="'origin' is this site itself, not a partner"):
            call()
    # its own keys still answer for its own signatures (the audit log, its models)
    assert keys.records(origin, "origin") == keys.keyring(origin)["generations"]
    keys.check_signing_key(origin, "origin", keys.signing_key_id(origin))
    assert keys.peer(origin, "supplier") == "supplier"
    assert keys.trust_path(origin, "supplier") == origin.trust_dir / "supplier.json"


def _old_origin_signer(origin: SitePaths) -> CryptoSigner:
    pem = (origin.keys_dir / "gen-0001" / "signing.pem").read_bytes()
    private = ser.load_pem_private_key(pem, keys.site_secret(origin))
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key(), keyid=keys.signing_key_id_of(
        private.public_key())))


def _resigned_update(tmp_path: Path, origin: SitePaths, **changes) -> Path:
    """Origin's key update for supplier, its payload changed and signed again with origin's (trusted) key."""
    update = next(u for u in rotation.rotate_keys(origin, tmp_path) if u.name.endswith("-for-supplier.json"))
    payload = json.loads(base64.b64decode(json.loads(update.read_text())["payload"]))
    for key, value in changes.items():
        if key.startswith("record."):
            payload["record"][key.removeprefix("record.")] = value
        else:
            payload[key] = value
    envelope = Envelope(json.dumps(payload, sort_keys=True).encode(), keys.KEY_UPDATE_TYPE, {})
    envelope.sign(_old_origin_signer(origin))
    update.write_text(json.dumps(envelope.to_dict()))
    return update


@pytest.mark.parametrize("site", ["../inbox/evil", "/tmp/evil", "supplier", ["origin"]], ids=repr)
def test_key_update_naming_a_site_that_is_not_a_partner_is_refused(tmp_path, origin, supplier, site):
    before = (supplier.trust_dir / "origin.json").read_bytes()
    update = _resigned_update(tmp_path, origin, site=site)
    with pytest.raises(keys.TrustError, match="not a partner|not a configured partner"):
        rotation.accept_key_update(supplier, update)
    assert (supplier.trust_dir / "origin.json").read_bytes() == before


@pytest.mark.parametrize("field, value", [
    ("record.signing_key_id", "0123456789abcdef"),   # claim another key's id
    ("record.kem_key_id", "0123456789abcdef"),
    ("record.generation", "9"),
    ("record.site", "supplier"),
    ("record.signing_public", "not a key"),
    ("record.superseded_at", "2020-01-01T00:00:00Z"),
    ("record.extra", 1),
])
def test_key_update_with_an_inconsistent_record_is_refused(tmp_path, origin, supplier, field, value):
    before = (supplier.trust_dir / "origin.json").read_bytes()
    update = _resigned_update(tmp_path, origin, **{field: value})
    with pytest.raises(keys.TrustError, match="key update record"):
        rotation.accept_key_update(supplier, update)
    assert (supplier.trust_dir / "origin.json").read_bytes() == before


@pytest.mark.parametrize("content", [b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe", b'{"payload": 1, "payload": 2}',
                                     b"[]", b"{}"])
def test_junk_key_update_is_a_trust_error(tmp_path, supplier, content):
    junk = tmp_path / "update.json"
    junk.write_bytes(content)
    with pytest.raises(keys.TrustError, match="is not a key-update document"):
        rotation.accept_key_update(supplier, junk)


def test_oversized_key_update_is_refused_unread(tmp_path, supplier):
    junk = tmp_path / "update.json"
    junk.write_bytes(b" " * (rotation.MAX_KEY_UPDATE + 1))
    with pytest.raises(keys.TrustError, match="larger than"):
        rotation.accept_key_update(supplier, junk)


# ---------------------------------------------------------------- finding 9c: the key passphrase


def _loads(paths: SitePaths, passphrase: bytes) -> bool:
    try:
        ser.load_pem_private_key((paths.keys_dir / "gen-0001" / "signing.pem").read_bytes(), passphrase)
        return True
    except (ValueError, TypeError):
        return False


@pytest.mark.parametrize("variable", ["FACTORY_KEY_PASSPHRASE_ORIGIN", "FACTORY_KEY_PASSPHRASE"])
def test_passphrase_from_the_environment(tmp_path, monkeypatch, variable):
    for name in ("FACTORY_KEY_PASSPHRASE_ORIGIN", "FACTORY_KEY_PASSPHRASE", "FACTORY_KEY_PASSPHRASE_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "from the environment")
    paths = SitePaths.of("origin", tmp_path / "home")
    keys.ensure_site_keys(paths)
    assert not paths.secret_file.exists() and _loads(paths, b"from the environment")


def test_passphrase_from_a_file_outside_the_home(tmp_path, monkeypatch):
    monkeypatch.delenv("FACTORY_KEY_PASSPHRASE_ORIGIN", raising=False)
    monkeypatch.delenv("FACTORY_KEY_PASSPHRASE", raising=False)
    secret = tmp_path / "vault" / "origin.pass"
    secret.parent.mkdir()
    secret.write_text("kept elsewhere\n")
    monkeypatch.setenv("FACTORY_KEY_PASSPHRASE_FILE", str(secret))
    paths = SitePaths.of("origin", tmp_path / "home")
    keys.ensure_site_keys(paths)
    assert not paths.secret_file.exists() and _loads(paths, b"kept elsewhere")
    inside = paths.root / "pass"
    inside.write_text("beside the keys\n")
    monkeypatch.setenv("FACTORY_KEY_PASSPHRASE_FILE", str(inside))
    with pytest.raises(keys.TrustError, match="is inside FACTORY_HOME"):
        keys.site_secret(paths)


def test_a_site_with_keys_and_no_passphrase_fails_instead_of_making_a_new_one(origin):
    origin.secret_file.unlink()
    with pytest.raises(keys.TrustError, match="has keys but no passphrase"):
        keys.signing_key(origin)
    assert not origin.secret_file.exists()


def test_generated_secret_protects_a_single_key_file_not_a_copied_folder(tmp_path, origin):
    """What the embedded default is for: one leaked .pem is useless; the folder with `secret` is not."""
    single = (origin.keys_dir / "gen-0001" / "signing.pem").read_bytes()
    with pytest.raises(TypeError):
        ser.load_pem_private_key(single, None)
    copy = tmp_path / "stolen-keys"
    shutil.copytree(origin.keys_dir, copy)
    ser.load_pem_private_key((copy / "gen-0001" / "signing.pem").read_bytes(), (copy / "secret").read_bytes().strip())


def test_cli_moves_the_keys_to_a_passphrase_from_the_environment(tmp_path, home, origin, supplier, monkeypatch):
    old = origin.secret_file.read_bytes().strip()
    monkeypatch.setenv("FACTORY_KEY_PASSPHRASE_ORIGIN", "new and strong")
    assert keys.site_secret(origin) == old  # the site still works while it moves
    result = CliRunner().invoke(main, ["keys", "passphrase", "--site", "origin", "--from-env"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("3 key files of origin re-encrypted with the passphrase from "
                                    "FACTORY_KEY_PASSPHRASE_ORIGIN")
    assert not origin.secret_file.exists()
    assert _loads(origin, b"new and strong") and not _loads(origin, old)
    assert [e["action"] for e in audit.entries(origin)][-1] == "keys.passphrase_changed"
    audit.verify(origin)
    src = tmp_path / "f"
    src.write_bytes(b"still works")
    packages.seal(supplier, "origin", src, tmp_path / "p.pkg", purpose="p", content_type="dataset")
    assert Path(packages.open_package(origin, tmp_path / "p.pkg", tmp_path / "out")["path"]).read_bytes() == b"still works"
    assert rotation.change_passphrase(origin, b"new and strong", "again") == 0  # a second run has nothing to do


def test_cli_moves_the_keys_to_a_passphrase_file(tmp_path, home, origin, monkeypatch):
    secret = tmp_path / "origin.pass"
    secret.write_text("in a file\n")
    result = CliRunner().invoke(main, ["keys", "passphrase", "--site", "origin", "--file", str(secret)])
    assert result.exit_code == 0, result.output
    assert f"set FACTORY_KEY_PASSPHRASE_FILE={secret}" in result.output
    with pytest.raises(keys.TrustError, match="has keys but no passphrase"):
        keys.signing_key(origin)
    monkeypatch.setenv("FACTORY_KEY_PASSPHRASE_FILE", str(secret))
    assert _loads(origin, b"in a file")
    audit.verify(origin)


def test_cli_passphrase_needs_exactly_one_source(home):
    result = CliRunner().invoke(main, ["keys", "passphrase", "--site", "origin"])
    assert result.exit_code == 1 and result.stderr == "error: give exactly one of --from-env and --file\n"
    result = CliRunner().invoke(main, ["keys", "passphrase", "--site", "origin", "--from-env"])
    assert result.exit_code == 1 and result.stderr.startswith("error: no passphrase in the environment")
