"""Policy engines: embedded regorus (default) and an OPA server (when FACTORY_OPA_URL is set).

Both answer one question, "what is `data.factory.<gate>.decision` for this input?",
and both fail closed: whatever goes wrong (engine error, unknown gate, unreachable
server, HTTP error, timeout, malformed answer) becomes a denial whose reason says so.

OPA server: policies are **bundled**, not pushed. The server serves the same
`policies/` folder the embedded engine reads (`opa run --server policies/` here, the
folder or a bundle built from it in a deployment), so policies change only through
a deployment, never through a client at run time. The decision's `bundle_digest` is
the digest of that folder. Settings: FACTORY_OPA_URL (e.g. http://opa:8181),
FACTORY_OPA_TIMEOUT (seconds, default 2), FACTORY_OPA_TOKEN (bearer token, optional).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Protocol
from urllib.parse import urlsplit

from pipelines.policy.bundle import Bundle


class EngineFailure(RuntimeError):
    """The engine gave no usable decision; the message is the denial reason."""


class Engine(Protocol):
    name: str

    def decide(self, gate: str, input_json: str, input_value: Any) -> dict[str, Any]: ...


def first_line(error: BaseException) -> str:
    """An engine error without the Rust backtrace regorus appends."""
    text = str(error).split("Stack backtrace:")[0].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    errors = [line for line in lines if line.startswith("error:")]
    where = next((line for line in lines if line.startswith("-->")), "")
    return " ".join(filter(None, [errors[0] if errors else lines[0], where]))


def check_decision(value: Any, where: str) -> dict[str, Any]:
    """The decision document, or EngineFailure when it has not the contract's shape."""
    if value is None:
        raise EngineFailure(f"{where} returned no decision (policy not loaded?)")
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("allow"), bool)
        or not isinstance(value.get("reasons"), list)
        or not all(isinstance(reason, str) for reason in value["reasons"])
    ):
        raise EngineFailure(f"{where} returned a malformed decision: {str(value)[:200]}")
    return dict(value)


class RegorusEngine:
    """The embedded Rust interpreter. An Engine is bound to its thread, so each thread gets its own."""

    name = "regorus"

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self._local = threading.local()

    def engine(self):
        engine = getattr(self._local, "engine", None)
        if engine is None:
            engine = self._local.engine = new_regorus(self.bundle)
        return engine

    def decide(self, gate: str, input_json: str, input_value: Any) -> dict[str, Any]:
        engine = self.engine()
        try:
            engine.set_input_json(input_json)
            value = engine.eval_rule(f"data.factory.{gate}.decision")
        except Exception as error:  # regorus raises RuntimeError; fail closed on anything
            raise EngineFailure(f"policy engine error in gate {gate}: {first_line(error)}") from error
        return check_decision(value, f"gate {gate}")


def new_regorus(bundle: Bundle, *, tests: bool = False, coverage: bool = False):
    """A regorus Engine loaded with the bundle's policies and data (and its tests when asked)."""
    import regorus

    engine = regorus.Engine()
    if coverage:
        engine.set_enable_coverage(True)
    for path, text in bundle.modules + (bundle.tests if tests else ()):
        engine.add_policy(path, text)
    engine.add_data_json(json.dumps(bundle.data))  # add_data(dict) turns Python booleans into numbers
    return engine


class OpaServerEngine:
    """An OPA server's Data API through opa-python-client (one client per thread)."""

    name = "opa"

    def __init__(self, url: str, *, timeout: float | None = None, token: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EngineFailure(f"FACTORY_OPA_URL {url!r} is not an http(s)://host:port URL")
        self.url = url
        self.host = parts.hostname
        self.ssl = parts.scheme == "https"
        self.port = parts.port or (443 if self.ssl else 8181)
        self.timeout = timeout if timeout is not None else float(os.environ.get("FACTORY_OPA_TIMEOUT", "2"))
        self.token = token if token is not None else os.environ.get("FACTORY_OPA_TOKEN") or None
        self._local = threading.local()

    def client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            from opa_client import OpaClient

            # retries=0: a gate must answer within the timeout; the caller decides whether to retry.
            client = self._local.client = OpaClient(
                host=self.host, port=self.port, ssl=self.ssl, token=self.token, timeout=self.timeout, retries=0
            )
        return client

    def decide(self, gate: str, input_json: str, input_value: Any) -> dict[str, Any]:
        import requests

        where = f"OPA server {self.url}"
        try:
            answer = self.client().query_rule(input_value, f"factory.{gate}", "decision")
        except requests.exceptions.Timeout:
            raise EngineFailure(f"{where} did not answer within {self.timeout:g} s (fail closed)") from None
        except requests.exceptions.ConnectionError as error:
            raise EngineFailure(f"{where} is unreachable (fail closed): {type(error).__name__}") from None
        except requests.exceptions.HTTPError as error:
            status = error.response.status_code if error.response is not None else "?"
            body = error.response.text[:200].strip() if error.response is not None else ""
            raise EngineFailure(f"{where} answered HTTP {status} (fail closed): {body}") from None
        except ValueError as error:  # the body is not JSON
            raise EngineFailure(f"{where} sent a malformed answer (fail closed): {error}") from None
        except Exception as error:
            raise EngineFailure(f"{where} failed (fail closed): {type(error).__name__}: {error}") from None
        if not isinstance(answer, dict):
            raise EngineFailure(f"{where} sent a malformed answer (fail closed): {str(answer)[:200]}")
        if "result" not in answer:
            raise EngineFailure(f"{where} has no decision for gate {gate} (fail closed; policy not loaded?)")
        try:
            return check_decision(answer["result"], where)
        except EngineFailure as error:
            raise EngineFailure(f"{error} (fail closed)") from None
