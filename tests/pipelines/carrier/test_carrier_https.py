"""The https carrier: outbox -> push over mutual TLS -> inbox service -> receipt, with real keys,
real sealed packages and real TLS on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pipelines.carrier import outbox, push, tls
from pipelines.carrier.receipt import receipts_file
from pipelines.cli import main
from pipelines.trust import audit, keys, packages, rotation
from pipelines.workspace import SitePaths

from .conftest import inbox_files, running_inbox


def _actions(paths: SitePaths, action: str) -> list[dict]:
    return [entry for entry in audit.entries(paths) if entry["action"] == action]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- delivery


def test_push_delivers_and_the_recipient_stores_once(supplier, origin, inbox_at, queued, tmp_path):
    header, record = queued(supplier, "origin")
    assert record["state"] == "pending" and (supplier.outbox / record["file"]).is_file()
    with inbox_at(origin):
        [result] = push.push_pending(supplier)
    assert result["state"] == "delivered" and result["via"] == "https" and result["attempts"] == 1
    stored = f"supplier-shared-{header['package_id']}.sfp"
    assert inbox_files(origin) == [stored]
    assert (origin.inbox / stored).read_bytes() == (supplier.outbox / record["file"]).read_bytes()
    [received] = _actions(origin, "package.received")
    assert received["object"] == header["package_id"] and received["details"]["transport"] == "https"
    assert received["actor"] == "carrier-https:supplier"
    assert [e["object"] for e in _actions(supplier, "package.delivered")] == [header["package_id"]]
    opened = packages.open_package(origin, origin.inbox / stored, tmp_path / "opened")  # intact and openable
    assert opened["package_id"] == header["package_id"]


def test_resend_after_a_lost_acknowledgement_keeps_one_copy(supplier, origin, inbox_at, queued):
    header, record = queued(supplier, "origin")
    with inbox_at(origin) as server:
        # the push reached the inbox but the sender crashed before recording the answer
        first = push.send(supplier, supplier.outbox / record["file"], "origin", server.url)
        assert first.status == 201 and first.body["status"] == "stored"
        assert outbox.pending(supplier)[0]["package_id"] == header["package_id"]
        [result] = push.push_pending(supplier)
        again = push.send(supplier, supplier.outbox / record["file"], "origin", server.url)
    assert result["state"] == "delivered"
    assert again.status == 200 and again.body["status"] == "already have"
    assert inbox_files(origin) == [f"supplier-shared-{header['package_id']}.sfp"]
    assert len(_actions(origin, "package.received")) == 1
    assert list(json.loads(receipts_file(origin).read_text())) == [header["package_id"]]


# ---------------------------------------------------------------- refusals leave nothing behind


def _refused(paths: SitePaths, answer: push.Answer, status: int, reason: str) -> None:
    assert answer.status == status, answer
    assert reason in answer.body["error"]
    assert inbox_files(paths) == []  # no package, no temporary file
    assert _actions(paths, "package.received") == []
    assert _actions(paths, "package.refused")[-1]["details"]["status"] == status


def test_package_for_another_recipient_is_refused(supplier, origin, inbox_at, queued):
    _, record = queued(supplier, "destination")
    with inbox_at(origin) as server:
        answer = push.send(supplier, supplier.outbox / record["file"], "origin", server.url)
    _refused(origin, answer, 422, "sealed for destination, not origin")


def test_package_whose_sender_is_not_the_tls_peer_is_refused(supplier, origin, destination, inbox_at, queued):
    _, record = queued(destination, "origin")  # destination's package, pushed by supplier
    with inbox_at(origin) as server:
        answer = push.send(supplier, destination.outbox / record["file"], "origin", server.url)
    _refused(origin, answer, 403, "sealed by 'destination' but delivered by supplier")


@pytest.mark.parametrize("where, reason", [("content", "failed authentication"),
                                           ("header", "signature does not verify")])
def test_tampered_package_is_refused_and_the_sender_sees_why(supplier, origin, inbox_at, queued, where, reason):
    _, record = queued(supplier, "origin")
    package = supplier.outbox / record["file"]
    data = bytearray(package.read_bytes())
    data[-10 if where == "content" else 200] ^= 0x01
    package.write_bytes(bytes(data))
    with inbox_at(origin):
        [result] = push.push_pending(supplier)
    assert result["state"] == "refused" and "HTTP 422" in result["reason"] and reason in result["reason"]
    assert inbox_files(origin) == []
    assert _actions(supplier, "package.delivery_refused")[0]["details"]["reason"] == result["reason"]


def test_too_big_package_is_refused_before_its_body_is_sent(supplier, origin, inbox_at, queued):
    _, record = queued(supplier, "origin", size=64 * 1024)
    with inbox_at(origin, max_package_bytes=10_000):
        [result] = push.push_pending(supplier)
    assert result["state"] == "refused" and "HTTP 413" in result["reason"]
    assert "more than the 10000 origin accepts" in result["reason"]
    assert inbox_files(origin) == []


# ---------------------------------------------------------------- TLS identities


def _stranger_context(tmp_path: Path) -> ssl.SSLContext:
    """A client with a self-signed certificate of a key no site trusts (it accepts any server)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "supplier inbox")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "stranger.pem").write_bytes(
        cert.public_bytes(ser.Encoding.PEM)
        + key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.load_cert_chain(tmp_path / "stranger.pem")
    return context


def _answer_to(context: ssl.SSLContext, server) -> bytes:
    """What the inbox sends back to a client with `context` asking for /health (b"" or a TLS error: nothing)."""
    try:
        with socket.create_connection(server.server_address[:2], timeout=5) as raw, \
                context.wrap_socket(raw) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: inbox\r\n\r\n")
            answer = b""
            while chunk := sock.recv(1024):
                answer += chunk
            return answer
    except (ssl.SSLError, ConnectionError) as error:
        return f"error: {error}".encode()


def _server_logged(caplog, text: str) -> bool:
    """Whether the inbox logged `text` (its connection thread may still be finishing)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any(text in record.getMessage() for record in caplog.records):
            return True
        time.sleep(0.02)
    return False


def test_unknown_client_certificate_gets_nothing(origin, inbox_at, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="factory.carrier")
    with inbox_at(origin) as server:
        answer = _answer_to(_stranger_context(tmp_path), server)  # an alert or a closed connection
        assert _server_logged(caplog, "certificate verify failed")
    assert not answer.startswith(b"HTTP"), answer
    assert inbox_files(origin) == []


def test_client_without_certificate_gets_nothing(origin, inbox_at):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with inbox_at(origin) as server:
        answer = _answer_to(context, server)
    assert not answer.startswith(b"HTTP"), answer


def test_partner_certificate_gets_an_answer(supplier, origin, inbox_at):
    with inbox_at(origin) as server:
        answer = _answer_to(tls.client_context(supplier, "origin"), server)
    assert answer.startswith(b"HTTP/1.1 200") and b'"peer": "supplier"' in answer


def test_tls_certificate_is_the_site_key(supplier, origin):
    cert = x509.load_pem_x509_certificate(tls.ensure_certificate(supplier).read_bytes())
    assert keys.signing_key_id_of(cert.public_key()) == keys.signing_key_id(supplier)
    keys.signing_key(supplier).public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                                                   ec.ECDSA(hashes.SHA256()))
    assert tls.certificate_file(supplier).stat().st_mode & 0o777 == 0o600
    assert tls.certificate_file(supplier).parent.stat().st_mode & 0o777 == 0o700
    assert tls.peer_site(origin, cert.public_bytes(ser.Encoding.DER)) == "supplier"
    with pytest.raises(tls.PeerRefused, match="not a current, unrevoked signing key of destination"):
        tls.peer_site(origin, cert.public_bytes(ser.Encoding.DER), expected="destination")


def test_partner_with_the_wrong_certificate_is_refused_on_both_sides(supplier, origin, queued, monkeypatch,
                                                                     tmp_path):
    """An impostor 'origin' (keys of its own, so it also does not trust our supplier) at origin's URL."""
    elsewhere = tmp_path / "impostor"
    for site in ("supplier", "origin"):
        keys.ensure_site_keys(SitePaths.of(site, elsewhere))
    keys.exchange_trust(elsewhere)
    _, record = queued(supplier, "origin")
    with running_inbox(SitePaths.of("origin", elsewhere)) as impostor:
        monkeypatch.setenv("FACTORY_PARTNER_INBOX_ORIGIN", impostor.url)
        [result] = push.push_pending(supplier)
        # and the impostor, for its part, does not let our supplier in
        with pytest.raises(push.DeliveryError, match="refused or closed the TLS connection"):
            _send_trusting_any_server(supplier, supplier.outbox / record["file"], impostor.url)
    assert result["state"] == "pending" and result["attempts"] == 1
    assert "is not origin" in result["last_error"] and "not signed by a current key of origin" in result["last_error"]
    assert inbox_files(SitePaths.of("origin", elsewhere)) == []


def _send_trusting_any_server(paths: SitePaths, package: Path, url: str) -> None:
    """Our supplier's real client certificate, but accepting whatever server answers."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(tls.ensure_certificate(paths), keys.signing_key_file(paths),
                            password=keys.site_secret(paths))
    host, port = url.removeprefix("https://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw, context.wrap_socket(raw) as sock:
            push._post(sock, f"{host}:{port}", package)
    except (ssl.SSLError, ConnectionError) as error:
        raise push.DeliveryError(f"refused or closed the TLS connection ({error})") from None


def test_revoked_partner_key_is_refused_at_the_next_connection(supplier, origin, inbox_at, queued):
    header, record = queued(supplier, "origin")
    with inbox_at(origin):
        rotation.revoke_key(origin, keys.signing_key_id(supplier), reason="test")
        [result] = push.push_pending(supplier)
    assert result["state"] == "pending" and "may not accept supplier's current key" in result["last_error"]
    assert inbox_files(origin) == []


def test_rotated_key_works_once_the_partner_accepted_it(supplier, origin, inbox_at, queued, tmp_path):
    updates = rotation.rotate_keys(supplier, tmp_path / "updates")
    header, record = queued(supplier, "origin")
    with inbox_at(origin):
        [before] = push.push_pending(supplier)
        assert before["state"] == "pending" and "may not accept supplier's current key" in before["last_error"]
        rotation.accept_key_update(origin, next(p for p in updates if p.name.endswith("-for-origin.json")))
        [after] = push.push_pending(supplier, due_only=False)
    assert after["state"] == "delivered" and after["attempts"] == 2
    assert inbox_files(origin) == [f"supplier-shared-{header['package_id']}.sfp"]


# ---------------------------------------------------------------- unreachable partner, retry state


def test_unreachable_partner_leaves_the_package_pending_then_delivers(supplier, origin, inbox_at, queued,
                                                                      monkeypatch):
    header, record = queued(supplier, "origin")
    monkeypatch.setenv("FACTORY_PARTNER_INBOX_ORIGIN", f"https://127.0.0.1:{_free_port()}")
    [first] = push.push_pending(supplier)
    assert first["state"] == "pending" and first["attempts"] == 1
    assert "cannot reach origin" in first["last_error"]
    assert keys.parse_time(first["next_attempt_at"]) > keys.now()
    assert push.push_pending(supplier) == []  # backing off: not due yet

    listed = CliRunner().invoke(main, ["outbox", "list", "--site", "supplier"])
    assert listed.exit_code == 0, listed.output
    assert "pending (1 attempts, next at" in listed.output and "cannot reach origin" in listed.output

    with inbox_at(origin):
        [second] = push.push_pending(supplier, due_only=False)
    assert second["state"] == "delivered" and second["attempts"] == 2
    assert inbox_files(origin) == [f"supplier-shared-{header['package_id']}.sfp"]
    as_json = json.loads(CliRunner().invoke(main, ["outbox", "list", "--site", "supplier", "--json"]).output)
    assert [(r["package_id"], r["state"], r["via"]) for r in as_json] == [(header["package_id"], "delivered", "https")]


def test_backoff_doubles_up_to_the_limit():
    waits = [outbox.backoff(n, 5, 60).total_seconds() for n in range(1, 7)]
    assert waits == [5, 10, 20, 40, 60, 60]


def test_media_recipient_is_not_pushed(supplier, queued, conf_with):
    conf_with("origin", transport="media")
    _, record = queued(supplier, "origin")
    [result] = push.push_pending(supplier)
    assert result["state"] == "pending" and result["attempts"] == 0


# ---------------------------------------------------------------- a release step's push at once


def test_push_now_delivers_the_package_without_the_pusher(supplier, origin, inbox_at, queued):
    header, record = queued(supplier, "origin")
    with inbox_at(origin):
        pushed = push.push_now(supplier, header["package_id"])
    assert pushed["state"] == "delivered" and pushed["via"] == "https" and pushed["attempts"] == 1
    assert inbox_files(origin) == [f"supplier-shared-{header['package_id']}.sfp"]
    assert push.push_pending(supplier) == []  # nothing left for the pusher
    assert push.push_now(supplier, header["package_id"]) is None  # already delivered: not sent again


def test_push_now_leaves_the_package_to_the_carrier_without_an_inbox_in_the_environment(supplier, queued,
                                                                                       monkeypatch):
    # conf/sites.yaml names an inbox URL for every site, also when one Airflow runs the three sites
    # (embedded): without FACTORY_PARTNER_INBOX_<SITE> a release step sends nothing itself.
    monkeypatch.delenv("FACTORY_PARTNER_INBOX_ORIGIN", raising=False)
    header, record = queued(supplier, "origin")
    assert push.push_now(supplier, header["package_id"]) is None
    [still] = outbox.pending(supplier)
    assert still["attempts"] == 0 and still["last_error"] is None


def test_push_now_keeps_the_order_behind_an_older_pending_package(supplier, origin, inbox_at, queued,
                                                                  monkeypatch):
    monkeypatch.setenv("FACTORY_PARTNER_INBOX_ORIGIN", f"https://127.0.0.1:{_free_port()}")
    older, _ = queued(supplier, "origin")
    [failed] = push.push_pending(supplier)  # origin unreachable: the older one backs off
    assert failed["state"] == "pending" and failed["attempts"] == 1
    newer, _ = queued(supplier, "origin")
    with inbox_at(origin):
        assert push.push_now(supplier, newer["package_id"]) is None  # would overtake the older one
        assert inbox_files(origin) == []
        delivered = push.push_pending(supplier, due_only=False)
    assert [r["package_id"] for r in delivered] == [older["package_id"], newer["package_id"]]


def test_push_now_to_an_unreachable_partner_leaves_it_pending_with_the_reason(supplier, queued, monkeypatch):
    monkeypatch.setenv("FACTORY_PARTNER_INBOX_ORIGIN", f"https://127.0.0.1:{_free_port()}")
    header, _ = queued(supplier, "origin")
    pushed = push.push_now(supplier, header["package_id"])
    assert pushed["state"] == "pending" and pushed["attempts"] == 1 and "cannot reach origin" in pushed["last_error"]
