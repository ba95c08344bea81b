"""Sealed packages: round trips and one test per rejection reason (each leaves the output untouched)."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines.cli import main
from pipelines.trust import audit, keys, packages, rotation, signing
from pipelines.trust.packages import PackageRejected

CHUNK = 4096


def _seal(sender, recipient: str, src: Path, out: Path, **kw) -> dict:
    kw.setdefault("purpose", "collaboration")
    kw.setdefault("content_type", "dataset")
    kw.setdefault("chunk_size", CHUNK)
    return packages.seal(sender, recipient, src, out, **kw)


@pytest.fixture
def sealed(tmp_path, supplier):
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(3 * CHUNK + 100))
    out = tmp_path / "data.pkg"
    _seal(supplier, "origin", src, out)
    return src, out


def _rejected(recipient, package: Path, out: Path, snapshot) -> str:
    before = snapshot(out)
    with pytest.raises(PackageRejected) as caught:
        packages.open_package(recipient, package, out)
    assert snapshot(out) == before
    return caught.value.reason


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 3 * CHUNK, 5 * CHUNK + 17])
@pytest.mark.parametrize("kem", ["mlkem768-x25519", "x25519"])
def test_file_round_trip(tmp_path, supplier, origin, size, kem):
    src = tmp_path / "payload.bin"
    src.write_bytes(os.urandom(size))
    header = _seal(supplier, "origin", src, tmp_path / "p.pkg", kem=kem)
    assert header["chunks"] == max(1, -(-size // CHUNK)) and header["kem_suite"] == kem
    opened = packages.open_package(origin, tmp_path / "p.pkg", tmp_path / "out")
    assert Path(opened["path"]) == tmp_path / "out" / "payload.bin"
    assert Path(opened["path"]).read_bytes() == src.read_bytes()


def test_package_does_not_contain_plaintext(tmp_path, supplier):
    src = tmp_path / "secret.txt"
    src.write_bytes(b"operational-coordinates-" * 1000)
    _seal(supplier, "origin", src, tmp_path / "p.pkg")
    assert b"operational-coordinates" not in (tmp_path / "p.pkg").read_bytes()


def test_default_chunk_size_round_trip_of_several_chunks(tmp_path, supplier, origin):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(2 * packages.CHUNK_SIZE + 12345))
    header = packages.seal(supplier, "origin", src, tmp_path / "p.pkg", purpose="p", content_type="dataset")
    assert header["chunks"] == 3
    opened = packages.open_package(origin, tmp_path / "p.pkg", tmp_path / "out")
    assert Path(opened["path"]).read_bytes() == src.read_bytes()


def test_directory_round_trip(tmp_path, supplier, origin):
    src = tmp_path / "dataset"
    (src / "nested" / "deeper").mkdir(parents=True)
    (src / "empty.txt").write_bytes(b"")
    (src / "a.csv").write_text("x,y\n1,2\n")
    (src / "nested" / "deeper" / "blob.bin").write_bytes(os.urandom(4 * CHUNK + 3))
    _seal(supplier, "origin", src, tmp_path / "d.pkg")
    opened = Path(packages.open_package(origin, tmp_path / "d.pkg", tmp_path / "out")["path"])
    assert opened == tmp_path / "out" / "dataset"
    for original in src.rglob("*"):
        copy = opened / original.relative_to(src)
        assert copy.exists()
        if original.is_file():
            assert copy.read_bytes() == original.read_bytes()
    assert len(list(opened.rglob("*"))) == len(list(src.rglob("*")))


def test_verify_writes_nothing_and_does_not_consume(tmp_path, sealed, origin):
    src, package = sealed
    header = packages.verify_package(origin, package)
    assert header["sender"] == "supplier" and header["recipient"] == "origin"
    assert not (tmp_path / "out").exists()
    packages.verify_package(origin, package)  # still fresh
    assert Path(packages.open_package(origin, package, tmp_path / "out")["path"]).read_bytes() == src.read_bytes()


def test_seal_open_and_reject_are_audited(tmp_path, sealed, supplier, origin):
    _, package = sealed
    packages.open_package(origin, package, tmp_path / "out")
    with pytest.raises(PackageRejected):
        packages.open_package(origin, package, tmp_path / "out2")
    assert [e["action"] for e in audit.entries(supplier)] == ["package.sealed"]
    actions = [(e["action"], e["outcome"]) for e in audit.entries(origin)]
    assert actions == [("package.opened", "success"), ("package.rejected", "rejected")]
    audit.verify(origin)


def test_sequence_numbers_grow_per_channel(tmp_path, supplier):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    seqs = [_seal(supplier, to, src, tmp_path / f"{i}.pkg")["sequence"]
            for i, to in enumerate(["origin", "origin", "destination", "origin"])]
    assert seqs == [1, 2, 1, 3]


def test_seal_refuses_untrusted_recipient(tmp_path, supplier):
    (supplier.trust_dir / "origin.json").unlink()
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(packages.SealError, match="not in the trust store"):
        _seal(supplier, "origin", src, tmp_path / "p.pkg")
    assert not (tmp_path / "p.pkg").exists()


def test_concurrent_seals_take_distinct_sequence_numbers(tmp_path, supplier):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with ThreadPoolExecutor(4) as pool:
        headers = list(pool.map(lambda i: _seal(supplier, "origin", src, tmp_path / f"{i}.pkg"), range(8)))
    assert sorted(h["sequence"] for h in headers) == list(range(1, 9))


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs a file that fails when read (Linux)")
def test_seal_that_fails_midway_leaves_no_file(tmp_path, supplier):
    out = tmp_path / "packages" / "p.pkg"
    with pytest.raises(OSError):
        _seal(supplier, "origin", Path("/proc/self/mem"), out)
    assert list(out.parent.iterdir()) == []


# ---------------------------------------------------------------- one test per rejection reason


def test_open_rejects_unknown_sender(tmp_path, destination, origin, snapshot):
    (origin.trust_dir / "destination.json").unlink()
    src = tmp_path / "f"
    src.write_bytes(b"hello")
    _seal(destination, "origin", src, tmp_path / "p.pkg")
    reason = _rejected(origin, tmp_path / "p.pkg", tmp_path / "out", snapshot)
    assert reason == "unknown sender 'destination': not in the trust store of 'origin'"


def test_open_rejects_revoked_sender_key(tmp_path, sealed, supplier, origin, snapshot):
    rotation.revoke_key(origin, keys.signing_key_id(supplier), "compromised")
    reason = _rejected(origin, sealed[1], tmp_path / "out", snapshot)
    assert reason == f"signing key {keys.signing_key_id(supplier)} of 'supplier' is revoked at 'origin'"


def test_open_rejects_package_for_another_recipient(tmp_path, sealed, destination, snapshot):
    reason = _rejected(destination, sealed[1], tmp_path / "out", snapshot)
    assert reason == "package was sealed for origin, not destination"


def test_open_rejects_modified_header_byte(tmp_path, sealed, origin, snapshot):
    data = bytearray(sealed[1].read_bytes())
    at = data.index(b'"purpose":"collaboration"') + len('"purpose":"')
    data[at] = ord("C")
    sealed[1].write_bytes(data)
    reason = _rejected(origin, sealed[1], tmp_path / "out", snapshot)
    assert reason.startswith("header signature does not verify with 'supplier' key")


def test_open_rejects_modified_content_byte(tmp_path, sealed, origin, snapshot):
    data = bytearray(sealed[1].read_bytes())
    data[-(116 + 10)] ^= 0x01  # inside chunk 2, just before the short final chunk (100 + 16 bytes)
    sealed[1].write_bytes(data)
    reason = _rejected(origin, sealed[1], tmp_path / "out", snapshot)
    assert reason == "content chunk 2 failed authentication (modified package)"


def test_open_rejects_reordered_chunks(tmp_path, sealed, origin, snapshot):
    data = bytearray(sealed[1].read_bytes())
    size = CHUNK + 16
    end = len(data) - (100 + 16)  # the last (short) chunk
    first, second = end - 3 * size, end - 2 * size
    data[first:second], data[second:end - size] = data[second:end - size], data[first:second]
    sealed[1].write_bytes(data)
    reason = _rejected(origin, sealed[1], tmp_path / "out", snapshot)
    assert reason == "content chunk 0 failed authentication (modified package)"


def test_open_rejects_modified_directory_package(tmp_path, supplier, origin, snapshot):
    src = tmp_path / "dataset"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(3 * CHUNK))
    _seal(supplier, "origin", src, tmp_path / "d.pkg")
    data = bytearray((tmp_path / "d.pkg").read_bytes())
    data[-10] ^= 0x01  # inside the final chunk
    (tmp_path / "d.pkg").write_bytes(data)
    reason = _rejected(origin, tmp_path / "d.pkg", tmp_path / "out", snapshot)
    assert reason.startswith("content chunk ") and reason.endswith(" failed authentication (modified package)")


def test_open_rejects_truncated_package(tmp_path, sealed, origin, snapshot):
    data = sealed[1].read_bytes()
    sealed[1].write_bytes(data[:-(100 + 16)])  # drop the whole final chunk
    reason = _rejected(origin, sealed[1], tmp_path / "out", snapshot)
    assert reason == f"package is truncated: {len(data) - 116} of {len(data)} bytes"


def test_open_rejects_extended_package(tmp_path, sealed, origin, snapshot):
    with sealed[1].open("ab") as handle:
        handle.write(os.urandom(CHUNK + 16))
    reason = _rejected(origin, sealed[1], tmp_path / "out", snapshot)
    assert reason == f"package was extended: {CHUNK + 16} bytes after its final chunk"


def test_open_rejects_expired_package(tmp_path, supplier, origin, snapshot):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    header = _seal(supplier, "origin", src, tmp_path / "p.pkg", expires_in=timedelta(seconds=-1))
    reason = _rejected(origin, tmp_path / "p.pkg", tmp_path / "out", snapshot)
    assert reason == f"package expired at {header['expires']}"


def test_open_rejects_replayed_package(tmp_path, sealed, origin, snapshot):
    header = packages.open_package(origin, sealed[1], tmp_path / "first")
    copy = tmp_path / "copy.pkg"
    shutil.copy(sealed[1], copy)
    reason = _rejected(origin, copy, tmp_path / "out", snapshot)
    assert reason == f"package {header['package_id']} was already opened at origin (replay)"


def test_concurrent_opens_of_one_package_consume_it_once(tmp_path, sealed, origin):
    def attempt(i: int) -> str:
        try:
            packages.open_package(origin, sealed[1], tmp_path / f"out{i}")
            return "opened"
        except PackageRejected as error:
            return error.reason

    with ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(attempt, range(2)))
    assert outcomes[0] == "opened" and outcomes[1].endswith("(replay)")
    assert sorted(p.name for p in tmp_path.glob("out*/*")) == ["data.bin"]


def test_open_rejects_stale_sequence_number(tmp_path, supplier, origin, snapshot):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    _seal(supplier, "origin", src, tmp_path / "1.pkg")
    _seal(supplier, "origin", src, tmp_path / "2.pkg")
    packages.open_package(origin, tmp_path / "2.pkg", tmp_path / "second")
    reason = _rejected(origin, tmp_path / "1.pkg", tmp_path / "out", snapshot)
    assert reason == "stale sequence number 1 on channel supplier->origin (dataset): sequence 2 was already opened"


def test_open_rejects_a_file_that_is_not_a_package(tmp_path, origin, snapshot):
    bogus = tmp_path / "bogus.pkg"
    bogus.write_bytes(b"PK\x03\x04 not a package")
    assert _rejected(origin, bogus, tmp_path / "out", snapshot) == "not a sealed package (bad magic or format)"


def test_open_rejects_model_with_bad_signature(tmp_path, supplier, origin, snapshot):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("model.onnx", "model_card.json", "metadata.json"):
        (model / name).write_bytes(os.urandom(64))
    signing.sign_model_dir(supplier, model)
    (model / "model.onnx").write_bytes(b"swapped weights")
    _seal(supplier, "origin", model, tmp_path / "m.pkg", content_type="model")
    reason = _rejected(origin, tmp_path / "m.pkg", tmp_path / "out", snapshot)
    assert reason.startswith("model signature does not verify:") and "model.onnx" in reason


def test_open_into_existing_folder_keeps_its_content_on_rejection(tmp_path, sealed, destination, snapshot):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    reason = _rejected(destination, sealed[1], out, snapshot)
    assert reason.startswith("package was sealed for origin")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# ---------------------------------------------------------------- rotation


def test_packages_sealed_before_a_rotation_still_open(tmp_path, supplier, origin):
    src = tmp_path / "f"
    src.write_bytes(b"before rotation")
    _seal(supplier, "origin", src, tmp_path / "to-origin.pkg")      # sealed to origin's old KEM key
    _seal(origin, "supplier", src, tmp_path / "from-origin.pkg")    # signed with origin's old key
    updates = rotation.rotate_keys(origin, tmp_path / "updates")
    for update in updates:
        if update.name.endswith("-for-supplier.json"):
            rotation.accept_key_update(supplier, update)
    assert packages.open_package(origin, tmp_path / "to-origin.pkg", tmp_path / "a")["sender"] == "supplier"
    assert packages.open_package(supplier, tmp_path / "from-origin.pkg", tmp_path / "b")["sender"] == "origin"
    header = _seal(supplier, "origin", src, tmp_path / "after.pkg")
    assert header["recipient_kem_key_id"] == keys.current_record(origin)["kem_key_id"]
    packages.open_package(origin, tmp_path / "after.pkg", tmp_path / "c")


# ---------------------------------------------------------------- CLI


def test_cli_seal_open_verify(tmp_path, home):
    src = tmp_path / "report.txt"
    src.write_text("numbers")
    runner = CliRunner()
    pkg = tmp_path / "r.pkg"
    result = runner.invoke(main, ["package", "seal", "--from", "origin", "--to", "supplier", "--in", str(src),
                                  "--out", str(pkg), "--purpose", "collaboration"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(main, ["package", "verify", "--as", "supplier", "--in", str(pkg)]).exit_code == 0
    result = runner.invoke(main, ["package", "open", "--as", "supplier", "--in", str(pkg), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "report.txt").read_text() == "numbers"


def test_cli_reports_rejection_on_one_stderr_line(tmp_path, sealed, home):
    result = CliRunner().invoke(main, ["package", "open", "--as", "destination", "--in", str(sealed[1]),
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.stderr == "rejected: package was sealed for origin, not destination\n"
    assert not (tmp_path / "o").exists()
