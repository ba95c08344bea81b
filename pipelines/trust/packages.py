"""Sealed packages (design section 7): what crosses from one site to another.

A package file is the envelope (`pipelines.trust.envelope`: the signed header and the content key
wrapped for the recipient) followed by the content: a file, or a directory as a tar stream, cut
into `chunk_size` plaintext chunks, each sealed with AES-256-GCM under the package's fresh content
key. The chunk index and a final flag are in the nonce and, with the package id, in the associated
data, so reordered, dropped or added chunks fail authentication; the header also carries the exact
size, chunk count and BLAKE3 digest of the content. Memory is a few chunk buffers whatever the size.

Opening checks, in order: the envelope (form and fields, sender a configured partner trusted here
with a key neither revoked nor retired, signature, recipient, times), replay (package id consumed)
and sequence (newer than the last opened on its channel, by at most `max_sequence_jump`; a channel
is sender + `channel`, so kinds delivered out of order do not shadow each other), key unwrap, exact
length, every chunk, the digest; for `content_type="model"` also the model signature; last the
sender's audit head (kept as a witness, `audit.witness`). Plaintext goes to a staging folder
(`.opening-*`, locked while in use) beside the output and is moved into place only when everything
verified; `clean_stale_staging` removes what a killed process left.

A directory travels as a tar stream that is unpacked here member by member, not by `tarfile`'s
extraction (whose safety filter depends on the interpreter's patch level): only regular files and
folders, plain relative names, every folder opened without following links, every file created
new (O_EXCL | O_NOFOLLOW), the resolved destination checked to stay under the staging folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

from blake3 import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipelines.fileio import atomic_path, read_json, update_json
from pipelines.trust import audit, envelope, keys
from pipelines.trust.envelope import DEFAULT_KEM, KEMS, PackageRejected
from pipelines.workspace import SAFE_NAME, SitePaths, UnsafeName, safe_name

CHUNK_SIZE = 1 << 20
MIN_CHUNK, MAX_CHUNK = 1 << 10, 16 << 20
TAG = 16  # bytes an AES-GCM tag adds to each chunk
STAGING_PREFIX = ".opening-"
# Directory packages: limits on the tar stream a partner sends.
MAX_MEMBERS = 10_000
MAX_MEMBER_PATH = 1024  # characters of a member's relative name
MAX_MEMBER_DEPTH = 32
MAX_MEMBER_HEADERS = 32 * 1024  # bytes tarfile may read to parse one member's headers (PAX, long names)
MAX_PAX = 4096  # bytes of PAX records one member may carry
TAR_BUFFER = 64 * 1024  # tarfile's read size when unpacking (it copies its buffer on every read: keep it modest)
_COMPONENT = re.compile(r"^[^\x00-\x1f\x7f/\\]{1,255}$")


class SealError(ValueError):
    """A package cannot be sealed as asked (unknown recipient, missing input, ...)."""


# ---------------------------------------------------------------- streaming: the chunk loop


def _nonce_aad(package_id: bytes, index: int, final: bool) -> tuple[bytes, bytes]:
    # Every package has a fresh key, so the chunk position alone makes each nonce unique (as in age).
    position = struct.pack(">IB", index, final)
    return bytes(7) + position, package_id + position


class _Sealer:
    """A write-only file (for `tarfile` and `_copy`) that seals what it is given into `out`, one chunk
    at a time. A full chunk is sealed only when more data follows it, so `finish()` always has a
    last chunk to flag as final (empty only for empty content)."""

    def __init__(self, out: BinaryIO, key: bytes, package_id: str, chunk_size: int):
        self.out, self.aead, self.package_id = out, AESGCM(key), bytes.fromhex(package_id)
        self.plain, self.filled = bytearray(chunk_size), 0
        self.sealed = bytearray(chunk_size + TAG)
        self.digest = blake3()
        self.chunks = self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        written = len(view)
        while view:
            if self.filled == len(self.plain):
                self._seal_chunk(final=False)
            take = min(len(view), len(self.plain) - self.filled)
            self.plain[self.filled: self.filled + take] = view[:take]
            self.filled += take
            view = view[take:]
        return written

    def finish(self) -> None:
        self._seal_chunk(final=True)

    def _seal_chunk(self, final: bool) -> None:
        plain = memoryview(self.plain)[: self.filled]
        self.digest.update(plain)
        nonce, aad = _nonce_aad(self.package_id, self.chunks, final)
        sealed = memoryview(self.sealed)[: self.filled + TAG]
        self.aead.encrypt_into(nonce, plain, aad, sealed)
        self.out.write(sealed)
        self.chunks += 1
        self.size += self.filled
        self.filled = 0


class _Opener(io.RawIOBase):
    """A read-only file over a package's plaintext. Each chunk is authenticated before any of it is
    returned, and the digest is checked before the last chunk is; the length was checked up front,
    so a short read means the file changed underneath."""

    def __init__(self, handle: BinaryIO, key: bytes, header: dict[str, Any]):
        super().__init__()
        self.handle, self.aead, self.package_id = handle, AESGCM(key), bytes.fromhex(header["package_id"])
        self.chunk_size, self.size, self.chunks = header["chunk_size"], header["content_size"], header["chunks"]
        self.expected_digest = header["content_digest"]
        self.digest = blake3()
        self.sealed, self.plain = bytearray(self.chunk_size + TAG), bytearray(self.chunk_size)
        self.index = self.position = self.available = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self.position == self.available and self.index < self.chunks:
            self.available, self.position = self._open_chunk(), 0
        take = min(len(buffer), self.available - self.position)
        buffer[:take] = memoryview(self.plain)[self.position: self.position + take]
        self.position += take
        return take

    def drain(self) -> None:
        """Authenticate what is left, whether or not the consumer read it."""
        while self.index < self.chunks:
            self._open_chunk()

    def _open_chunk(self) -> int:
        index = self.index
        final = index == self.chunks - 1
        length = (self.size - index * self.chunk_size if final else self.chunk_size) + TAG
        sealed = memoryview(self.sealed)[:length]
        if self.handle.readinto(sealed) < length:
            raise PackageRejected(f"package is truncated at chunk {index}")
        plain = memoryview(self.plain)[: length - TAG]
        nonce, aad = _nonce_aad(self.package_id, index, final)
        try:
            self.aead.decrypt_into(nonce, sealed, aad, plain)
        except InvalidTag:
            raise PackageRejected(f"content chunk {index} failed authentication (modified package)") from None
        self.digest.update(plain)
        if final and "blake3:" + self.digest.hexdigest() != self.expected_digest:
            raise PackageRejected("content digest does not match the header")
        self.index += 1
        return len(plain)


def _copy(source: BinaryIO, sink: Any, chunk_size: int) -> None:
    """Copy `source` to `sink` through one reused buffer."""
    buffer = memoryview(bytearray(chunk_size))
    while got := source.readinto(buffer):
        sink.write(buffer[:got])


def _content(recipient: SitePaths, handle: BinaryIO, header: dict[str, Any], offset: int) -> _Opener:
    """The plaintext reader of a package whose envelope verified, once its length is exactly right."""
    chunk_size, size, chunks = header.get("chunk_size"), header.get("content_size"), header.get("chunks")
    consistent = (all(type(n) is int for n in (chunk_size, size, chunks)) and MIN_CHUNK <= chunk_size <= MAX_CHUNK
                  and size >= 0 and chunks == max(1, -(-size // chunk_size)))
    if not consistent or header.get("layout") not in ("file", "tar"):
        raise PackageRejected("header is inconsistent (chunk layout)")
    expected = offset + size + TAG * chunks
    actual = os.fstat(handle.fileno()).st_size
    if actual < expected:
        raise PackageRejected(f"package is truncated: {actual} of {expected} bytes")
    if actual > expected:
        raise PackageRejected(f"package was extended: {actual - expected} bytes after its final chunk")
    key = envelope.unwrap_key(recipient, header)
    handle.seek(offset)
    return _Opener(handle, key, header)


# ---------------------------------------------------------------- per-site package state


def _state_file(paths: SitePaths) -> Path:
    return paths.state_dir / "packages" / "channels.json"


def _empty_state() -> dict[str, dict]:
    return {"sent": {}, "received": {}, "consumed": {}}


def _channel(party: str, header: dict[str, Any]) -> str:
    """The state key of a channel: the other party and the header's `channel` (a kind of content)."""
    return f"{party}/{header['channel']}"


