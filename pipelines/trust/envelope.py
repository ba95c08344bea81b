"""The envelope of a sealed package: the signed header and the content key wrapped for the recipient.

Layout of the start of a package file (the sealed content chunks follow it)::

    b"FACTPKG1" | u32 header length | header (canonical JSON, space-padded) | signature (64 bytes)

The signature (ECDSA P-256 over SHA-256, by the sender's key, as the fixed-size r || s) covers
every byte before it: magic, length, header and its padding. There is no unsigned length or
padding byte to play with, and the header must be exactly the canonical JSON of what it parses to,
so every reader sees the same fields.

The header names sender, recipient, package id, sequence on its channel, created/expires, content
type, layout, size, chunk count and BLAKE3 digest of the content, purpose, KEM suite, the wrapped
content key and the sender's signed audit head. The content key is wrapped with HPKE (RFC 9180),
by default with the hybrid ML-KEM-768 + X25519 KEM (`kem="x25519"` selects the classical one), its
`info` binding package id, sender and recipient.

Nothing in a header is used before it is checked: its shape and every field's type first (any
failure is a `PackageRejected`, never another exception), then the sender is looked up among the
configured partners (`keys.peer`) before it selects a key.

Size, chunk count and digest are known only after the content is streamed: the sealer reserves
`reserve(header)` bytes first and writes the signed header into them at the end.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from datetime import datetime
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from pipelines.trust import audit, keys
from pipelines.workspace import SAFE_NAME, SitePaths

MAGIC = b"FACTPKG1"
FORMAT = 3
SIG_SIZE = 64  # r || s of an ECDSA P-256 signature, 32 bytes each
MAX_HEADER = 1 << 20
DEFAULT_KEM = "mlkem768-x25519"
KEMS = {"mlkem768-x25519": hpke.KEM.MLKEM768_X25519, "x25519": hpke.KEM.X25519}
LAYOUTS = ("file", "tar")
_SLACK = 64  # room for the size, chunk count and digest written after streaming
_START = struct.Struct(">I")  # header length after the magic
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_DIGEST = re.compile(r"^blake3:[0-9a-f]{64}$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_TEXT = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")
MAX_WRAPPED_KEY = 4096


class PackageRejected(Exception):
    """The package must not be used; `reason` says why in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _suite(kem: str) -> hpke.Suite:
    return hpke.Suite(KEMS[kem], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _info(header: dict[str, Any]) -> bytes:
    return f"factory-package-v{FORMAT}:{header['package_id']}:{header['sender']}:{header['recipient']}".encode()


def canonical(header: dict[str, Any]) -> bytes:
    """The header's bytes: sorted keys, no spaces, ASCII, no NaN (ValueError for what is not plain JSON)."""
    return json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


# ---------------------------------------------------------------- header fields


def _time(value: Any) -> datetime | None:
    try:
        moment = keys.parse_time(value) if isinstance(value, str) and len(value) <= 40 else None
    except ValueError:
        return None
    return moment if moment is not None and moment.tzinfo is not None else None


def _integer(low: int, high: int):
    return lambda v: type(v) is int and low <= v <= high


_FIELDS = {
    "format": lambda v: v == FORMAT,
    "package_id": lambda v: isinstance(v, str) and bool(_HEX32.match(v)),
    "sender": lambda v: isinstance(v, str),
    "recipient": lambda v: isinstance(v, str),
    "sequence": _integer(1, 2**63 - 1),
    "channel": lambda v: isinstance(v, str) and bool(SAFE_NAME.match(v)),
    "created": lambda v: _time(v) is not None,
    "expires": lambda v: _time(v) is not None,
    "content_type": lambda v: isinstance(v, str) and bool(SAFE_NAME.match(v)),
    "purpose": lambda v: isinstance(v, str) and bool(_TEXT.match(v)),
    "name": lambda v: isinstance(v, str) and bool(SAFE_NAME.match(v)) and ".." not in v,
    "layout": lambda v: v in LAYOUTS,
    "chunk_size": _integer(1, 2**40),
    "content_size": _integer(0, 2**62),
    "chunks": _integer(1, 2**62),
    "content_digest": lambda v: isinstance(v, str) and bool(_DIGEST.match(v)),
    "kem_suite": lambda v: isinstance(v, str) and v in KEMS,
    "recipient_kem_key_id": lambda v: isinstance(v, str) and bool(_HEX16.match(v)),
    "sender_key_id": lambda v: isinstance(v, str) and bool(_HEX16.match(v)),
    "wrapped_key": lambda v: isinstance(v, str) and len(v) <= MAX_WRAPPED_KEY and bool(_BASE64.match(v)),
    "metadata": lambda v: isinstance(v, dict),
    "audit_head": lambda v: isinstance(v, dict),
}


def header_problem(header: Any) -> str | None:
    """What is wrong with the shape of a header (None when every field is there with its type)."""
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    missing, unknown = sorted(set(_FIELDS) - set(header)), sorted(set(header) - set(_FIELDS))
    if missing or unknown:
        return f"fields {missing[:5]} missing, {[k[:40] for k in unknown[:5]]} unexpected"
    for field, valid in _FIELDS.items():
        if not valid(header[field]):
            return f"field {field!r} has an invalid value"
    return None


# ---------------------------------------------------------------- content key


def wrap_key(content_key: bytes, header: dict[str, Any], record: dict[str, Any]) -> str:
    """The content key sealed to the KEM key in `record` (the recipient's trust record), base64."""
    x_pub, m_pub = keys.kem_public_keys(record)
    public = hpke.MLKEM768X25519PublicKey(m_pub, x_pub) if header["kem_suite"] == "mlkem768-x25519" else x_pub
    return base64.b64encode(_suite(header["kem_suite"]).encrypt(content_key, public, info=_info(header))).decode()


def unwrap_key(recipient: SitePaths, header: dict[str, Any]) -> bytes:
    """The content key, unwrapped with the recipient's private KEM key named in the header (a header
    that names no key of the recipient is a rejection; a key the site cannot decrypt is a TrustError)."""
    key_id = header["recipient_kem_key_id"]
    if key_id not in {r["kem_key_id"] for r in keys.keyring(recipient)["generations"]}:
        raise PackageRejected(f"site {recipient.site!r} holds no private key with id {key_id}")
    x_key, m_key = keys.kem_private_keys(recipient, key_id)
    private = hpke.MLKEM768X25519PrivateKey(m_key, x_key) if header["kem_suite"] == "mlkem768-x25519" else x_key
    try:
        return _suite(header["kem_suite"]).decrypt(base64.b64decode(header["wrapped_key"]), private,
                                                   info=_info(header))
    except Exception:  # InvalidTag or a malformed encapsulation
        raise PackageRejected(f"content key cannot be unwrapped with {recipient.site}'s key") from None


# ---------------------------------------------------------------- signed header


def reserve(header: dict[str, Any]) -> int:
    """Bytes the envelope of `header` takes at the start of the file, once its streamed fields are filled in."""
    return len(MAGIC) + _START.size + len(canonical(header)) + _SLACK + SIG_SIZE


def signed(header: dict[str, Any], reserved: int, signer: ec.EllipticCurvePrivateKey) -> bytes:
    """The envelope bytes of `header`, exactly `reserved` long, signed with the sender's key."""
    region = reserved - len(MAGIC) - _START.size - SIG_SIZE
    body = canonical(header)
    if len(body) > region:
        raise ValueError("the header outgrew the room reserved for it")
    start = MAGIC + _START.pack(region) + body.ljust(region, b" ")
    r, s = decode_dss_signature(signer.sign(start, ec.ECDSA(hashes.SHA256())))
    return start + r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _parse(body: bytes) -> dict[str, Any]:
    """The header in `body`, which must be exactly its canonical JSON followed by spaces."""
    try:
        header = audit.loads_strict(body.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise PackageRejected("header is corrupted (not JSON; modified package)") from None
    if not isinstance(header, dict):
        raise PackageRejected("header is corrupted (not a JSON object; modified package)")
    if header.get("format") != FORMAT:
        shown = header.get("format")
        raise PackageRejected(f"unsupported package format {shown if type(shown) is int else '?'}")
    try:
        exact = canonical(header) == body.rstrip(b" ")
    except (ValueError, RecursionError):
        exact = False
    if not exact:
        raise PackageRejected("header is corrupted (not in canonical form; modified package)")
    if problem := header_problem(header):
        raise PackageRejected(f"header is invalid: {problem}")
    return header


def read(recipient: SitePaths, handle: BinaryIO) -> tuple[dict[str, Any], int]:
    """The verified header of the package open in `handle` and the offset where its content starts.

    Checks, in order: magic and length, the header's form and fields, the sender is a configured
    partner trusted here and its key is not revoked or retired, the signature, the recipient, the
    times (created not in the future, lifetime within the limit, not expired). Replay and sequence
    checks need the recipient's state and are the caller's. Raises only PackageRejected for what
    is in the file.
    """
    limits = keys.settings()
    handle.seek(0)
    start = handle.read(len(MAGIC) + _START.size)
    if len(start) < len(MAGIC) + _START.size or start[: len(MAGIC)] != MAGIC:
        raise PackageRejected("not a sealed package (bad magic or format)")
    (region,) = _START.unpack(start[len(MAGIC):])
    if region > MAX_HEADER:
        raise PackageRejected("header is corrupted (implausible length)")
    rest = handle.read(region + SIG_SIZE)
    if len(rest) < region + SIG_SIZE:
        raise PackageRejected("package is truncated inside its header")
    header = _parse(rest[:region])
    sender, key_id, created = header["sender"], header["sender_key_id"], _time(header["created"])
    try:
        sender = keys.peer(recipient, sender)  # a name from the file: looked up, never joined into a path
        public = keys.check_signing_key(recipient, sender, key_id, signed_at=created)
    except keys.TrustError as error:
        raise PackageRejected(str(error)) from None
    signature = rest[region:]
    try:
        public.verify(encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                           int.from_bytes(signature[32:], "big")),
                      start + rest[:region], ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, binascii.Error):
        raise PackageRejected(f"header signature does not verify with {sender!r} key {key_id} (modified package)") from None
    if header["recipient"] != recipient.site:
        raise PackageRejected(f"package was sealed for {header['recipient'][:64]}, not {recipient.site}")
    now, expires = keys.now(), _time(header["expires"])
    if created > now + limits.max_clock_skew:
        raise PackageRejected(f"package claims to be created at {header['created']}, in the future")
    if expires - created > limits.max_package_lifetime:
        raise PackageRejected(f"package lifetime {expires - created} exceeds the limit of "
                              f"{limits.max_package_lifetime_days:g} days")
    if now > expires:
        raise PackageRejected(f"package expired at {header['expires']}")
    return header, len(start) + len(rest)
