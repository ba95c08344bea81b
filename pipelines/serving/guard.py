"""What stands in front of the inference routes: client authentication, the request-size limit, and
the limiter that bounds how many security events a caller can make the service audit.

`ServiceGuard` is a plain ASGI middleware, so it acts before FastAPI reads or parses anything:

1. every path except the open ones (`/healthz`) needs `Authorization: Bearer <token>` of an active
   client (`pipelines.serving.clients`); otherwise 401 (503 when the registry cannot be read) and
   the body is never read;
2. the body is read up to `max_body_bytes` and no further: a `Content-Length` above the limit is
   refused at once, and a body without one (chunked) is cut off as soon as the bytes received pass
   the limit; both answer 413 and close the connection, and the app never sees the request;
3. the authenticated client's name goes to the app in `scope["factory.client"]`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pipelines.serving.clients import AuthResult, ClientRegistry

CLIENT_SCOPE_KEY = "factory.client"
ANONYMOUS = "anonymous"  # the identity of every caller when authentication is switched off (--no-auth)

AUTH_MESSAGES = {
    "missing": "missing credential: send 'Authorization: Bearer <token>' with a token issued by "
               "`factory serve token add`",
    "malformed": "the Authorization header is not 'Bearer <token>' with a service token (fsv_...)",
    "unknown": "the token is not known to this service",
    "revoked": "the token of client {client} was revoked",
    "unavailable": "the service cannot check credentials now (client registry unavailable); try later",
}


@dataclass(frozen=True)
class Suppressed:
    """Events of one key left out of the audit log in one window (summarised in one entry instead)."""

    key: str
    count: int
    window_start: str
    window_seconds: float


class AuditLimiter:
    """At most `limit` audited events per key in each fixed window of `window_s` seconds.

    Events over the limit are counted (`suppressed_total`) and reported by `due()` once their window
    has ended, so the caller writes one summary entry instead of one entry per event. Keys must come
    from a bounded set (client names, fixed labels), never from the request."""

    def __init__(self, limit: int, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError(f"audit limiter needs limit >= 1 and window_s > 0, got {limit} and {window_s}")
        self.limit, self.window_s, self._clock = limit, float(window_s), clock
        self._lock = threading.Lock()
        self._windows: dict[str, list] = {}  # key -> [start (clock), start (wall, ISO), audited, suppressed]
        self._pending: list[Suppressed] = []
        self.suppressed_total: dict[str, int] = {}

    @staticmethod
    def _wall() -> str:
        from pipelines.trust.keys import iso, now

        return iso(now())

    def _close(self, key: str, window: list) -> None:
        if window[3]:
            self._pending.append(Suppressed(key, window[3], window[1], self.window_s))
            window[3] = 0

    def admit(self, key: str) -> bool:
        """True when this event of `key` is to be audited; False when it only counts."""
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.window_s:
                if window is not None:
                    self._close(key, window)
                window = self._windows[key] = [now, self._wall(), 0, 0]
            if window[2] < self.limit:
                window[2] += 1
                return True
            window[3] += 1
            self.suppressed_total[key] = self.suppressed_total.get(key, 0) + 1
            return False

    def suppressed_counts(self) -> dict[str, int]:
        """Events left out per key since the start (the metric)."""
        with self._lock:
            return dict(self.suppressed_total)

    def due(self, *, flush_all: bool = False) -> list[Suppressed]:
        """Summaries of windows that ended with suppressed events (all of them with `flush_all`)."""
        now = self._clock()
        with self._lock:
            for key, window in list(self._windows.items()):
                if flush_all or now - window[0] >= self.window_s:
                    self._close(key, window)
                    if now - window[0] >= self.window_s:
                        del self._windows[key]
            pending, self._pending = self._pending, []
        return pending


async def _send_json(send, status: int, content: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


class ServiceGuard:
    """ASGI middleware: authenticate, then limit the body, then call the app (see the module docstring).

    `registry=None` switches authentication off (every caller is `ANONYMOUS`). `on_denied(result,
    scope)` is awaited for each refused credential (metrics, rate-limited audit), `on_too_large()`
    called for each body refused for its size."""

    def __init__(self, app, *, registry: ClientRegistry | None, max_body_bytes: int,
                 on_denied: Callable[[AuthResult, dict], Awaitable[None]] | None = None,
                 on_too_large: Callable[[], None] | None = None,
                 open_paths: frozenset[str] = frozenset({"/healthz"})) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        self.app, self.registry, self.max_body_bytes = app, registry, max_body_bytes
        self.on_denied, self.on_too_large, self.open_paths = on_denied, on_too_large, open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # duplicate names: the last one counts
        if scope["path"] in self.open_paths or self.registry is None:
            scope[CLIENT_SCOPE_KEY] = ANONYMOUS
        else:
            result = self.registry.authenticate(headers.get(b"authorization", b"").decode("latin-1"))
            if not result.ok:
                if self.on_denied is not None:
                    await self.on_denied(result, scope)
                status = 503 if result.reason == "unavailable" else 401
                await _send_json(send, status, {"detail": AUTH_MESSAGES[result.reason].format(client=result.client)},
                                 [(b"www-authenticate", b'Bearer realm="factory-serving", error="invalid_token"')]
                                 if status == 401 else [])
                return
            scope[CLIENT_SCOPE_KEY] = result.client

        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await _send_json(send, 400, {"detail": "Content-Length is not a number"})
                return
            if length > self.max_body_bytes:
                await self._too_large(send, f"request body of {length} bytes")
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self._too_large(send, f"request body of more than {self.max_body_bytes} bytes")
                return
            if not message.get("more_body", False):
                break

        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send, what: str) -> None:
        if self.on_too_large is not None:
            self.on_too_large()
        await _send_json(send, 413, {"detail": f"{what} exceeds the limit of {self.max_body_bytes} bytes"})