def _check_fresh(state: dict[str, Any], site: str, header: dict[str, Any]) -> None:
    if header["package_id"] in state.get("consumed", {}):
        raise PackageRejected(f"package {header['package_id']} was already opened at {site} (replay)")
    channel = f"{header['sender']}->{site} ({header['channel']})"
    last = state["received"].get(_channel(header["sender"], header), 0)
    if header["sequence"] <= last:
        raise PackageRejected(
            f"stale sequence number {header['sequence']} on channel {channel}: sequence {last} was already opened"
        )
    jump = keys.settings().max_sequence_jump
    if header["sequence"] > last + jump:
        raise PackageRejected(
            f"sequence number {header['sequence']} on channel {channel} jumps more than {jump} past "
            f"the last one opened ({last})"
        )


def _record_opened(state: dict[str, Any], header: dict[str, Any]) -> None:
    state["received"][_channel(header["sender"], header)] = header["sequence"]
    # An id is kept until its package expires: after that the package is refused as expired, and a
    # replay always has a stale sequence number; the id only gives the plainer replay message.
    now = keys.now()
    consumed = {package_id: expires for package_id, expires in state.get("consumed", {}).items()
                if keys.parse_time(expires) > now}
    state["consumed"] = consumed | {header["package_id"]: header["expires"]}


