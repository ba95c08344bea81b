"""`factory outbox push`: send pending outbox packages to their recipients' inbox services.

Each push is one HTTPS request over mutual TLS 1.3 (`tls.client_context`: this site's certificate
as client certificate, only the recipient's current keys pinned), sent with `Expect: 100-continue`
(h11) so a refusal from the headers alone arrives before the body is sent. The package file is
streamed from the outbox.

Outcomes (`outbox.mark`): 200/201 delivered; another 4xx refused with the recipient's reason;
no connection, a TLS failure on either side, a timeout, 408/429/5xx: still pending, with the
attempt counted, the error kept and the next attempt backed off. A crash between sending and
recording the answer leaves the package pending; the next push sends it again and the recipient,
which keeps one copy per package id, answers "already have".
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11

from pipelines.carrier import outbox, tls
from pipelines.carrier.settings import carrier_settings, inbox_url_env
from pipelines.fileio import file_lock
from pipelines.trust import keys
from pipelines.workspace import SitePaths

PACKAGE_MEDIA_TYPE = "application/vnd.factory.sealed-package"
SEND_CHUNK = 1 << 20
MAX_ANSWER = 64 * 1024


class DeliveryError(Exception):
    """The package did not get through this time (unreachable, TLS refused, connection lost)."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]

    @property
    def reason(self) -> str:
        return str(self.body.get("error") or self.body.get("status") or "no reason given")[:500]


def _next_event(connection: h11.Connection, sock: ssl.SSLSocket) -> Any:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(sock.recv(65536))
            continue
        if isinstance(event, h11.ConnectionClosed):
            raise DeliveryError("the recipient closed the connection without an answer")
        return event


def _post(sock: ssl.SSLSocket, netloc: str, package: Path) -> Answer:
    connection = h11.Connection(our_role=h11.CLIENT)
    size = package.stat().st_size
    sock.sendall(connection.send(h11.Request(method="POST", target="/packages", headers=[
        ("Host", netloc), ("User-Agent", "factory-carrier"), ("Content-Type", PACKAGE_MEDIA_TYPE),
        ("Content-Length", str(size)), ("Expect", "100-continue"), ("Connection", "close")])))
    event = _next_event(connection, sock)
    if isinstance(event, h11.InformationalResponse):  # 100 Continue: the headers passed
        with package.open("rb") as source:
            while chunk := source.read(SEND_CHUNK):
                sock.sendall(connection.send(h11.Data(data=chunk)))
        sock.sendall(connection.send(h11.EndOfMessage()))
        event = _next_event(connection, sock)
        while isinstance(event, h11.InformationalResponse):
            event = _next_event(connection, sock)
    if not isinstance(event, h11.Response):
        raise DeliveryError(f"unexpected answer from the recipient: {type(event).__name__}")
    body = b""
    while not isinstance(chunk := _next_event(connection, sock), h11.EndOfMessage):
        if isinstance(chunk, h11.Data):
            body += chunk.data
            if len(body) > MAX_ANSWER:
                raise DeliveryError("the recipient's answer is too long")
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        parsed = {"error": body[:200].decode(errors="replace")}
    return Answer(event.status_code, parsed if isinstance(parsed, dict) else {"error": str(parsed)[:200]})


