"""The media carrier: export with a signed manifest, import checked whole, idempotent re-import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines.carrier import media, outbox
from pipelines.carrier.media import MediaRefused
from pipelines.cli import main
from pipelines.trust import audit, packages, rotation
from pipelines.trust import keys as trust_keys

from .conftest import inbox_files


def _received(paths) -> list[str]:
    return [e["object"] for e in audit.entries(paths) if e["action"] == "package.received"]


@pytest.fixture
def medium(supplier, queued, tmp_path) -> tuple[Path, dict, dict]:
    """Two supplier packages (one for origin, one for destination) exported to a folder."""
    for_origin, _ = queued(supplier, "origin")
    for_destination, _ = queued(supplier, "destination")
    folder = tmp_path / "usb"
    media.export_media(supplier, folder)
    return folder, for_origin, for_destination


def test_media_round_trip(supplier, origin, destination, medium, tmp_path):
    folder, for_origin, for_destination = medium
    assert {r["state"] for r in outbox.list_packages(supplier)} == {"delivered"}
    assert {r["via"] for r in outbox.list_packages(supplier)} == {"media"}
    assert outbox.pending(supplier) == []

    result = media.import_media(origin, folder)
    statuses = {row["recipient"]: row["status"] for row in result["files"]}
    assert result["sender"] == "supplier" and statuses == {"origin": "stored", "destination": "not for origin"}
    assert inbox_files(origin) == [f"supplier-shared-{for_origin['package_id']}.sfp"]
    assert _received(origin) == [for_origin["package_id"]]
    [entry] = [e for e in audit.entries(origin) if e["action"] == "package.received"]
    assert entry["details"]["transport"] == "media" and entry["actor"] == "carrier-media:supplier"

    media.import_media(destination, folder)
    assert inbox_files(destination) == [f"supplier-shared-{for_destination['package_id']}.sfp"]
    opened = packages.open_package(destination, destination.inbox / inbox_files(destination)[0], tmp_path / "out")
    assert opened["package_id"] == for_destination["package_id"]


def test_reimporting_the_same_medium_is_harmless(origin, medium):
    folder, for_origin, _ = medium
    media.import_media(origin, folder)
    before = inbox_files(origin)
    again = media.import_media(origin, folder)
    assert [row["status"] for row in again["files"] if row["recipient"] == "origin"] == ["already have"]
    assert inbox_files(origin) == before
    assert _received(origin) == [for_origin["package_id"]]


@pytest.mark.parametrize("damage", ["missing", "altered", "truncated"])
def test_medium_with_a_missing_or_altered_file_is_refused_whole(origin, medium, damage):
    folder, _, for_destination = medium
    # damage the *other* recipient's file: the medium is refused as a whole all the same
    victim = folder / f"supplier-shared-{for_destination['package_id']}.sfp"
    if damage == "missing":
        victim.unlink()
    elif damage == "altered":
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        victim.write_bytes(victim.read_bytes()[:-1])
    with pytest.raises(MediaRefused, match=victim.name):
        media.import_media(origin, folder)
    assert inbox_files(origin) == []  # nothing imported, no temporary file left
    refused = [e for e in audit.entries(origin) if e["action"] == "transfer.refused"]
    assert victim.name in refused[-1]["details"]["reason"]


def test_medium_with_an_edited_manifest_is_refused(origin, medium):
    folder, _, _ = medium
    document = json.loads((folder / media.MANIFEST).read_text())
    import base64

    payload = json.loads(base64.b64decode(document["payload"]))
    payload["files"] = payload["files"][:1]  # drop a file from the list
    document["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    (folder / media.MANIFEST).write_text(json.dumps(document))
    with pytest.raises(MediaRefused, match="does not verify"):
        media.import_media(origin, folder)
    assert inbox_files(origin) == []


def test_medium_signed_by_a_revoked_key_is_refused(supplier, origin, medium):
    folder, _, _ = medium
    rotation.revoke_key(origin, trust_keys.signing_key_id(supplier), reason="test")
    with pytest.raises(MediaRefused, match="revoked"):
        media.import_media(origin, folder)
    assert inbox_files(origin) == []


def test_folder_without_a_manifest_is_refused(origin, tmp_path):
    with pytest.raises(MediaRefused, match="not a factory transfer"):
        media.import_media(origin, tmp_path)


def test_export_refuses_a_folder_that_holds_a_transfer(supplier, medium, queued):
    folder, _, _ = medium
    queued(supplier, "origin")
    with pytest.raises(media.CarrierError, match="already holds a transfer"):
        media.export_media(supplier, folder)


def test_refused_package_on_a_sound_medium_is_reported_and_the_rest_imported(supplier, origin, queued, tmp_path):
    """The medium checks out, but one package in it is not acceptable (expired): only that one is refused."""
    from datetime import timedelta

    src = tmp_path / "old.bin"
    src.write_bytes(b"x" * 100)
    outbox.seal_to_outbox(supplier, "origin", src, purpose="p", content_type="dataset",
                          metadata={"kind": "late"}, expires_in=timedelta(seconds=-1))
    good, _ = queued(supplier, "origin")
    media.export_media(supplier, tmp_path / "usb")
    result = media.import_media(origin, tmp_path / "usb")
    by_kind = {row["file"].split("-")[0]: row for row in result["files"]}
    assert by_kind["late"]["status"] == "refused" and "expired" in by_kind["late"]["reason"]
    assert inbox_files(origin) == [f"supplier-shared-{good['package_id']}.sfp"]


def test_transfer_cli_round_trip(supplier, origin, queued, tmp_path):
    header, _ = queued(supplier, "origin")
    runner = CliRunner()
    exported = runner.invoke(main, ["transfer", "export", "--site", "supplier", "--to", str(tmp_path / "usb")])
    assert exported.exit_code == 0, exported.output
    assert "1 package(s) and the signed manifest" in exported.output
    imported = runner.invoke(main, ["transfer", "import", "--site", "origin", "--from", str(tmp_path / "usb")])
    assert imported.exit_code == 0, imported.output
    assert f"supplier-shared-{header['package_id']}.sfp: stored" in imported.output
    (tmp_path / "usb" / f"supplier-shared-{header['package_id']}.sfp").unlink()
    refused = runner.invoke(main, ["transfer", "import", "--site", "origin", "--from", str(tmp_path / "usb")])
    assert refused.exit_code == 1 and "refused:" in refused.output and "missing" in refused.output
