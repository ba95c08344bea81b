"""Attacks on sealed packages by a hostile partner or anyone who can write into an inbox (issue 15:
findings 1, 2, 4, 5, 8, 9a, 9b). Each one is carried out and must end in a PackageRejected (or a
SealError), a `package.rejected` audit entry and nothing left on disk."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec
from model_signing import hashing as model_hashing
from model_signing import signing as model_signing

from pipelines.config import PROJECT_ROOT
from pipelines.fileio import write_json
from pipelines.trust import audit, envelope, keys, packages, rotation, signing
from pipelines.trust.packages import PackageRejected

CHUNK = 4096


def _seal(sender, recipient: str, src: Path, out: Path, **kw) -> dict:
    kw.setdefault("purpose", "collaboration")
    kw.setdefault("content_type", "dataset")
    kw.setdefault("chunk_size", CHUNK)
    return packages.seal(sender, recipient, src, out, **kw)


def _payload(tmp_path: Path, name: str = "data.bin", size: int = 3 * CHUNK + 100) -> Path:
    src = tmp_path / name
    src.write_bytes(os.urandom(size))
    return src


def _split(data: bytes) -> tuple[dict, int]:
    """The header of a package file (unverified) and where its content starts."""
    (region,) = struct.unpack(">I", data[8:12])
    return json.loads(data[12:12 + region]), 12 + region + envelope.SIG_SIZE


def forge(package: Path, recipient, signer: ec.EllipticCurvePrivateKey, /, *, rewrap: bool = True, **changes) -> dict:
    """Rewrite a valid package's header with `changes` and sign it with `signer`, as a partner holding
    that key (or an attacker holding a stolen one) could. With `rewrap` the content key is wrapped
    again for the new header (it binds sender and recipient), so only the changes can be refused."""
    data = package.read_bytes()
    header, offset = _split(data)
    if rewrap:
        content_key = envelope.unwrap_key(recipient, header)
        header.update(changes)
        header["wrapped_key"] = envelope.wrap_key(content_key, header, keys.current_record(recipient))
    else:
        header.update(changes)
    package.write_bytes(envelope.signed(header, envelope.reserve(header), signer) + data[offset:])
    return header


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".opening-*"))


def _refused(recipient, package: Path, out: Path, snapshot) -> str:
    """Open `package` and expect a rejection that changed nothing, left no staging folder and was audited."""
    before = snapshot(out)
    count = sum(1 for _ in audit.entries(recipient))
    with pytest.raises(PackageRejected) as caught:
        packages.open_package(recipient, package, out)
    assert snapshot(out) == before
    assert _leftovers(out.parent) == []
    last = list(audit.entries(recipient))[count:]
    assert [e["action"] for e in last][-1] == "package.rejected"
    assert last[-1]["details"]["reason"] == caught.value.reason
    return caught.value.reason


# ---------------------------------------------------------------- finding 1: names used as paths


@pytest.fixture
def intruder(origin):
    """A key of the attacker's own and a trust file for it dropped into origin's inbox."""
    private = ec.generate_private_key(ec.SECP256R1())
    public = private.public_key()
    key_id = keys.signing_key_id_of(public)
    record = dict(keys.current_record(origin), site="evil", generation=1, signing_key_id=key_id,
                  signing_public=public.public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo).decode())
    origin.inbox.mkdir(parents=True, exist_ok=True)
    write_json(origin.inbox / "evil.json", {"site": "evil", "keys": [record]})
    return private, key_id


def _model(tmp_path: Path, name: str = "model") -> Path:
    model = tmp_path / name
    model.mkdir()
    for file in ("model.onnx", "model_card.json", "metadata.json"):
        (model / file).write_bytes(os.urandom(64))
    return model


@pytest.mark.parametrize("content_type", ["dataset", "model"])
@pytest.mark.parametrize("claim", ["relative", "absolute", "recipient"])
def test_sender_named_by_a_path_is_refused(tmp_path, supplier, origin, intruder, snapshot, content_type, claim):
    private, key_id = intruder
    src = _model(tmp_path) if content_type == "model" else _payload(tmp_path)
    if content_type == "model":
        signing.sign_model_dir(supplier, src)
    package = tmp_path / "p.pkg"
    _seal(supplier, "origin", src, package, content_type=content_type)
    sender = {"relative": "../inbox/evil", "absolute": str(origin.inbox / "evil"), "recipient": "origin"}[claim]
    forge(package, origin, private, sender=sender, sender_key_id=key_id)
    reason = _refused(origin, package, tmp_path / "out", snapshot)
    if claim == "recipient":
        assert reason == "'origin' is this site itself, not a partner"
    else:
        assert reason == f"site {sender[:64]!r} is not a configured partner of 'origin' (supplier, destination)"


@pytest.mark.parametrize("signer", ["../inbox/evil", "origin", ["supplier"]])
def test_model_signer_named_by_a_path_is_refused(tmp_path, supplier, origin, intruder, snapshot, signer):
    """A partner's valid package carrying a model signed by the attacker, who names itself as signer."""
    private, _ = intruder
    model = _model(tmp_path)
    key_file = tmp_path / "evil.pem"
    key_file.write_bytes(private.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    hashing = model_hashing.Config().set_ignored_paths(paths=[model / signing.SIGNATURE_FILE])
    (model_signing.Config().use_elliptic_key_signer(private_key=key_file)
     .set_hashing_config(hashing).sign(model, model / signing.SIGNATURE_FILE))
    _seal(supplier, "origin", model, tmp_path / "m.pkg", content_type="model", metadata={"model_signer": signer})
    reason = _refused(origin, tmp_path / "m.pkg", tmp_path / "out", snapshot)
    assert reason.startswith("model signer refused: ")


def test_signature_check_refuses_a_signer_named_by_a_path(tmp_path, supplier, origin, intruder):
    model = _model(tmp_path)
    signing.sign_model_dir(supplier, model)
    for signer in ("../inbox/evil", str(origin.inbox / "evil"), "nobody"):
        with pytest.raises(signing.SignatureError, match="not a configured partner"):
            signing.verify_model_dir(model, paths=origin, signer_site=signer)
    signing.verify_model_dir(model, paths=origin, signer_site="supplier")


# ---------------------------------------------------------------- finding 2: extraction


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = b"x", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, data if kind == tarfile.REGTYPE else None


def _realpath_escape(outside: Path) -> list[tuple]:
    """The CVE-2025-4517 layout: long folder names and a chain of links make os.path.realpath give
    up before the last link, so a 'data' filter that checks realpath lets `escape/` point outside."""
    component = "d" * 247
    steps = "abcdefghijklmnop"
    members, path = [], ""
    for step in steps:
        members.append(_member(os.path.join(path, component), tarfile.DIRTYPE))
        members.append(_member(os.path.join(path, step), tarfile.SYMTYPE, link=component))
        path = os.path.join(path, component)
    linkpath = os.path.join(*steps, "l" * 254)
    members.append(_member(linkpath, tarfile.SYMTYPE, link="../" * len(steps)))
    members.append(_member("escape", tarfile.SYMTYPE, link=linkpath + "/.." * 10 + str(outside)))
    members.append(_member("escape/evil.txt", data=b"written outside"))
    return members


def _sealed_tar(tmp_path: Path, supplier, origin, tar_bytes: bytes) -> Path:
    """A tar stream sealed by supplier's real key as a directory package (layout 'tar')."""
    raw = tmp_path / "payload"
    raw.write_bytes(tar_bytes)
    package = tmp_path / "d.pkg"
    _seal(supplier, "origin", raw, package)
    forge(package, origin, keys.signing_key(supplier), layout="tar")
    return package


ESCAPES = {
    "symlink": lambda outside: [_member("link", tarfile.SYMTYPE, link=str(outside)), _member("link/evil.txt")],
    "hardlink": lambda outside: [_member("hard", tarfile.LNKTYPE, link=str(outside / "victim.txt"))],
    "parent": lambda outside: [_member("ok.txt"), _member("../escaped.txt")],
    "nested-parent": lambda outside: [_member("a/../../escaped.txt")],
    "absolute": lambda outside: [_member(str(outside / "evil.txt"))],
    "device": lambda outside: [_member("dev", tarfile.CHRTYPE)],
    "fifo": lambda outside: [_member("fifo", tarfile.FIFOTYPE)],
    "realpath-chain": _realpath_escape,
    "below-a-file": lambda outside: [_member("a"), _member("a/b")],
    "twice": lambda outside: [_member("a", data=b"first"), _member("a", data=b"second")],
    "control-character": lambda outside: [_member("bad\nname")],
    "too-deep": lambda outside: [_member("/".join(["d"] * 40))],
}


@pytest.mark.parametrize("attack", sorted(ESCAPES))
def test_directory_package_that_writes_outside_is_refused(tmp_path, supplier, origin, snapshot, attack):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("untouched")
    package = _sealed_tar(tmp_path, supplier, origin, _tar(ESCAPES[attack](outside)))
    reason = _refused(origin, package, tmp_path / "out", snapshot)
    assert reason.startswith("directory package member")
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert (outside / "victim.txt").read_text() == "untouched"
    assert not (tmp_path / "escaped.txt").exists()


def test_oversized_pax_header_is_refused_before_it_is_read_whole(tmp_path, supplier, origin, snapshot):
    info = tarfile.TarInfo("a.txt")
    info.pax_headers = {"comment": "x" * (packages.MAX_MEMBER_HEADERS * 2)}
    package = _sealed_tar(tmp_path, supplier, origin, _tar([(info, b"x")]))
    assert _refused(origin, package, tmp_path / "out", snapshot).startswith("a member's tar headers take more")


def test_too_many_members_are_refused(tmp_path, supplier, origin, snapshot, monkeypatch):
    monkeypatch.setattr(packages, "MAX_MEMBERS", 3)
    package = _sealed_tar(tmp_path, supplier, origin, _tar([_member(f"f{i}") for i in range(4)]))
    assert _refused(origin, package, tmp_path / "out", snapshot) == "directory package has more than 3 members"


def test_regular_tar_of_files_and_folders_still_opens(tmp_path, supplier, origin):
    members = [_member("top", tarfile.DIRTYPE), _member("top/a.txt", data=b"alpha"), _member("b.bin", data=b"\0" * 9)]
    package = _sealed_tar(tmp_path, supplier, origin, _tar(members))
    opened = Path(packages.open_package(origin, package, tmp_path / "out")["path"])
    assert (opened / "top" / "a.txt").read_bytes() == b"alpha" and (opened / "b.bin").read_bytes() == b"\0" * 9


def test_seal_refuses_a_folder_with_a_link(tmp_path, supplier):
    src = tmp_path / "dataset"
    src.mkdir()
    (src / "a.csv").write_text("x\n")
    (src / "link").symlink_to(tmp_path)
    with pytest.raises(packages.SealError, match="only regular files and folders"):
        _seal(supplier, "origin", src, tmp_path / "p.pkg")
    assert not (tmp_path / "p.pkg").exists()


@pytest.mark.parametrize("name", ["../x", ".hidden", "a b"])
def test_unsafe_output_name_is_refused(tmp_path, supplier, origin, snapshot, name):
    package = tmp_path / "p.pkg"
    _seal(supplier, "origin", _payload(tmp_path), package)
    forge(package, origin, keys.signing_key(supplier), name=name)
    assert _refused(origin, package, tmp_path / "out", snapshot) == "header is invalid: field 'name' has an invalid value"


# ---------------------------------------------------------------- finding 4: rotation, lifetimes, sequences


@pytest.fixture
def trust_conf(tmp_path, monkeypatch):
    """Write conf/trust.yaml limits into a copy of conf/ that FACTORY_CONF points at."""
    folder = tmp_path / "conf"
    shutil.copytree(PROJECT_ROOT / "conf", folder)
    monkeypatch.setenv("FACTORY_CONF", str(folder))

    def write(**limits) -> None:
        (folder / "trust.yaml").write_text("".join(f"{k}: {v}\n" for k, v in limits.items()))

    return write


def _old_signing_key(paths) -> ec.EllipticCurvePrivateKey:
    pem = (paths.keys_dir / "gen-0001" / "signing.pem").read_bytes()
    return ser.load_pem_private_key(pem, keys.site_secret(paths))


def _rotate_supplier(tmp_path, supplier, origin) -> tuple[str, str]:
    """Supplier rotates, origin accepts; returns (old key id, supersession time at origin)."""
    old = keys.signing_key_id(supplier)
    update = next(u for u in rotation.rotate_keys(supplier, tmp_path / "updates") if u.name.endswith("-for-origin.json"))
    rotation.accept_key_update(origin, update)
    record = next(r for r in keys.records(origin, "supplier") if r["signing_key_id"] == old)
    return old, record["superseded_at"]


def test_rotated_out_key_is_refused_after_the_grace_whatever_the_header_claims(tmp_path, supplier, origin, snapshot,
                                                                             trust_conf):
    old_key = _old_signing_key(supplier)
    old_id, superseded = _rotate_supplier(tmp_path, supplier, origin)
    before = keys.iso(keys.parse_time(superseded) - timedelta(minutes=1))
    package = tmp_path / "p.pkg"
    _seal(supplier, "origin", _payload(tmp_path), package)
    forge(package, origin, old_key, sender_key_id=old_id, created=before,
          expires=keys.iso(keys.now() + timedelta(days=1)))
    assert packages.verify_package(origin, package)["sender_key_id"] == old_id  # within the grace: still good
    trust_conf(rotation_grace_hours=0)
    reason = _refused(origin, package, tmp_path / "out", snapshot)
    assert reason.startswith(f"signing key {old_id} of 'supplier' was rotated out at {superseded} and retired at")


def test_rotation_grace_counts_from_the_recipients_acceptance_not_the_senders_claim(tmp_path, supplier, origin):
    old_id, _ = _rotate_supplier(tmp_path, supplier, origin)
    record = next(r for r in keys.records(origin, "supplier") if r["signing_key_id"] == old_id)
    accepted = keys.parse_time(record["superseded_accepted_at"])
    assert abs((keys.now() - accepted).total_seconds()) < 60
    assert keys.retired_at(origin, "supplier", record) == accepted + timedelta(hours=24)


def test_package_lifetime_is_capped(tmp_path, supplier, origin, snapshot):
    with pytest.raises(packages.SealError, match="exceeds the package lifetime limit of 30 days"):
        _seal(supplier, "origin", _payload(tmp_path), tmp_path / "long.pkg", expires_in=timedelta(days=31))
    package = tmp_path / "p.pkg"
    header = _seal(supplier, "origin", _payload(tmp_path), package)
    created = keys.parse_time(header["created"])
    forge(package, origin, keys.signing_key(supplier), expires=keys.iso(created + timedelta(days=365)))
    assert _refused(origin, package, tmp_path / "out", snapshot).startswith("package lifetime 365 days")


def test_package_created_in_the_future_is_refused(tmp_path, supplier, origin, snapshot):
    package = tmp_path / "p.pkg"
    _seal(supplier, "origin", _payload(tmp_path), package)
    created = keys.now() + timedelta(hours=1)
    forge(package, origin, keys.signing_key(supplier), created=keys.iso(created),
          expires=keys.iso(created + timedelta(days=1)))
    assert _refused(origin, package, tmp_path / "out", snapshot).endswith(", in the future")


@pytest.mark.parametrize("sequence", [1001, 2**62])
def test_a_huge_sequence_is_refused_and_does_not_block_the_channel(tmp_path, supplier, origin, snapshot, sequence):
    package = tmp_path / "huge.pkg"
    _seal(supplier, "origin", _payload(tmp_path), package)
    forge(package, origin, keys.signing_key(supplier), sequence=sequence)
    reason = _refused(origin, package, tmp_path / "out", snapshot)
    assert reason == (f"sequence number {sequence} on channel supplier->origin (dataset) jumps more than 1000 "
                      "past the last one opened (0)")
    _seal(supplier, "origin", _payload(tmp_path, "next.bin"), tmp_path / "next.pkg")
    assert packages.open_package(origin, tmp_path / "next.pkg", tmp_path / "out")["sequence"] == 2


def test_sequence_jump_limit_comes_from_conf(tmp_path, supplier, origin, snapshot, trust_conf):
    trust_conf(max_sequence_jump=2)
    package = tmp_path / "p.pkg"
    _seal(supplier, "origin", _payload(tmp_path), package)
    forge(package, origin, keys.signing_key(supplier), sequence=3)
    assert "jumps more than 2" in _refused(origin, package, tmp_path / "out", snapshot)


def test_kinds_delivered_out_of_order_are_all_opened(tmp_path, supplier, origin):
    first = _seal(supplier, "origin", _payload(tmp_path, "a.bin"), tmp_path / "a.pkg", metadata={"kind": "contrib"})
    second = _seal(supplier, "origin", _payload(tmp_path, "b.bin"), tmp_path / "b.pkg", metadata={"kind": "shared"})
    model = _model(tmp_path)
    signing.sign_model_dir(supplier, model)
    third = _seal(supplier, "origin", model, tmp_path / "m.pkg", content_type="model")
    assert [h["channel"] for h in (first, second, third)] == ["contrib", "shared", "model"]
    for name in ("m", "b", "a"):  # newest first
        packages.open_package(origin, tmp_path / f"{name}.pkg", tmp_path / f"out-{name}")


# ---------------------------------------------------------------- finding 5: audit heads travel in packages


def test_open_witnesses_the_senders_audit_head(tmp_path, supplier, origin):
    audit.append(supplier, action="test.event", actor="t", object="o", outcome="success")
    header = _seal(supplier, "origin", _payload(tmp_path), tmp_path / "p.pkg")
    assert header["audit_head"]["site"] == "supplier" and header["audit_head"]["seq"] == 1
    packages.open_package(origin, tmp_path / "p.pkg", tmp_path / "out")
    assert [h["seq"] for h in audit.witnessed_heads(origin, "supplier")] == [1]
    audit.verify(supplier, audit.witnessed_heads(origin, "supplier"))


def test_an_older_head_still_opens(tmp_path, supplier, origin):
    _seal(supplier, "origin", _payload(tmp_path, "a.bin"), tmp_path / "old.pkg", metadata={"kind": "a"})
    _seal(supplier, "origin", _payload(tmp_path, "b.bin"), tmp_path / "new.pkg", metadata={"kind": "b"})
    packages.open_package(origin, tmp_path / "new.pkg", tmp_path / "out1")
    packages.open_package(origin, tmp_path / "old.pkg", tmp_path / "out2")  # StaleHead is tolerated
    assert [h["seq"] for h in audit.witnessed_heads(origin, "supplier")] == [1]


@pytest.mark.parametrize("tamper", ["signature", "other-site"])
def test_a_bad_audit_head_refuses_the_package(tmp_path, supplier, origin, destination, snapshot, tamper):
    package = tmp_path / "p.pkg"
    header = _seal(supplier, "origin", _payload(tmp_path), package)
    head = dict(header["audit_head"], seq=header["audit_head"]["seq"] + 5)
    if tamper == "other-site":
        head = audit.signed_head(destination)
    forge(package, origin, keys.signing_key(supplier), audit_head=head)
    reason = _refused(origin, package, tmp_path / "out", snapshot)
    expected = {"signature": "the sender's audit head is refused: partner audit head refused: the signature",
                "other-site": "the audit head in the package is of 'destination', not of the sender supplier"}[tamper]
    assert reason.startswith(expected)
    if tamper == "signature":
        assert [e["action"] for e in audit.entries(origin)][-2:] == ["audit.head_refused", "package.rejected"]


def test_a_sender_that_rewrote_its_log_is_refused(tmp_path, supplier, origin, snapshot):
    """Supplier cuts its log and starts again: its next head has a seq origin witnessed with another hash."""
    audit.append(supplier, action="test.event", actor="t", object="first", outcome="success")
    _seal(supplier, "origin", _payload(tmp_path, "a.bin"), tmp_path / "a.pkg")
    packages.open_package(origin, tmp_path / "a.pkg", tmp_path / "out-a")
    supplier.audit_log.unlink()
    (supplier.state_dir / "audit.head.json").unlink()
    audit.append(supplier, action="test.event", actor="t", object="rewritten", outcome="success")
    _seal(supplier, "origin", _payload(tmp_path, "b.bin"), tmp_path / "b.pkg")
    reason = _refused(origin, tmp_path / "b.pkg", tmp_path / "out", snapshot)
    assert reason.startswith("the sender's audit head is refused: supplier forked its audit log: seq 1")


# ---------------------------------------------------------------- finding 8: junk in the envelope


def _envelope(body: bytes, region: int | None = None) -> bytes:
    return envelope.MAGIC + struct.pack(">I", len(body) if region is None else region) + body + bytes(64)


@pytest.mark.parametrize("body, expected", [
    (b"[" * 200_000 + b"]" * 200_000, "header is corrupted (not JSON; modified package)"),
    (b'{"format":3,"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "header is corrupted (not JSON; modified package)"),
    (b"\xff\xfe{}", "header is corrupted (not JSON; modified package)"),
    (b'{"format":3,"format":3}', "header is corrupted (not JSON; modified package)"),
    (b'{"format":NaN}', "header is corrupted (not JSON; modified package)"),
    (b"[]", "header is corrupted (not a JSON object; modified package)"),
    (b'{"format":"3"}', "unsupported package format ?"),
    (b'{"format": 3}', "header is corrupted (not in canonical form; modified package)"),
    (b'{"format":3}', "header is invalid: fields ['audit_head', 'channel', 'chunk_size', 'chunks', 'content_digest'] "
                      "missing, [] unexpected"),
])
def test_junk_header_is_a_rejection(tmp_path, origin, snapshot, body, expected):
    package = tmp_path / "junk.pkg"
    package.write_bytes(_envelope(body))
    assert _refused(origin, package, tmp_path / "out", snapshot) == expected


def test_implausible_header_length_is_a_rejection(tmp_path, origin, snapshot):
    package = tmp_path / "junk.pkg"
    package.write_bytes(_envelope(b"{}", region=2**32 - 1))
    assert _refused(origin, package, tmp_path / "out", snapshot) == "header is corrupted (implausible length)"


def test_random_mutations_of_the_header_region_are_rejections(tmp_path, supplier, origin):
    package = tmp_path / "p.pkg"
    _seal(supplier, "origin", _payload(tmp_path), package)
    original = package.read_bytes()
    header, offset = _split(original)
    expected = packages.verify_package(origin, package)
    rng = random.Random(15)
    outcomes = {"rejected": 0, "intact": 0}
    for _ in range(300):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(offset)
            action = rng.choice(["flip", "set", "insert", "delete"])
            if action == "flip":
                data[at] ^= 1 << rng.randrange(8)
            elif action == "set":
                data[at] = rng.choice(b'{}[]",:0123456789 \\\x00\xff')
            elif action == "insert":
                data[at:at] = bytes([rng.randrange(256)])
            else:
                del data[at]
        package.write_bytes(bytes(data))
        try:
            assert packages.verify_package(origin, package) == expected
            outcomes["intact"] += 1
        except PackageRejected:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] + outcomes["intact"] == 300 and outcomes["rejected"] > 250


HOSTILE_VALUES = [None, True, -1, 0, 2**70, 1.5, "", "x" * 5000, "../../etc/passwd", [], {}, [[[["deep"]]]],
                  {"a": {"b": {}}}, "2026-01-01T00:00:00", "\x00"]


def test_every_header_field_of_a_hostile_type_is_a_rejection_or_opens(tmp_path, supplier, origin):
    """A partner signs headers with fields of every type: nothing but PackageRejected or success comes out."""
    package = tmp_path / "p.pkg"
    _seal(supplier, "origin", _payload(tmp_path), package)
    original = package.read_bytes()
    fields = sorted(_split(original)[0])
    signer = keys.signing_key(supplier)
    opened = 0
    for field in fields:
        for value in HOSTILE_VALUES:
            package.write_bytes(original)
            forge(package, origin, signer, rewrap=False, **{field: value})
            try:
                packages.verify_package(origin, package)
                opened += 1
            except PackageRejected as error:
                assert error.reason
    assert opened < len(HOSTILE_VALUES)  # only a purpose-like text or metadata can take other values
    audit.verify(origin)


def test_unreadable_package_file_is_a_rejection(tmp_path, origin):
    with pytest.raises(PackageRejected, match="cannot read package"):
        packages.read_signed_header(origin, tmp_path / "missing.pkg")
    with pytest.raises(PackageRejected, match="cannot read package"):
        packages.verify_package(origin, tmp_path)


# ---------------------------------------------------------------- finding 9a: nothing unsigned in the envelope


def test_changing_any_byte_of_the_envelope_fails_verification(tmp_path, supplier, origin):
    package = tmp_path / "p.pkg"
    _seal(supplier, "origin", _payload(tmp_path), package)
    data = package.read_bytes()
    header, offset = _split(data)
    region = offset - 12 - envelope.SIG_SIZE
    assert region > len(envelope.canonical(header))  # there is padding, and it is signed too
    assert data[12 + len(envelope.canonical(header)): 12 + region].strip(b" ") == b""
    envelope.read(origin, io.BytesIO(data))
    for at in range(offset):
        changed = bytearray(data)
        changed[at] ^= 0x01
        with pytest.raises(PackageRejected):
            envelope.read(origin, io.BytesIO(bytes(changed)))


# ---------------------------------------------------------------- finding 9b: leftovers of a killed open


def test_stale_staging_and_temp_files_are_removed(tmp_path, supplier, origin):
    scratch = origin.state_dir / "open-1234"
    leftover = scratch / ".opening-abcd1234"
    leftover.mkdir(parents=True)
    (leftover / "data.bin").write_bytes(b"decrypted plaintext")
    in_use = origin.state_dir / ".opening-inuse123"
    in_use.mkdir()
    temp = origin.state_dir / "packages" / ".channels.json.ab12cd_3.tmp"
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.write_text("{")
    fresh_temp = origin.inbox / ".x.pkg.zz99yy88.tmp"
    origin.inbox.mkdir(parents=True, exist_ok=True)
    fresh_temp.write_text("sealing")
    old = keys.now().timestamp() - 7200
    for path in (leftover, in_use, temp):
        os.utime(path, (old, old))
    import fcntl

    holder = os.open(in_use, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        removed = packages.clean_stale_staging(origin)
    finally:
        os.close(holder)
    assert sorted(removed) == sorted([leftover, temp])
    assert not leftover.exists() and not temp.exists() and in_use.exists() and fresh_temp.exists()
    entry = list(audit.entries(origin))[-1]
    assert entry["action"] == "staging.cleaned" and entry["details"]["count"] == 2
    assert packages.clean_stale_staging(origin, min_age=0) == [in_use]  # its holder is gone now


def test_open_holds_the_lock_on_its_staging_folder(tmp_path, supplier, origin, monkeypatch):
    """While an open runs, its staging folder is not stale even when old."""
    _seal(supplier, "origin", _payload(tmp_path), tmp_path / "p.pkg")
    seen = {}
    real_copy = packages._write_file

    def spy(content, staged, chunk_size):
        seen["removed"] = packages.clean_stale_staging(origin, min_age=0)
        seen["staging"] = staged.parent
        return real_copy(content, staged, chunk_size)

    monkeypatch.setattr(packages, "_write_file", spy)
    out = origin.state_dir / "open-x" / "out"
    out.parent.mkdir(parents=True)
    packages.open_package(origin, tmp_path / "p.pkg", out)
    assert seen["removed"] == [] and seen["staging"].name.startswith(".opening-")
    assert not seen["staging"].exists()