def _saved_state(paths: SitePaths) -> dict[str, Any]:
    """A snapshot for early checks; decisions that change state re-check under the lock."""
    try:
        return read_json(_state_file(paths))
    except FileNotFoundError:
        return _empty_state()


# ---------------------------------------------------------------- directory members


def member_problem(name: Any) -> str | None:
    """Why `name` cannot be a member of a directory package (None when it is a plain relative name)."""
    if not isinstance(name, str) or not name:
        return "an empty name"
    if len(name) > MAX_MEMBER_PATH:
        return f"a name longer than {MAX_MEMBER_PATH} characters"
    if name.startswith("/"):
        return "an absolute name"
    parts = name.split("/")
    if len(parts) > MAX_MEMBER_DEPTH:
        return f"more than {MAX_MEMBER_DEPTH} levels"
    for part in parts:
        if part in ("", ".", ".."):
            return f"a {part or 'empty'!r} component"
        if not _COMPONENT.match(part):
            return "a component with a control character, a backslash or more than 255 characters"
        try:
            if len(part.encode("utf-8")) > 255:
                return "a component longer than 255 bytes"
        except UnicodeEncodeError:
            return "a component that is not UTF-8"
    return None


def _add_tree(tar: tarfile.TarFile, folder: Path, prefix: str = "") -> None:
    """Add the content of `folder` (regular files and folders only, links are not followed) to `tar`."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        arcname, info = prefix + entry.name, entry.stat(follow_symlinks=False)
        if problem := member_problem(arcname):
            raise SealError(f"cannot seal {entry.path}: {problem}")
        if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
            raise SealError(f"cannot seal {entry.path}: only regular files and folders travel in a package "
                            "(no links, devices or pipes)")
        member = tar.gettarinfo(entry.path, arcname)
        member.uid = member.gid = 0
        member.uname = member.gname = ""
        if stat.S_ISDIR(info.st_mode):
            tar.addfile(member)
            _add_tree(tar, Path(entry.path), arcname + "/")
        else:
            with open(entry.path, "rb") as source:
                tar.addfile(member, source)


class _Metered(io.RawIOBase):
    """The plaintext as `tarfile` reads it, with a cap on what it may read while parsing one member's
    headers (a PAX header of gigabytes would otherwise be read into memory whole): its read buffer
    (`bufsize`) plus MAX_MEMBER_HEADERS."""

    def __init__(self, source: _Opener, bufsize: int):
        super().__init__()
        self.source, self.bufsize, self.count, self.limit = source, bufsize, 0, None

    def expect_headers(self) -> None:
        self.limit = self.count + self.bufsize + MAX_MEMBER_HEADERS

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        got = self.source.readinto(buffer)
        self.count += got
        if self.limit is not None and self.count > self.limit:
            raise PackageRejected(f"a member's tar headers take more than {MAX_MEMBER_HEADERS} bytes")
        return got


def _member_kind(member: tarfile.TarInfo) -> str:
    kinds = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a device",
             tarfile.BLKTYPE: "a device", tarfile.FIFOTYPE: "a FIFO", tarfile.GNUTYPE_SPARSE: "a sparse file"}
    return kinds.get(member.type, f"of type {member.type!r}")


def _check_member(member: tarfile.TarInfo, limit: int) -> None:
    name = member.name
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
        raise PackageRejected(f"directory package member {name[:100]!r} is {_member_kind(member)}; "
                              "only regular files and folders are accepted")
    if problem := member_problem(name):
        raise PackageRejected(f"directory package member {name[:100]!r} has {problem}")
    if sum(len(k) + len(v) for k, v in member.pax_headers.items()) > MAX_PAX:
        raise PackageRejected(f"directory package member {name[:100]!r} carries more than {MAX_PAX} bytes of PAX records")
    if member.isdir() and member.size != 0 or member.size < 0 or member.size > limit:
        raise PackageRejected(f"directory package member {name[:100]!r} has an implausible size {member.size}")


def _open_dir(name: str, parent: int) -> int:
    """A descriptor of folder `name` under `parent`, created if missing; links are never followed."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o755, dir_fd=parent)
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
    except OSError:  # a file of that name, or a link
        raise PackageRejected(f"directory package member path {name[:100]!r} is not a folder") from None


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, staged: Path, root: int, buffer: memoryview) -> None:
    parts = member.name.split("/")
    destination = Path(os.path.realpath(staged.joinpath(*parts)))
    if not destination.is_relative_to(staged):
        raise PackageRejected(f"directory package member {member.name[:100]!r} resolves outside the target")
    folder = os.dup(root)
    try:
        for part in parts[:-1] if not member.isdir() else parts:
            inner = _open_dir(part, folder)
            os.close(folder)
            folder = inner
        if member.isdir():
            return
        try:
            fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o755 if member.mode & 0o100 else 0o644, dir_fd=folder)
        except FileExistsError:
            raise PackageRejected(f"directory package member {member.name[:100]!r} appears twice") from None
        try:
            with os.fdopen(fd, "wb", closefd=False) as sink:
                source = tar.extractfile(member)
                written = 0
                while got := source.readinto(buffer):
                    sink.write(buffer[:got])
                    written += got
            if written != member.size:
                raise PackageRejected(f"directory package member {member.name[:100]!r} is truncated")
        finally:
            os.close(fd)
    finally:
        os.close(folder)


