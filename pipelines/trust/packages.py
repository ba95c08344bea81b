"""Sealed packages (design section 7): what crosses from one site to another.

Layout of a package file::

    b"FACTPKG1" | u32 header length | header (canonical JSON, space-padded) | u16 sig length | sig (96 bytes)
    | chunk 0 | chunk 1 | ... | chunk n-1

The content (a file, or a directory streamed as tar) is cut into `chunk_size` plaintext chunks,
each sealed with AES-256-GCM under a fresh per-package content key. The nonce is
`prefix(7) | chunk index (u32) | final flag (1)` and the associated data repeats package id, index
and flag, so reordering, truncation and extension fail authentication (the STREAM construction).
The content key is wrapped for the recipient's current KEM key with HPKE (RFC 9180), by default the
hybrid ML-KEM-768 + X25519 KEM; `kem="x25519"` selects the classical one. The header (format,
sender, recipient, package id, per-channel sequence, created/expires, content type, content size and
BLAKE3 digest, purpose, KEM suite, wrapped key) is signed with the sender's ECDSA P-256 key. Sealing is
one pass: the header region is reserved first and rewritten once size and digest are known.

Opening checks, in order: format, sender trusted and key not revoked, header signature, recipient,
expiry, replay (package id consumed) and sequence (must be newer than the last opened on that
channel), key unwrap, exact length, every chunk, the digest; for `content_type="model"` also the
model signature. Plaintext goes to a staging folder beside the output and is moved into place only
when everything verified. Memory is a few chunk buffers whatever the package size.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import shutil
import struct
import tarfile
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import blake3
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipelines.trust import audit, keys
from pipelines.fileio import file_lock, read_json, write_json
from pipelines.workspace import SitePaths

MAGIC = b"FACTPKG1"
FORMAT = 1
CHUNK_SIZE = 4 << 20
SIG_FIELD = 96  # a DER ECDSA P-256 signature is at most 72 bytes
MAX_HEADER = 1 << 20
DEFAULT_KEM = "mlkem768-x25519"
KEMS = {"mlkem768-x25519": hpke.KEM.MLKEM768_X25519, "x25519": hpke.KEM.X25519}
_SLACK = 64  # header room for the size/digest/chunk counts filled in after streaming
_BUFFERS = 4  # input and output buffers of the streaming pipeline (memory: 2 x 4 x chunk size)
READ_AHEAD = 64 << 20  # how far ahead of the reader the kernel is asked to fetch (page cache, not memory of ours)


class PackageRejected(Exception):
    """The package must not be used; `reason` says why in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SealError(ValueError):
    """A package cannot be sealed as asked (unknown recipient, missing input, ...)."""


