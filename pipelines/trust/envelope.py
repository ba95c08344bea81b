"""The envelope of a sealed package: the signed header and the content key wrapped for the recipient.

Layout of the start of a package file (the sealed content chunks follow it)::

    b"FACTPKG1" | u32 header length | header (canonical JSON, space-padded) | u16 sig length | sig (96 bytes)

The header names sender, recipient, package id, per-channel sequence, created/expires, content
type, layout, size, chunk count and BLAKE3 digest of the content, purpose, KEM suite and the
wrapped content key; it is signed with the sender's ECDSA P-256 key. The content key is wrapped
with HPKE (RFC 9180), by default with the hybrid ML-KEM-768 + X25519 KEM (`kem="x25519"` selects
the classical one), its `info` binding package id, sender and recipient.

Size, chunk count and digest are known only after the content is streamed: the sealer reserves
`reserve(header)` bytes first and writes the signed header into them at the end.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ec

from pipelines.trust import keys
from pipelines.workspace import SitePaths

MAGIC = b"FACTPKG1"
FORMAT = 2
SIG_FIELD = 96  # a DER ECDSA P-256 signature is at most 72 bytes
MAX_HEADER = 1 << 20
DEFAULT_KEM = "mlkem768-x25519"
KEMS = {"mlkem768-x25519": hpke.KEM.MLKEM768_X25519, "x25519": hpke.KEM.X25519}
_SLACK = 64  # room for the size, chunk count and digest written after streaming
_START = struct.Struct(">I")  # header length after the magic
_SIG_LEN = struct.Struct(">H")


class PackageRejected(Exception):
    """The package must not be used; `reason` says why in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _suite(kem: str) -> hpke.Suite:
    return hpke.Suite(KEMS[kem], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _info(header: dict[str, Any]) -> bytes:
    return f"factory-package-v{FORMAT}:{header['package_id']}:{header['sender']}:{header['recipient']}".encode()


def _canonical(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------- content key


def wrap_key(content_key: bytes, header: dict[str, Any], record: dict[str, Any]) -> str:
    """The content key sealed to the KEM key in `record` (the recipient's trust record), base64."""
    x_pub, m_pub = keys.kem_public_keys(record)
    public = hpke.MLKEM768X25519PublicKey(m_pub, x_pub) if header["kem_suite"] == "mlkem768-x25519" else x_pub
    return base64.b64encode(_suite(header["kem_suite"]).encrypt(content_key, public, info=_info(header))).decode()


def unwrap_key(recipient: SitePaths, header: dict[str, Any]) -> bytes:
    """The content key, unwrapped with the recipient's private KEM key named in the header."""
    try:
        x_key, m_key = keys.kem_private_keys(recipient, header["recipient_kem_key_id"])
    except keys.TrustError as error:
        raise PackageRejected(str(error)) from None
    if header["kem_suite"] not in KEMS:
        raise PackageRejected(f"unknown KEM suite {header['kem_suite']!r}")
    private = hpke.MLKEM768X25519PrivateKey(m_key, x_key) if header["kem_suite"] == "mlkem768-x25519" else x_key
    try:
        return _suite(header["kem_suite"]).decrypt(base64.b64decode(header["wrapped_key"]), private,
                                                   info=_info(header))
    except Exception:  # InvalidTag or a malformed encapsulation
        raise PackageRejected(f"content key cannot be unwrapped with {recipient.site}'s key") from None


# ---------------------------------------------------------------- signed header


def reserve(header: dict[str, Any]) -> int:
    """Bytes the envelope of `header` takes at the start of the file, once its streamed fields are filled in."""
    return len(MAGIC) + _START.size + len(_canonical(header)) + _SLACK + _SIG_LEN.size + SIG_FIELD


def signed(header: dict[str, Any], reserved: int, signer: ec.EllipticCurvePrivateKey) -> bytes:
    """The envelope bytes of `header`, exactly `reserved` long, signed with the sender's key."""
    region = reserved - len(MAGIC) - _START.size - _SIG_LEN.size - SIG_FIELD
    body = _canonical(header)
    if len(body) > region:
        raise ValueError("the header outgrew the room reserved for it")
    start = MAGIC + _START.pack(region) + body.ljust(region, b" ")
    signature = signer.sign(start, ec.ECDSA(hashes.SHA256()))
    return start + _SIG_LEN.pack(len(signature)) + signature.ljust(SIG_FIELD, b"\0")


def read(recipient: SitePaths, handle: BinaryIO) -> tuple[dict[str, Any], int]:
    """The verified header of the package open in `handle` and the offset where its content starts.

    Checks, in order: magic, sender trusted and its key not revoked, signature, format, recipient,
    expiry. Replay and sequence checks need the recipient's state and are the caller's.
    """
    handle.seek(0)
    start = handle.read(len(MAGIC) + _START.size)
    if len(start) < len(MAGIC) + _START.size or start[: len(MAGIC)] != MAGIC:
        raise PackageRejected("not a sealed package (bad magic or format)")
    (region,) = _START.unpack(start[len(MAGIC):])
    if region > MAX_HEADER:
        raise PackageRejected("header is corrupted (implausible length)")
    rest = handle.read(region + _SIG_LEN.size + SIG_FIELD)
    if len(rest) < region + _SIG_LEN.size + SIG_FIELD:
        raise PackageRejected("package is truncated inside its header")
    try:
        header = json.loads(rest[:region])
        sender, key_id = header["sender"], header["sender_key_id"]
        created = keys.parse_time(header["created"])
    except (ValueError, KeyError, TypeError):
        raise PackageRejected("header is corrupted (modified package)") from None
    (sig_len,) = _SIG_LEN.unpack(rest[region: region + _SIG_LEN.size])
    signature = rest[region + _SIG_LEN.size: region + _SIG_LEN.size + min(sig_len, SIG_FIELD)]
    try:
        public = keys.check_signing_key(recipient, sender, key_id, signed_at=created)
    except keys.TrustError as error:
        raise PackageRejected(str(error)) from None
    try:
        public.verify(signature, start + rest[:region], ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PackageRejected(f"header signature does not verify with {sender!r} key {key_id} (modified package)") from None
    if header.get("format") != FORMAT:
        raise PackageRejected(f"unsupported package format {header.get('format')!r}")
    if header["recipient"] != recipient.site:
        raise PackageRejected(f"package was sealed for {header['recipient']}, not {recipient.site}")
    if keys.now() > keys.parse_time(header["expires"]):
        raise PackageRejected(f"package expired at {header['expires']}")
    return header, len(start) + len(rest)
