"""The clients allowed to call a site's inference service, each with its own bearer token.

A token is `fsv_` followed by 43 URL-safe characters (32 random bytes from `secrets`); it is printed
once by `factory serve token add` and only its SHA-256 is kept, in `state_dir/serving-clients.json`
(mode 0600, written atomically under its lock). SHA-256 and not a slow password hash: a token
carries 256 random bits, so there is nothing to guess from a stolen digest, and the service checks
a token on every request, where a KDF would cost milliseconds. A presented token is hashed and
compared with every stored digest by `hmac.compare_digest`. Revoking keeps the digest, so a revoked
token is told apart from an unknown one; the running service reloads the file when it changes, so a
revocation takes effect at the next request without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.fileio import read_json, update_json
from pipelines.workspace import SitePaths

CLIENT_NAME = re.compile(r"^[a-z][a-z0-9-]{1,31}$")
TOKEN_PREFIX = "fsv_"
TOKEN = re.compile(r"^fsv_[A-Za-z0-9_-]{43}$")
FORMAT = 1


class ClientError(ValueError):
    """A client name, token or the registry file is not acceptable; the message says why."""


def registry_path(paths: SitePaths) -> Path:
    return paths.state_dir / "serving-clients.json"


def check_client_name(name: str) -> str:
    if not isinstance(name, str) or not CLIENT_NAME.fullmatch(name):
        raise ClientError(
            f"client name {name!r} is not allowed: 2-32 characters, lowercase letters, digits and '-', "
            "starting with a letter"
        )
    return name


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def _now() -> str:
    from pipelines.trust.keys import iso, now

    return iso(now())


def _empty() -> dict[str, Any]:
    return {"format": FORMAT, "clients": {}}


def _check_document(document: Any, path: Path) -> dict[str, dict[str, Any]]:
    if not isinstance(document, dict) or document.get("format") != FORMAT or not isinstance(
            document.get("clients"), dict):
        raise ClientError(f"{path} is not a client registry (format {FORMAT})")
    for name, entry in document["clients"].items():
        check_client_name(name)
        if not isinstance(entry, dict) or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256", ""))):
            raise ClientError(f"{path}: the entry of client {name!r} has no valid sha256")
    return document["clients"]


def _check_mode(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ClientError(f"{path} is open to other users (mode {mode:o}); `chmod 600 {path}`")


def add_client(paths: SitePaths, name: str) -> str:
    """Register `name` with a new token and return the token (the only time it is seen)."""
    check_client_name(name)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    path = registry_path(paths)
    with update_json(path, _empty(), mode=0o600) as document:
        clients = _check_document(document, path)
        if name in clients and not clients[name].get("revoked"):
            raise ClientError(
                f"client {name!r} already holds an active token; revoke it first "
                f"(`factory serve token revoke --site {paths.site} --client {name}`)"
            )
        clients[name] = {"sha256": token_digest(token), "created": _now(), "revoked": None}
    return token


def revoke_client(paths: SitePaths, name: str) -> dict[str, Any]:
    """Mark the token of `name` revoked (kept, so its use is reported as revoked); returns the entry."""
    check_client_name(name)
    path = registry_path(paths)
    if not path.is_file():
        raise ClientError(f"site {paths.site} has no serving clients")
    with update_json(path, _empty(), mode=0o600) as document:
        clients = _check_document(document, path)
        if name not in clients:
            raise ClientError(f"site {paths.site} has no serving client {name!r}")
        if clients[name].get("revoked"):
            raise ClientError(f"the token of client {name!r} was already revoked at {clients[name]['revoked']}")
        clients[name]["revoked"] = _now()
        return {"client": name, **clients[name]}


def list_clients(paths: SitePaths) -> list[dict[str, Any]]:
    """Every registered client, `{client, created, revoked}` (never the digest)."""
    path = registry_path(paths)
    if not path.is_file():
        return []
    clients = _check_document(read_json(path), path)
    return [{"client": name, "created": e.get("created"), "revoked": e.get("revoked")}
            for name, e in sorted(clients.items())]


@dataclass(frozen=True)
class AuthResult:
    client: str | None  # the authenticated client, or the owner of a revoked token
    reason: str | None  # None when authenticated; else missing, malformed, unknown, revoked, unavailable

    @property
    def ok(self) -> bool:
        return self.reason is None


class ClientRegistry:
    """The service's read-only view of the registry file, reloaded whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature: tuple | None = None
        self._digests: list[tuple[str, str, bool]] = []  # (client, sha256, revoked)
        self._problem: str | None = None
        self._refresh()

    @classmethod
    def for_site(cls, paths: SitePaths) -> ClientRegistry:
        return cls(registry_path(paths))

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            signature = (st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode)
        except FileNotFoundError:
            signature = None
        with self._lock:
            if signature == self._signature and self._signature is not None:
                return
            try:
                if signature is None:
                    raise ClientError(f"{self.path} does not exist")
                _check_mode(self.path)
                clients = _check_document(read_json(self.path), self.path)
                self._digests = [(name, e["sha256"], bool(e.get("revoked"))) for name, e in clients.items()]
                self._problem = None
            except (ClientError, OSError, ValueError) as exc:  # fail closed: no client is accepted
                self._digests, self._problem = [], str(exc)
            self._signature = signature

    @property
    def problem(self) -> str | None:
        """Why no client can be accepted (registry missing or unreadable), or None."""
        self._refresh()
        return self._problem

    def active(self) -> list[str]:
        self._refresh()
        return sorted(name for name, _, revoked in self._digests if not revoked)

    def authenticate(self, authorization: str | None) -> AuthResult:
        """Check an `Authorization` header value; constant-time against every stored digest."""
        if not authorization:
            return AuthResult(None, "missing")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not TOKEN.fullmatch(token.strip()):
            return AuthResult(None, "malformed")
        self._refresh()
        if self._problem is not None:
            return AuthResult(None, "unavailable")
        presented = token_digest(token.strip())
        found: tuple[str, bool] | None = None
        for name, digest, revoked in self._digests:  # no early exit: every digest is compared
            if hmac.compare_digest(presented, digest):
                found = (name, revoked)
        if found is None:
            return AuthResult(None, "unknown")
        return AuthResult(found[0], "revoked" if found[1] else None)