def send(paths: SitePaths, package: Path, recipient: str, url: str) -> Answer:
    """Push one package file to `recipient`'s inbox at `url`; DeliveryError when it did not get through."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise DeliveryError(f"the inbox URL of {recipient} ({url[:100]}) is not https://host:port")
    port = parts.port or 443
    settings = carrier_settings(paths.site)
    context = tls.client_context(paths, recipient)
    try:
        raw = socket.create_connection((parts.hostname, port), timeout=settings.timeout_seconds)
    except OSError as error:
        raise DeliveryError(f"cannot reach {recipient} at {url}: {error}") from None
    with raw:
        try:
            sock = context.wrap_socket(raw, server_hostname=parts.hostname)
        except ssl.SSLCertVerificationError as error:
            raise DeliveryError(f"the server at {url} is not {recipient}: its certificate is not signed by a "
                                f"current key of {recipient} in the trust store of {paths.site} "
                                f"({error.verify_message})") from None
        except (ssl.SSLError, OSError) as error:
            raise DeliveryError(f"TLS handshake with {recipient} at {url} failed: {_why(error)}") from None
        with sock:
            try:
                tls.peer_site(paths, sock.getpeercert(binary_form=True), expected=recipient)
            except tls.PeerRefused as error:
                raise DeliveryError(f"the server at {url} is not {recipient}: {error}") from None
            try:
                return _post(sock, parts.netloc, package)
            except (ssl.SSLError, ConnectionError) as error:
                # TLS 1.3: the server checks the client certificate after the client's side of the
                # handshake is done, so its refusal arrives here, as an alert or as a closed connection.
                verdict = "refused" if "ALERT" in _why(error) else "closed"
                raise DeliveryError(f"{recipient} {verdict} the TLS connection without an answer ({_why(error)}): "
                                    f"it may not accept {paths.site}'s current key as a partner certificate") from None
            except (OSError, h11.ProtocolError) as error:
                raise DeliveryError(f"the connection to {recipient} at {url} failed: {error}") from None


def _why(error: Exception) -> str:
    return str(getattr(error, "reason", None) or error or type(error).__name__)


def push_one(paths: SitePaths, record: dict[str, Any]) -> dict[str, Any]:
    """Try to deliver one pending package; returns its updated delivery record."""
    recipient, package_id = record["recipient"], record["package_id"]
    target = carrier_settings(recipient)
    if target.transport == "media":
        return record  # waits for `factory transfer export`
    if not target.inbox_url:
        return outbox.mark(paths, package_id, outbox.PENDING,
                           error=f"no inbox URL for {recipient} (conf sites.yaml carrier.inbox_url or "
                                 f"{inbox_url_env(recipient)})")
    package = paths.outbox / record["file"]
    if not package.is_file():
        return outbox.settle(paths, package_id, outbox.REFUSED,
                             reason=f"{record['file']} is missing from the {paths.site} outbox")
    try:
        answer = send(paths, package, recipient, target.inbox_url)
    except DeliveryError as error:
        return outbox.mark(paths, package_id, outbox.PENDING, error=str(error))
    if answer.status in (200, 201):
        return outbox.settle(paths, package_id, outbox.DELIVERED, via="https")
    if answer.status in (408, 429) or answer.status >= 500:
        return outbox.mark(paths, package_id, outbox.PENDING,
                           error=f"{recipient} answered HTTP {answer.status}: {answer.reason}")
    return outbox.settle(paths, package_id, outbox.REFUSED,
                         reason=f"{recipient} refused it (HTTP {answer.status}): {answer.reason}")


def push_pending(paths: SitePaths, *, due_only: bool = True) -> list[dict[str, Any]]:
    """One pass over the outbox: push every pending package whose next attempt is due (all pending
    ones with `due_only=False`). Pushers of one site take turns (a lock in the outbox)."""
    paths.outbox.mkdir(parents=True, exist_ok=True)
    with file_lock(paths.outbox / ".push.lock"):
        due = outbox.pending(paths, due_at=keys.now() if due_only else None)
        return [push_one(paths, record) for record in due]


def push_now(paths: SitePaths, package_id: str) -> dict[str, Any] | None:
    """Deliver one package at once (a release step, right after sealing, so that it does not wait for the
    pusher's next pass) when the deployment names the recipient's inbox in the environment
    (FACTORY_PARTNER_INBOX_<SITE>: the chart's partners ConfigMap, or `factory up`) and the recipient's
    carrier is https. What this leaves pending, the pusher retries. Returns the delivery record, or None
    when the package is left to the carrier (media, or one Airflow for the three sites)."""
    with file_lock(paths.outbox / ".push.lock"):
        waiting = outbox.pending(paths)
        record = next((r for r in waiting if r["package_id"] == package_id), None)
        if record is None or not os.environ.get(inbox_url_env(record["recipient"])):
            return None
        if carrier_settings(record["recipient"]).transport != "https":
            return None
        if any(r["recipient"] == record["recipient"] for r in waiting[:waiting.index(record)]):
            return None  # an older package to the same site waits (its partner was unreachable): keep the order
        return push_one(paths, record)


def push_loop(paths: SitePaths, interval: float, stop: threading.Event, report: Any = None) -> None:
    """Push due packages every `interval` seconds until `stop` is set; `report(records)` after each pass."""
    while True:
        results = push_pending(paths)
        if report and results:
            report(results)
        if stop.wait(interval):
            return
