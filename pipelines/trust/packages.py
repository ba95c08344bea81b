"""Sealed packages (design section 7): what crosses from one site to another.

A package file is the envelope (`pipelines.trust.envelope`: the signed header and the content key
wrapped for the recipient) followed by the content: a file, or a directory as a tar stream, cut
into `chunk_size` plaintext chunks, each sealed with AES-256-GCM under the package's fresh content
key. The chunk index and a final flag are in the nonce and, with the package id, in the associated
data, so reordered, dropped or added chunks fail authentication; the header also carries the exact
size, chunk count and BLAKE3 digest of the content. Memory is a few chunk buffers whatever the size.

Opening checks, in order: the envelope (format, sender trusted and key not revoked, signature,
recipient, expiry), replay (package id consumed) and sequence (must be newer than the last opened
on that channel), key unwrap, exact length, every chunk, the digest; for `content_type="model"`
also the model signature. Plaintext goes to a staging folder beside the output and is moved into
place only when everything verified.
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

from blake3 import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipelines.fileio import atomic_path, read_json, update_json
from pipelines.trust import audit, envelope, keys
from pipelines.trust.envelope import DEFAULT_KEM, KEMS, PackageRejected
from pipelines.workspace import SitePaths

CHUNK_SIZE = 1 << 20
MIN_CHUNK, MAX_CHUNK = 1 << 10, 16 << 20
TAG = 16  # bytes an AES-GCM tag adds to each chunk


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


def _check_fresh(state: dict[str, Any], site: str, header: dict[str, Any]) -> None:
    if header["package_id"] in state.get("consumed", {}):
        raise PackageRejected(f"package {header['package_id']} was already opened at {site} (replay)")
    last = state["received"].get(header["sender"], 0)
    if header["sequence"] <= last:
        raise PackageRejected(
            f"stale sequence number {header['sequence']} on channel {header['sender']}->{site}: "
            f"sequence {last} was already opened"
        )


def _record_opened(state: dict[str, Any], header: dict[str, Any]) -> None:
    state["received"][header["sender"]] = header["sequence"]
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
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise SealError("chunk_size must be between 1 KiB and 16 MiB")
    try:
        record = keys.trusted_record(sender, recipient)
    except keys.TrustError as error:
        raise SealError(str(error)) from None
    if record["kem_key_id"] in keys.revoked(sender):
        raise SealError(f"the key {record['kem_key_id']} of {recipient!r} is revoked at {sender.site!r}")
    signer = keys.signing_key(sender)
    with update_json(_state_file(sender), _empty_state()) as state:
        sequence = state["sent"][recipient] = state["sent"].get(recipient, 0) + 1

    created = keys.now()
    header: dict[str, Any] = {
        "format": envelope.FORMAT, "package_id": uuid.uuid4().hex, "sender": sender.site, "recipient": recipient,
        "sequence": sequence, "created": keys.iso(created), "expires": keys.iso(created + expires_in),
        "content_type": content_type, "purpose": purpose, "name": src.name,
        "layout": "tar" if src.is_dir() else "file", "chunk_size": chunk_size,
        "content_size": 0, "chunks": 0, "content_digest": "blake3:" + "0" * 64,
        "kem_suite": kem, "recipient_kem_key_id": record["kem_key_id"],
        "sender_key_id": keys.signing_key_id(sender), "metadata": metadata or {},
    }
    content_key = AESGCM.generate_key(256)
    header["wrapped_key"] = envelope.wrap_key(content_key, header, record)
    reserved = envelope.reserve(header)
    with atomic_path(out, 0o600) as tmp, tmp.open("r+b") as handle:
        handle.seek(reserved)
        sealer = _Sealer(handle, content_key, header["package_id"], chunk_size)
        if src.is_dir():
            with tarfile.open(fileobj=sealer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for child in sorted(src.iterdir()):
                    tar.add(child, arcname=child.name)
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
        details={k: header[k] for k in ("recipient", "sequence", "purpose", "content_type", "content_digest",
                                         "content_size", "kem_suite", "expires")} | {"file": str(out)},
    )
    return header


# ---------------------------------------------------------------- verify / open


def _reject(recipient: SitePaths, package: Path, error: PackageRejected, header: dict | None, actor: str | None,
            mode: str) -> None:
    details = {"reason": error.reason, "file": str(package), "mode": mode}
    if header:
        details |= {k: header.get(k) for k in ("sender", "recipient", "sequence", "content_type", "purpose")}
    audit.append(recipient, action="package.rejected", actor=actor or f"svc-{recipient.site}",
                 object=(header or {}).get("package_id", package.name), outcome="rejected", details=details)


def _open_file(package: Path) -> BinaryIO:
    try:
        return package.open("rb")
    except OSError as error:
        raise PackageRejected(f"cannot read package {package}: {error.strerror}") from None


def read_signed_header(recipient: SitePaths, package: Path) -> dict:
    """The package's header, its signature verified, without decrypting or replay checks (for audits
    of what crossed a border, including packages already opened)."""
    with Path(package).open("rb") as handle:
        return envelope.read(recipient, handle)[0]


def verify_package(recipient: SitePaths, package: Path, *, actor: str | None = None) -> dict:
    """Check everything `open_package` checks, writing no plaintext and consuming nothing."""
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
        with _open_file(package) as handle, tempfile.TemporaryDirectory(dir=staging_parent,
                                                                        prefix=".opening-") as staging:
            header, offset = envelope.read(recipient, handle)
            target = out_dir / _safe_name(header["name"])
            if target.exists() or target.is_symlink():
                raise FileExistsError(f"{target} already exists; open into another folder")
            _check_fresh(_saved_state(recipient), recipient.site, header)
            content = _content(recipient, handle, header, offset)
            staged = Path(staging) / target.name
            if header["layout"] == "file":
                with staged.open("xb") as sink:
                    _copy(content, sink, header["chunk_size"])
            else:
                _extract(content, staged)
            _fsync_tree(staged)
            if header["content_type"] == "model":
                _check_model_signature(recipient, header, staged)
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
        details={k: header[k] for k in ("sender", "sequence", "purpose", "content_type", "content_digest",
                                         "content_size")} | {"path": str(target)},
    )
    return header | {"path": str(target)}


def _extract(content: _Opener, staged: Path) -> None:
    """Unpack the tar stream (filter 'data': no absolute paths, links or devices that escape)."""
    staged.mkdir()
    try:
        with tarfile.open(fileobj=content, mode="r|") as tar:
            tar.extractall(staged, filter="data")
    except tarfile.TarError as error:
        raise PackageRejected(f"package content is not a valid directory archive: {error}") from None
    content.drain()


def _fsync_tree(path: Path) -> None:
    """Make the opened content durable before the package is recorded as consumed."""
    for item in path.rglob("*") if path.is_dir() else [path]:
        if item.is_file() and not item.is_symlink():
            fd = os.open(item, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _check_model_signature(recipient: SitePaths, header: dict, staged: Path) -> None:
    from pipelines.trust import signing

    signer = header.get("metadata", {}).get("model_signer", header["sender"])
    try:
        signing.verify_model_dir(staged, paths=recipient, signer_site=signer)
    except signing.SignatureError as error:
        raise PackageRejected(f"model signature does not verify: {error}") from None
