"""`factory inbox serve`: a site's inbox service, HTTPS with mutual TLS 1.3 (stdlib `http.server`).

One request per connection, one thread per connection, at most `max_connections` at a time. A
connection is admitted only from `partner_cidrs` (when configured); the TLS handshake then requires
a client certificate pinned to a partner's current key (`tls.server_context`) and `tls.peer_site`
names the partner. Only then is a request read:

    POST /packages   body: one sealed package (Content-Length required)
      201 {"status": "stored", ...}        stored in inbox/, audited, asset event posted
      200 {"status": "already have", ...}  the same package id was stored before (idempotent)
      4xx {"error": reason}                refused, nothing kept (see `receipt.receive`)
    GET /health      200 {"site": ..., "peer": ...}

The size limit and the peer are checked from the headers, before the body is read: a client that
sends `Expect: 100-continue` (the factory's own pusher does) learns a refusal without sending the
body. The body is streamed to a temporary file in the inbox folder, never held in memory.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pipelines.carrier import events, tls
from pipelines.carrier.receipt import STORED, Refused, receive, staging_file
from pipelines.carrier.settings import carrier_settings
from pipelines.config import Carrier
from pipelines.workspace import SitePaths

log = logging.getLogger("factory.carrier")
READ_CHUNK = 1 << 20
EVENT_RETRY_SECONDS = 30.0


class _Handler(BaseHTTPRequestHandler):
    server: InboxServer
    protocol_version = "HTTP/1.1"
    server_version, sys_version = "factory-inbox", ""
    peer: str | None = None
    refusal: str | None = None

    # -- connection: TLS handshake and peer identity, in this connection's thread

    def setup(self) -> None:
        self.request.settimeout(self.server.settings.timeout_seconds)
        self.request = self.server.tls_context().wrap_socket(self.request, server_side=True)
        try:
            self.peer = tls.peer_site(self.server.paths, self.request.getpeercert(binary_form=True))
        except tls.PeerRefused as error:
            self.refusal = str(error)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s inbox: %s %s", self.server.paths.site, self.peer or self.client_address[0], format % args)

    # -- answers

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = (json.dumps(body) + "\n").encode()
        self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _precheck(self) -> tuple[int, str] | None:
        """A refusal decided from the connection and headers alone (before any body byte is read)."""
        if self.refusal:
            return 403, self.refusal
        if self.path != "/packages":
            return 404, f"no such resource {self.path[:80]!r}; packages go to POST /packages"
        if self.headers.get("Transfer-Encoding"):
            return 411, "send the package with a Content-Length, not a transfer encoding"
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return 411, "a Content-Length header is required"
        if length < 0:
            return 400, "Content-Length is negative"
        if length > self.server.settings.max_package_bytes:
            return 413, (f"package is {length} bytes, more than the {self.server.settings.max_package_bytes} "
                         f"{self.server.paths.site} accepts")
        return None

    def handle_expect_100(self) -> bool:
        if self.command == "POST" and (refusal := self._precheck()):
            self._answer(*refusal)
            return False
        return super().handle_expect_100()

    def do_GET(self) -> None:
        if self.refusal:
            self._answer(403, {"error": self.refusal})
        elif self.path == "/health":
            self._answer(200, {"site": self.server.paths.site, "peer": self.peer})
        else:
            self._answer(404, {"error": f"no such resource {self.path[:80]!r}"})

    def do_POST(self) -> None:
        if refusal := self._precheck():
            self._answer(refusal[0], {"error": refusal[1]})
            return
        length = int(self.headers["Content-Length"])
        temp = staging_file(self.server.paths)
        try:
            with temp.open("xb") as sink:
                left = length
                while left:
                    chunk = self.rfile.read(min(READ_CHUNK, left))
                    if not chunk:
                        raise ConnectionError(f"the client sent {length - left} of {length} bytes")
                    sink.write(chunk)
                    left -= len(chunk)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        try:
            receipt = receive(self.server.paths, temp, peer=self.peer, transport="https",
                              settings=self.server.settings)
        except Refused as refused:
            self._answer(refused.status, {"error": refused.reason})
            return
        except Exception as error:  # a fault here, not the package's: the sender retries later
            log.exception("%s inbox: receiving from %s failed", self.server.paths.site, self.peer)
            self._answer(503, {"error": f"{self.server.paths.site} could not store the package: "
                                        f"{type(error).__name__}"})
            return
        self._answer(201 if receipt.status == STORED else 200, receipt.to_dict())


class InboxServer(ThreadingHTTPServer):
    """The inbox service of one site. `serve_forever()` runs it; `shutdown()` stops it."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, paths: SitePaths, host: str, port: int, settings: Carrier | None = None):
        self.paths = paths
        self.settings = settings or carrier_settings(paths.site)
        self.networks = [ipaddress.ip_network(cidr) for cidr in self.settings.partner_cidrs]
        self.slots = threading.BoundedSemaphore(self.settings.max_connections)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        tls.server_context(paths)  # fail at start, not at the first partner, when keys are unusable
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"https://{f'[{host}]' if ':' in host else host}:{port}"

    def tls_context(self) -> ssl.SSLContext:
        return tls.server_context(self.paths)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.networks and not any(ipaddress.ip_address(client_address[0]) in net for net in self.networks):
            log.warning("%s inbox: connection from %s refused (not in partner_cidrs)", self.paths.site,
                        client_address[0])
            return False
        if not self.slots.acquire(blocking=False):
            log.warning("%s inbox: connection from %s refused (%d connections open)", self.paths.site,
                        client_address[0], self.settings.max_connections)
            return False
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        error = sys.exc_info()[1]
        if isinstance(error, (ssl.SSLError, ConnectionError, TimeoutError)):
            log.warning("%s inbox: connection from %s dropped: %s", self.paths.site, client_address[0], error)
        else:
            log.exception("%s inbox: connection from %s failed", self.paths.site, client_address[0])


def serve(paths: SitePaths, host: str | None = None, port: int | None = None,
          settings: Carrier | None = None, ready: Any = None) -> None:
    """Run the inbox service until interrupted; kept asset events are retried in the background.
    `ready(server)` is called once it listens."""
    settings = settings or carrier_settings(paths.site)
    server = InboxServer(paths, host or settings.listen_host, settings.listen_port if port is None else port,
                         settings)
    stop = threading.Event()

    def retry_events() -> None:
        while not stop.wait(EVENT_RETRY_SECONDS):
            try:
                events.flush_events(paths, settings)
            except Exception:
                log.exception("%s inbox: retrying asset events failed", paths.site)

    threading.Thread(target=retry_events, daemon=True, name=f"inbox-events-{paths.site}").start()
    if ready:
        ready(server)
    try:
        server.serve_forever()
    finally:
        stop.set()
        server.server_close()