def _suite(kem: str) -> hpke.Suite:
    return hpke.Suite(KEMS[kem], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _info(package_id: str, sender: str, recipient: str) -> bytes:
    return f"factory-package-v{FORMAT}:{package_id}:{sender}:{recipient}".encode()


def _nonce_aad(prefix: bytes, package_id: bytes, index: int, final: bool) -> tuple[bytes, bytes]:
    tail = struct.pack(">IB", index, 1 if final else 0)
    return prefix + tail, package_id + tail


def _canonical(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _chunks_for(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size))


# ---------------------------------------------------------------- per-site package state


def _state_file(paths: SitePaths) -> Path:
    return paths.state_dir / "packages" / "channels.json"


def _state(paths: SitePaths) -> dict[str, Any]:
    try:
        return read_json(_state_file(paths))
    except FileNotFoundError:
        return {"sent": {}, "received": {}}


def _consumed_marker(paths: SitePaths, package_id: str) -> Path:
    return paths.state_dir / "packages" / "consumed" / package_id


@contextlib.contextmanager
def _state_lock(paths: SitePaths) -> Iterator[None]:
    with file_lock(paths.state_dir / "packages" / ".lock"):
        yield


def _next_sequence(paths: SitePaths, recipient: str) -> int:
    with _state_lock(paths):
        state = _state(paths)
        sequence = state["sent"].get(recipient, 0) + 1
        state["sent"][recipient] = sequence
        write_json(_state_file(paths), state)
    return sequence


def _check_fresh(paths: SitePaths, header: dict[str, Any]) -> None:
    if _consumed_marker(paths, header["package_id"]).exists():
        raise PackageRejected(f"package {header['package_id']} was already opened at {paths.site} (replay)")
    last = _state(paths)["received"].get(header["sender"], 0)
    if header["sequence"] <= last:
        raise PackageRejected(
            f"stale sequence number {header['sequence']} on channel {header['sender']}->{paths.site}: "
            f"sequence {last} was already opened"
        )


# ---------------------------------------------------------------- streaming


def _read_into(fd: int, view: memoryview) -> int:
    """Fill `view` from `fd` as far as the file allows; returns the bytes read."""
    filled = 0
    while filled < len(view):
        got = os.readv(fd, [view[filled:]])
        if got == 0:
            break
        filled += got
    return filled


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


@functools.cache
def _start_writeback() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2), which the standard library does not wrap; None elsewhere.
    Loaded on the first package write, not at import."""
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE_WRITE = 2


class _StreamWriter:
    """Writes a file sequentially from `offset` and asks the kernel to start writing each piece to
    disk at once (sync_file_range, where the platform has it), so the disk works while the stream
    goes on and the closing fsync finds little left to do. Without it the whole output piles up as
    dirty pages and is flushed only at the end, which on this kind of machine more than doubles
    the time of a large package."""

    def __init__(self, fd: int, offset: int = 0):
        self.fd, self.offset, self.start_writeback = fd, offset, _start_writeback()

    def __call__(self, view: memoryview) -> None:
        _write_all(self.fd, view)
        if self.start_writeback is not None and len(view):
            self.start_writeback(self.fd, self.offset, len(view), _SYNC_FILE_RANGE_WRITE)  # advisory: errors ignored
        self.offset += len(view)


class _ReadAhead:
    """Keeps the kernel fetching the READ_AHEAD bytes after the reader's position (POSIX_FADV_WILLNEED),
    asked for in steps of a quarter of that, where the platform has posix_fadvise."""

    def __init__(self, fd: int):
        self.fd, self.position = fd, os.lseek(fd, 0, os.SEEK_CUR)
        self.asked = self.position
        self.enabled = hasattr(os, "posix_fadvise")
        if self.enabled:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def ahead(self) -> None:
        if self.enabled and self.asked < self.position + READ_AHEAD // 4 * 3:
            end = self.position + READ_AHEAD
            os.posix_fadvise(self.fd, self.asked, end - self.asked, os.POSIX_FADV_WILLNEED)
            self.asked = end


def _pipeline(
    src_fd: int,
    block: int,
    out_size: Callable[[int], int],
    crypt: Callable[[int, bool, memoryview, memoryview], None],
    sink: Callable[[memoryview], None],
    hasher: Any,
    hash_output: bool,
    count: int | None = None,
) -> tuple[int, int]:
    """Stream `src_fd` in `block`-sized pieces through `crypt` (chunk index, final flag, input view,
    output view) into `sink`, hashing the plaintext (the input when sealing, the output when opening).

    Reading, hashing and writing run on one worker thread each (all three release the GIL), so they
    overlap with the AEAD work in the calling thread; the reader asks the kernel to fetch the next
    READ_AHEAD bytes in the background (a plain sequential read keeps too little in flight on a
    virtual disk: 2-3x slower from a cold cache); buffers come from a fixed pool of `_BUFFERS`
    input and output buffers, so memory stays bounded. `count` is the number of chunks when known;
    otherwise the final chunk is the one after which the file ends. Returns (chunks, input bytes).
    """
    fetch = _ReadAhead(src_fd)
    ins = [bytearray(block) for _ in range(_BUFFERS)]
    outs = [bytearray(out_size(block)) for _ in range(_BUFFERS)]
    readers, hashers, writers = (ThreadPoolExecutor(1, thread_name_prefix=f"pkg-{n}") for n in ("read", "hash", "write"))
    reads: dict[int, Future] = {}
    in_busy: list[Future | None] = [None] * _BUFFERS   # hash of the input still using the slot
    out_busy: list[list[Future]] = [[] for _ in range(_BUFFERS)]

    def read(index: int) -> int:
        slot = index % _BUFFERS
        if in_busy[slot] is not None:
            in_busy[slot].result()
        fetch.ahead()
        got = _read_into(src_fd, memoryview(ins[slot]))
        fetch.position += got
        return got

    def submit_read(index: int) -> None:
        if index not in reads and (count is None or index < count):
            reads[index] = readers.submit(read, index)

    index = total = 0
    try:
        for ahead in range(_BUFFERS - 1):
            submit_read(ahead)
        while True:
            got = reads.pop(index).result()
            slot = index % _BUFFERS
            if count is not None:
                final = index == count - 1
            elif got < block:
                final = True
            else:
                final = reads[index + 1].result() == 0  # the file ends exactly at a chunk boundary
            for pending in out_busy[slot]:
                pending.result()
            data = memoryview(ins[slot])[:got]
            out = memoryview(outs[slot])[: out_size(got)]
            crypt(index, final, data, out)
            plain = out if hash_output else data
            hashed = hashers.submit(hasher.update, plain)
            in_busy[slot] = None if hash_output else hashed
            out_busy[slot] = [writers.submit(sink, out), hashed]
            total += got
            index += 1
            if final:
                break
            submit_read(index + _BUFFERS - 2)
        for pending in (f for group in out_busy for f in group):
            pending.result()
        return index, total
    finally:
        for pool in (readers, hashers, writers):
            pool.shutdown(wait=True, cancel_futures=True)


class _Encryptor:
    """Consumes plaintext blocks, emits sealed chunks to `fd`, hashes the plaintext."""

    def __init__(self, fd: int, key: bytes, prefix: bytes, package_id: bytes, chunk_size: int):
        self.aead, self.prefix, self.pid, self.chunk_size = AESGCM(key), prefix, package_id, chunk_size
        self.sink = _StreamWriter(fd, os.lseek(fd, 0, os.SEEK_CUR))
        self.out = bytearray(chunk_size + 16)
        self.hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self.index = self.size = 0
        self.pending = bytearray()  # only used by write() (tar streaming)

    def chunk(self, data: memoryview | bytes, final: bool) -> None:
        self.hasher.update(data)
        nonce, aad = _nonce_aad(self.prefix, self.pid, self.index, final)
        view = memoryview(self.out)[: len(data) + 16]
        self.aead.encrypt_into(nonce, data, aad, view)
        self.sink(view)
        self.index += 1
        self.size += len(data)

    def write(self, data: bytes) -> int:  # file-like, for tarfile
        self.pending += data
        while len(self.pending) > self.chunk_size:  # keep >= 1 byte back: the last chunk must be final
            self.chunk(memoryview(self.pending)[: self.chunk_size], final=False)
            del self.pending[: self.chunk_size]
        return len(data)

    def close_stream(self) -> None:
        self.chunk(memoryview(self.pending), final=True)
        self.pending = bytearray()

    def file(self, src_fd: int) -> None:
        def crypt(index: int, final: bool, data: memoryview, out: memoryview) -> None:
            nonce, aad = _nonce_aad(self.prefix, self.pid, index, final)
            self.aead.encrypt_into(nonce, data, aad, out)

        self.index, self.size = _pipeline(src_fd, self.chunk_size, lambda n: n + 16, crypt, self.sink, self.hasher,
                                          hash_output=False)


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
) -> dict:
    """Seal the file or directory `src` for `recipient` into `out`; returns the signed header."""
    src, out = Path(src), Path(out)
    if kem not in KEMS:
        raise SealError(f"unknown KEM suite {kem!r}; choose one of {', '.join(KEMS)}")
    if not src.exists():
        raise SealError(f"nothing to seal: {src} does not exist")
    if recipient == sender.site:
        raise SealError(f"{sender.site} cannot seal a package for itself")
    if not 1024 <= chunk_size <= 16 << 20:
        raise SealError("chunk_size must be between 1 KiB and 16 MiB")
    try:
        record = keys.trusted_record(sender, recipient)
    except keys.TrustError as error:
        raise SealError(str(error)) from None
    if record["kem_key_id"] in keys.revoked(sender):
        raise SealError(f"the key {record['kem_key_id']} of {recipient!r} is revoked at {sender.site!r}")
    signer = keys.signing_key(sender)
    x_pub, m_pub = keys.kem_public_keys(record)
    public = hpke.MLKEM768X25519PublicKey(m_pub, x_pub) if kem == "mlkem768-x25519" else x_pub

    package_id = uuid.uuid4().hex
    content_key = AESGCM.generate_key(256)
    prefix = os.urandom(7)
    created = keys.now()
    header: dict[str, Any] = {
        "format": FORMAT, "package_id": package_id, "sender": sender.site, "recipient": recipient,
        "sequence": _next_sequence(sender, recipient), "created": keys.iso(created),
        "expires": keys.iso(created + expires_in), "content_type": content_type, "purpose": purpose,
        "name": src.name, "layout": "tar" if src.is_dir() else "file", "chunk_size": chunk_size,
        "content_size": 0, "chunks": 0, "content_digest": "blake3:" + "0" * 64,
        "kem_suite": kem, "recipient_kem_key_id": record["kem_key_id"],
        "sender_key_id": keys.signing_key_id(sender), "nonce_prefix": base64.b64encode(prefix).decode(),
        "wrapped_key": base64.b64encode(
            _suite(kem).encrypt(content_key, public, info=_info(package_id, sender.site, recipient))
        ).decode(),
        "metadata": metadata or {},
    }
    region = len(_canonical(header)) + _SLACK
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".sealing")
    try:
        data_offset = len(MAGIC) + 4 + region + 2 + SIG_FIELD
        os.lseek(fd, data_offset, os.SEEK_SET)
        encryptor = _Encryptor(fd, content_key, prefix, bytes.fromhex(package_id), chunk_size)
        if src.is_dir():
            with tarfile.open(fileobj=encryptor, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for child in sorted(src.iterdir()):
                    tar.add(child, arcname=child.name)
            encryptor.close_stream()
        else:
            src_fd = os.open(src, os.O_RDONLY)
            try:
                encryptor.file(src_fd)
            finally:
                os.close(src_fd)
        header.update(content_size=encryptor.size, chunks=encryptor.index,
                      content_digest="blake3:" + encryptor.hasher.hexdigest())
        body = _canonical(header)
        body += b" " * (region - len(body))
        signed = MAGIC + struct.pack(">I", region) + body
        signature = signer.sign(signed, ec.ECDSA(hashes.SHA256()))
        os.pwrite(fd, signed + struct.pack(">H", len(signature)) + signature.ljust(SIG_FIELD, b"\0"), 0)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, out)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    audit.append(
        sender, action="package.sealed", actor=actor or f"svc-{sender.site}", object=package_id, outcome="success",
        details={k: header[k] for k in ("recipient", "sequence", "purpose", "content_type", "content_digest",
                                         "content_size", "kem_suite", "expires")} | {"file": str(out)},
    )
    return header


# ---------------------------------------------------------------- verify / open


def _read_header(recipient: SitePaths, handle: int) -> tuple[dict[str, Any], int]:
    start = os.pread(handle, len(MAGIC) + 4, 0)
    if len(start) < len(MAGIC) + 4 or start[: len(MAGIC)] != MAGIC:
        raise PackageRejected("not a sealed package (bad magic or format)")
    (region,) = struct.unpack(">I", start[len(MAGIC):])
    if region > MAX_HEADER:
        raise PackageRejected("header is corrupted (implausible length)")
    body = os.pread(handle, region + 2 + SIG_FIELD, len(start))
    if len(body) < region + 2 + SIG_FIELD:
        raise PackageRejected("package is truncated inside its header")
    try:
        header = json.loads(body[:region])
        sender, key_id = header["sender"], header["sender_key_id"]
        created = keys.parse_time(header["created"])
    except (ValueError, KeyError, TypeError):
        raise PackageRejected("header is corrupted (modified package)") from None
    (sig_len,) = struct.unpack(">H", body[region: region + 2])
    signature = body[region + 2: region + 2 + min(sig_len, SIG_FIELD)]
    try:
        public = keys.check_signing_key(recipient, sender, key_id, signed_at=created)
    except keys.TrustError as error:
        raise PackageRejected(str(error)) from None
    try:
        public.verify(signature, start + body[:region], ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PackageRejected(f"header signature does not verify with {sender!r} key {key_id} (modified package)") from None
    if header.get("format") != FORMAT:
        raise PackageRejected(f"unsupported package format {header.get('format')!r}")
    if header["recipient"] != recipient.site:
        raise PackageRejected(f"package was sealed for {header['recipient']}, not {recipient.site}")
    expires = keys.parse_time(header["expires"])
    if keys.now() > expires:
        raise PackageRejected(f"package expired at {header['expires']}")
    return header, len(start) + region + 2 + SIG_FIELD


def _decrypt(recipient: SitePaths, handle: int, header: dict[str, Any], offset: int,
             sink: Callable[[memoryview], None]) -> None:
    """Authenticate and decrypt every chunk, feeding plaintext to `sink`; checks length and digest."""
    chunk_size, size, chunks = header["chunk_size"], header["content_size"], header["chunks"]
    if not (1024 <= chunk_size <= 16 << 20) or chunks != _chunks_for(size, chunk_size):
        raise PackageRejected("header is inconsistent (chunk layout)")
    expected = offset + size + 16 * chunks
    actual = os.fstat(handle).st_size
    if actual < expected:
        raise PackageRejected(f"package is truncated: {actual} of {expected} bytes")
    if actual > expected:
        raise PackageRejected(f"package was extended: {actual - expected} bytes after its final chunk")
    try:
        x_key, m_key = keys.kem_private_keys(recipient, header["recipient_kem_key_id"])
    except keys.TrustError as error:
        raise PackageRejected(str(error)) from None
    private = hpke.MLKEM768X25519PrivateKey(m_key, x_key) if header["kem_suite"] == "mlkem768-x25519" else x_key
    try:
        content_key = _suite(header["kem_suite"]).decrypt(
            base64.b64decode(header["wrapped_key"]), private,
            info=_info(header["package_id"], header["sender"], header["recipient"]),
        )
    except Exception:  # InvalidTag or a malformed encapsulation
        raise PackageRejected(f"content key cannot be unwrapped with {recipient.site}'s key") from None
    aead, prefix, pid = AESGCM(content_key), base64.b64decode(header["nonce_prefix"]), bytes.fromhex(header["package_id"])
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)

    def crypt(index: int, final: bool, block: memoryview, out: memoryview) -> None:
        if len(block) < 16:
            raise PackageRejected(f"package is truncated at chunk {index}")
        nonce, aad = _nonce_aad(prefix, pid, index, final)
        try:
            aead.decrypt_into(nonce, block, aad, out)
        except (InvalidTag, ValueError):
            raise PackageRejected(f"content chunk {index} failed authentication (modified package)") from None

    os.lseek(handle, offset, os.SEEK_SET)
    _pipeline(handle, chunk_size + 16, lambda n: max(n - 16, 0), crypt, sink, hasher, hash_output=True, count=chunks)
    if "blake3:" + hasher.hexdigest() != header["content_digest"]:
        raise PackageRejected("content digest does not match the header")


def _reject(recipient: SitePaths, package: Path, error: PackageRejected, header: dict | None, actor: str | None,
            mode: str) -> None:
    details = {"reason": error.reason, "file": str(package), "mode": mode}
    if header:
        details |= {k: header.get(k) for k in ("sender", "recipient", "sequence", "content_type", "purpose")}
    audit.append(recipient, action="package.rejected", actor=actor or f"svc-{recipient.site}",
                 object=(header or {}).get("package_id", package.name), outcome="rejected", details=details)


def read_signed_header(recipient: SitePaths, package: Path) -> dict:
    """The package's header, its signature verified, without decrypting or replay checks (for audits
    of what crossed a border, including packages already opened)."""
    handle = os.open(package, os.O_RDONLY)
    try:
        return _read_header(recipient, handle)[0]
    finally:
        os.close(handle)


def verify_package(recipient: SitePaths, package: Path, *, actor: str | None = None) -> dict:
    """Check everything `open_package` checks, writing no plaintext and consuming nothing."""
    package = Path(package)
    header = None
    try:
        handle = os.open(package, os.O_RDONLY)
    except OSError as error:
        raise PackageRejected(f"cannot read package {package}: {error.strerror}") from None
    try:
        header, offset = _read_header(recipient, handle)
        _check_fresh(recipient, header)
        _decrypt(recipient, handle, header, offset, lambda view: None)
    except PackageRejected as error:
        _reject(recipient, package, error, header, actor, "verify")
        raise
    finally:
        os.close(handle)
    return header


def _safe_name(name: Any) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name:
        raise PackageRejected(f"package names an unsafe output name {name!r}")
    return name


def open_package(recipient: SitePaths, package: Path, out_dir: Path, *, actor: str | None = None) -> dict:
    """Verify and decrypt `package` into `out_dir/<name>`; consumes the package. Returns the header
    plus `path` (where the content landed). On any failure nothing under `out_dir` changes."""
    package, out_dir = Path(package), Path(out_dir)
    header = None
    staging_parent = out_dir if out_dir.is_dir() else next(p for p in out_dir.parents if p.is_dir())
    try:
        handle = os.open(package, os.O_RDONLY)
    except OSError as error:
        raise PackageRejected(f"cannot read package {package}: {error.strerror}") from None
    staging = Path(tempfile.mkdtemp(dir=staging_parent, prefix=".opening-"))
    try:
        header, offset = _read_header(recipient, handle)
        name = _safe_name(header["name"])
        target = out_dir / name
        if target.exists() or target.is_symlink():
            raise FileExistsError(f"{target} already exists; open into another folder")
        _check_fresh(recipient, header)
        staged = staging / name
        if header["layout"] == "file":
            out_fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                _decrypt(recipient, handle, header, offset, _StreamWriter(out_fd))
                os.fsync(out_fd)
            finally:
                os.close(out_fd)
        else:
            _untar(recipient, handle, header, offset, staged)
        if header["content_type"] == "model":
            _check_model_signature(recipient, header, staged)
        with _state_lock(recipient):
            _check_fresh(recipient, header)
            out_dir.mkdir(parents=True, exist_ok=True)
            os.rename(staged, target)
            _consumed_marker(recipient, header["package_id"]).parent.mkdir(parents=True, exist_ok=True)
            _consumed_marker(recipient, header["package_id"]).write_text(keys.iso(keys.now()) + "\n")
            state = _state(recipient)
            state["received"][header["sender"]] = header["sequence"]
            write_json(_state_file(recipient), state)
    except PackageRejected as error:
        _reject(recipient, package, error, header, actor, "open")
        raise
    finally:
        os.close(handle)
        shutil.rmtree(staging, ignore_errors=True)
    audit.append(
        recipient, action="package.opened", actor=actor or f"svc-{recipient.site}", object=header["package_id"],
        outcome="success",
        details={k: header[k] for k in ("sender", "sequence", "purpose", "content_type", "content_digest",
                                         "content_size")} | {"path": str(target)},
    )
    return header | {"path": str(target)}


def _untar(recipient: SitePaths, handle: int, header: dict, offset: int, staged: Path) -> None:
    """Decrypt into a pipe that a thread extracts (tar 'data' filter: no absolute paths, no escapes)."""
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def extract() -> None:
        try:
            with os.fdopen(read_fd, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                tar.extractall(staged, filter="data")
                stream.read()  # drain tar padding so the writer never blocks
        except BaseException as error:
            failure.append(error)

    staged.mkdir()
    thread = threading.Thread(target=extract, daemon=True)
    thread.start()
    broken = False
    try:
        _decrypt(recipient, handle, header, offset, lambda view: _write_all(write_fd, view))
    except BrokenPipeError:  # the extractor stopped early; it says why
        broken = True
    finally:
        os.close(write_fd)
        thread.join()
    if broken and not failure:
        raise PackageRejected("package content is not a valid directory archive (extraction stopped early)")
    if failure:
        raise PackageRejected(f"package content is not a valid directory archive: {failure[0]}")


def _check_model_signature(recipient: SitePaths, header: dict, staged: Path) -> None:
    from pipelines.trust import signing

    signer = header.get("metadata", {}).get("model_signer", header["sender"])
    try:
        signing.verify_model_dir(staged, paths=recipient, signer_site=signer)
    except signing.SignatureError as error:
        raise PackageRejected(f"model signature does not verify: {error}") from None