def _extract(content: _Opener, staged: Path, header: dict[str, Any]) -> None:
    """Unpack the tar stream into the new folder `staged`, member by member (see the module docstring)."""
    staged.mkdir()
    staged = Path(os.path.realpath(staged))
    bufsize = min(header["chunk_size"], TAR_BUFFER)
    meter = _Metered(content, bufsize)
    meter.expect_headers()
    buffer = memoryview(bytearray(bufsize))
    root = os.open(staged, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        with tarfile.open(fileobj=meter, mode="r|", bufsize=bufsize) as tar:
            for count, member in enumerate(tar, start=1):
                meter.limit = None
                if count > MAX_MEMBERS:
                    raise PackageRejected(f"directory package has more than {MAX_MEMBERS} members")
                _check_member(member, header["content_size"])
                _write_member(tar, member, staged, root, buffer)
                meter.expect_headers()
    except tarfile.TarError as error:
        raise PackageRejected(f"package content is not a valid directory archive: {error}") from None
    finally:
        os.close(root)
    content.drain()
    _fsync_tree(staged)


def _fsync_tree(folder: Path) -> None:
    """Make the unpacked files durable before the package is recorded as consumed. Done after all are
    written, not one by one: the file system then commits them together (several times faster)."""
    for item in folder.rglob("*"):
        if item.is_file() and not item.is_symlink():
            fd = os.open(item, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ---------------------------------------------------------------- seal


def seal(
    sender: SitePaths,
    recipient: str,
    src: Path,
    out: Path,
    *,
    purpose: str,
    content_type: str,
    expires_in: timedelta = timedelta(days=7),
    metadata: dict | None = None,
    kem: str = DEFAULT_KEM,
    actor: str | None = None,
    chunk_size: int = CHUNK_SIZE,
    channel: str | None = None,
) -> dict:
    """Seal the file or directory `src` for `recipient` into `out`; returns the signed header.

    `channel` (default: `metadata["kind"]` when given, else `content_type`) names the sequence the
    package takes: the recipient keeps one per sender and channel. The header also carries this
    site's signed audit head (`audit.signed_head`) for the recipient to witness."""
    src, out = Path(src), Path(out)
    if kem not in KEMS:
        raise SealError(f"unknown KEM suite {kem!r}; choose one of {', '.join(KEMS)}")
    if not src.exists():
        raise SealError(f"nothing to seal: {src} does not exist")
    if not (src.is_file() or src.is_dir()):
        raise SealError(f"cannot seal {src}: only a regular file or a folder can be sealed")
    try:
        safe_name(src.name, "name of what is sealed")
    except UnsafeName as error:
        raise SealError(str(error)) from None
    if recipient == sender.site:
        raise SealError(f"{sender.site} cannot seal a package for itself")
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise SealError("chunk_size must be between 1 KiB and 16 MiB")
    limits = keys.settings()
    if expires_in > limits.max_package_lifetime:
        raise SealError(f"expires_in {expires_in} exceeds the package lifetime limit of "
                        f"{limits.max_package_lifetime_days:g} days (conf/trust.yaml)")
    metadata = dict(metadata or {})
    if channel is None:
        kind = metadata.get("kind")
        channel = kind if isinstance(kind, str) and SAFE_NAME.match(kind) else content_type
    try:
        record = keys.trusted_record(sender, recipient)
    except keys.TrustError as error:
        raise SealError(str(error)) from None
    if record["kem_key_id"] in keys.revoked(sender):
        raise SealError(f"the key {record['kem_key_id']} of {recipient!r} is revoked at {sender.site!r}")
    signer = keys.signing_key(sender)

    created = keys.now()
    header: dict[str, Any] = {
        "format": envelope.FORMAT, "package_id": uuid.uuid4().hex, "sender": sender.site, "recipient": recipient,
        "sequence": 1, "channel": channel, "created": keys.iso(created), "expires": keys.iso(created + expires_in),
        "content_type": content_type, "purpose": purpose, "name": src.name,
        "layout": "tar" if src.is_dir() else "file", "chunk_size": chunk_size,
        "content_size": 0, "chunks": 1, "content_digest": "blake3:" + "0" * 64,
        "kem_suite": kem, "recipient_kem_key_id": record["kem_key_id"],
        "sender_key_id": keys.signing_key_id(sender), "metadata": metadata,
        "audit_head": audit.signed_head(sender), "wrapped_key": "",
    }
    if problem := envelope.header_problem(header):
        raise SealError(f"cannot seal as asked: {problem}")
    try:
        envelope.canonical(header)
    except ValueError as error:
        raise SealError(f"metadata is not plain JSON: {error}") from None
    with update_json(_state_file(sender), _empty_state()) as state:
        key = _channel(recipient, header)
        header["sequence"] = state["sent"][key] = state["sent"].get(key, 0) + 1
    content_key = AESGCM.generate_key(256)
    header["wrapped_key"] = envelope.wrap_key(content_key, header, record)
    reserved = envelope.reserve(header)
    with atomic_path(out, 0o600) as tmp, tmp.open("r+b") as handle:
        handle.seek(reserved)
        sealer = _Sealer(handle, content_key, header["package_id"], chunk_size)
        if src.is_dir():
            with tarfile.open(fileobj=sealer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                _add_tree(tar, src)
        else:
            with src.open("rb") as source:
                _copy(source, sealer, chunk_size)
        sealer.finish()
        header.update(content_size=sealer.size, chunks=sealer.chunks,
                      content_digest="blake3:" + sealer.digest.hexdigest())
        handle.seek(0)
        handle.write(envelope.signed(header, reserved, signer))
    audit.append(
        sender, action="package.sealed", actor=actor or f"svc-{sender.site}", object=header["package_id"],
        outcome="success",
        details={k: header[k] for k in ("recipient", "sequence", "channel", "purpose", "content_type",
                                         "content_digest", "content_size", "kem_suite", "expires")}
        | {"file": str(out), "audit_seq": header["audit_head"]["seq"]},
    )
    return header


# ---------------------------------------------------------------- verify / open


def _reject(recipient: SitePaths, package: Path, error: PackageRejected, header: dict | None, actor: str | None,
            mode: str) -> None:
    details = {"reason": error.reason, "file": str(package), "mode": mode}
    if header:
        details |= {k: header.get(k) for k in ("sender", "recipient", "sequence", "channel", "content_type",
                                                "purpose")}
    audit.append(recipient, action="package.rejected", actor=actor or f"svc-{recipient.site}",
                 object=(header or {}).get("package_id", package.name), outcome="rejected", details=details)


def _open_file(package: Path) -> BinaryIO:
    try:
        return package.open("rb")
    except OSError as error:
        raise PackageRejected(f"cannot read package {package}: {error.strerror}") from None


def read_signed_header(recipient: SitePaths, package: Path) -> dict:
    """The package's header, its signature verified, without decrypting or replay checks (for audits
    of what crossed a border, including packages already opened). PackageRejected otherwise."""
    with _open_file(Path(package)) as handle:
        return envelope.read(recipient, handle)[0]


def verify_package(recipient: SitePaths, package: Path, *, actor: str | None = None) -> dict:
    """Check everything `open_package` checks but the audit head, writing no plaintext and consuming nothing."""
    package = Path(package)
    header = None
    try:
        with _open_file(package) as handle:
            header, offset = envelope.read(recipient, handle)
            _check_fresh(_saved_state(recipient), recipient.site, header)
            _content(recipient, handle, header, offset).drain()
    except PackageRejected as error:
        _reject(recipient, package, error, header, actor, "verify")
        raise
    return header


@contextlib.contextmanager
def _staging(parent: Path) -> Iterator[Path]:
    """A new private folder in `parent`, locked (flock) while in use and removed after, lock held:
    `clean_stale_staging` removes only folders whose lock nobody holds."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=STAGING_PREFIX))
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)


def _witness_head(recipient: SitePaths, header: dict[str, Any]) -> None:
    """Keep the sender's audit head (issue 15 finding 5): an older head than one already witnessed is
    fine (packages can arrive out of order); any other refusal refuses the package."""
    head = header["audit_head"]
    if head.get("site") != header["sender"]:
        raise PackageRejected(f"the audit head in the package is of {str(head.get('site'))[:64]!r}, "
                              f"not of the sender {header['sender']}")
    try:
        audit.witness(recipient, head)
    except audit.StaleHead:
        pass
    except audit.AuditError as error:
        raise PackageRejected(f"the sender's audit head is refused: {error}") from None


def open_package(recipient: SitePaths, package: Path, out_dir: Path, *, actor: str | None = None) -> dict:
    """Verify and decrypt `package` into `out_dir/<name>`; consumes the package. Returns the header
    plus `path` (where the content landed). On any failure nothing under `out_dir` changes; a failure
    that comes from the file is a PackageRejected, audited as `package.rejected`."""
    package, out_dir = Path(package), Path(out_dir)
    header = None
    staging_parent = out_dir if out_dir.is_dir() else next(p for p in out_dir.parents if p.is_dir())
    try:
        with _open_file(package) as handle, _staging(staging_parent) as staging:
            header, offset = envelope.read(recipient, handle)
            target = out_dir / header["name"]
            if target.exists() or target.is_symlink():
                raise FileExistsError(f"{target} already exists; open into another folder")
            _check_fresh(_saved_state(recipient), recipient.site, header)
            content = _content(recipient, handle, header, offset)
            staged = staging / header["name"]
            if header["layout"] == "file":
                _write_file(content, staged, header["chunk_size"])
            else:
                _extract(content, staged, header)
            if header["content_type"] == "model":
                _check_model_signature(recipient, header, staged)
            _witness_head(recipient, header)
            with update_json(_state_file(recipient), _empty_state()) as state:
                _check_fresh(state, recipient.site, header)
                out_dir.mkdir(parents=True, exist_ok=True)
                os.rename(staged, target)
                _record_opened(state, header)
    except PackageRejected as error:
        _reject(recipient, package, error, header, actor, "open")
        raise
    audit.append(
        recipient, action="package.opened", actor=actor or f"svc-{recipient.site}", object=header["package_id"],
        outcome="success",
        details={k: header[k] for k in ("sender", "sequence", "channel", "purpose", "content_type",
                                         "content_digest", "content_size")} | {"path": str(target)},
    )
    return header | {"path": str(target)}


def _write_file(content: _Opener, staged: Path, chunk_size: int) -> None:
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb", closefd=False) as sink:
            _copy(content, sink, chunk_size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_model_signature(recipient: SitePaths, header: dict, staged: Path) -> None:
    from pipelines.trust import signing

    try:
        signer = keys.peer(recipient, header["metadata"].get("model_signer", header["sender"]))
    except keys.TrustError as error:
        raise PackageRejected(f"model signer refused: {error}") from None
    try:
        signing.verify_model_dir(staged, paths=recipient, signer_site=signer)
    except signing.SignatureError as error:
        raise PackageRejected(f"model signature does not verify: {error}") from None


# ---------------------------------------------------------------- leftovers of killed processes

_ATOMIC_TMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # pipelines.fileio.atomic_path's temp files


def _unlocked(folder: Path) -> bool:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also releases the lock


def clean_stale_staging(paths: SitePaths, *, min_age: float = 10.0, tmp_age: float = 3600.0) -> list[Path]:
    """Remove what killed processes left in the site's `state/` and `inbox/` folders (three levels
    deep): `.opening-*` staging folders (decrypted content) whose lock nobody holds and that are at
    least `min_age` seconds old, and `atomic_path` temp files older than `tmp_age` seconds. Call it
    when a step starts at the site. Records an audit entry when it removed anything; returns what."""
    removed: list[Path] = []
    now = time.time()
    for top in (paths.state_dir, paths.inbox):
        if not top.is_dir():
            continue
        for folder, subfolders, files in os.walk(top):
            depth = len(Path(folder).relative_to(top).parts)
            for name in list(subfolders):
                path = Path(folder) / name
                if name.startswith(STAGING_PREFIX) or depth >= 2:
                    subfolders.remove(name)
                if not name.startswith(STAGING_PREFIX):
                    continue
                try:
                    info = path.lstat()
                except FileNotFoundError:  # its owner just removed it
                    continue
                if stat.S_ISDIR(info.st_mode) and now - info.st_mtime >= min_age and _unlocked(path):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
            for name in files:
                path = Path(folder) / name
                if _ATOMIC_TMP.match(name):
                    with contextlib.suppress(FileNotFoundError):
                        info = path.lstat()
                        if stat.S_ISREG(info.st_mode) and now - info.st_mtime >= tmp_age:
                            path.unlink()
                            removed.append(path)
    if removed:
        audit.append(paths, action="staging.cleaned", actor=f"svc-{paths.site}", object=paths.site,
                     outcome="success", details={"count": len(removed), "removed": [str(p) for p in removed[:20]]})
    return removed
