"""Policy engines: embedded regorus (default) and an OPA server (when FACTORY_OPA_URL is set).

Both answer one question, "what is `data.factory.<gate>.decision` for this input?",
and both fail closed: whatever goes wrong (engine error, a bundle that does not compile,
unknown gate, unreachable server, HTTP error, timeout, malformed answer) becomes a denial
whose reason says so.

OPA server: policies are **bundled**, not pushed. The server serves a bundle built from
the same `policies/` folder the embedded engine reads, with the folder's digest as its
revision (`opa build -b policies/ --revision $(factory policy digest)`, or a `.manifest`
`{"revision": "<digest>"}`), so policies change only through a deployment, never through
a client at run time. Every query asks for OPA's provenance (`?provenance=true`), and the
bundle revision the server reports comes back with the decision: `evaluate()` records it
and, for a site, refuses a revision other than the site's pin. Settings: FACTORY_OPA_URL
(e.g. http://opa:8181), FACTORY_OPA_TIMEOUT (seconds, default 2), and a bearer token for
a server started with `--authentication=token`: FACTORY_OPA_TOKEN, or FACTORY_OPA_TOKEN_FILE
(a file holding it, re-read when it changes; not both).
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

from pipelines.policy.bundle import Bundle


class EngineFailure(RuntimeError):
    """The engine gave no usable decision; the message is the denial reason."""


class Answer(NamedTuple):
    """An engine's decision document, and the bundle revision the engine reports for it."""

    document: dict[str, Any]
    revision: str | None = None  # OPA's bundle revision(s) from its provenance; None for the embedded engine


class Engine(Protocol):
    name: str

    def decide(self, gate: str, input_json: str, input_value: Any) -> Answer: ...


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
            try:
                engine = new_regorus(self.bundle)
            except Exception as error:  # a module that does not parse or compile: no gate may allow
                raise EngineFailure(
                    f"policy bundle {self.bundle.root} does not load in the engine: {first_line(error)}"
                ) from error
            self._local.engine = engine
        return engine

    def decide(self, gate: str, input_json: str, input_value: Any) -> Answer:
        engine = self.engine()
        try:
            engine.set_input_json(input_json)
            value = engine.eval_rule(f"data.factory.{gate}.decision")
        except Exception as error:  # regorus raises RuntimeError; fail closed on anything
            raise EngineFailure(f"policy engine error in gate {gate}: {first_line(error)}") from error
        return Answer(check_decision(value, f"gate {gate}"))


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


def opa_token(environ: Mapping[str, str]) -> str | None:
    """The bearer token for the OPA server: FACTORY_OPA_TOKEN, or the content of FACTORY_OPA_TOKEN_FILE.

    EngineFailure (a denial) when both are set or the file cannot be read or is empty."""
    token = environ.get("FACTORY_OPA_TOKEN", "").strip()
    file = environ.get("FACTORY_OPA_TOKEN_FILE", "").strip()
    if token and file:
        raise EngineFailure("both FACTORY_OPA_TOKEN and FACTORY_OPA_TOKEN_FILE are set; set one (fail closed)")
    if not file:
        return token or None
    try:
        stat = os.stat(file)
        return _token_file(file, (stat.st_ino, stat.st_size, stat.st_mtime_ns))
    except (OSError, UnicodeDecodeError) as error:
        detail = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise EngineFailure(f"FACTORY_OPA_TOKEN_FILE {file} cannot be read (fail closed): {detail}") from None


@functools.lru_cache(maxsize=4)
def _token_file(file: str, stamp: tuple[int, int, int]) -> str:
    """The token in `file`, read again only when the file changes (`stamp`)."""
    token = Path(file).read_text(encoding="utf-8", errors="strict").strip()
    if not token or any(ord(char) < 0x21 or ord(char) == 0x7F for char in token):
        raise EngineFailure(f"FACTORY_OPA_TOKEN_FILE {file} holds no usable token (empty, or spaces or "
                            "control characters inside; fail closed)")
    return token


def reported_revision(answer: Mapping[str, Any]) -> str | None:
    """The bundle revision an OPA answer's provenance reports (`provenance.bundles.<name>.revision`,
    or the older single `provenance.revision`); several bundles give their sorted revisions joined
    by commas, a bundle without a revision counts as "". None when the answer names no bundle."""
    provenance = answer.get("provenance")
    if not isinstance(provenance, dict):
        return None
    revisions = set()
    bundles = provenance.get("bundles")
    if isinstance(bundles, dict):
        for bundle in bundles.values():
            revision = bundle.get("revision") if isinstance(bundle, dict) else None
            revisions.add(revision if isinstance(revision, str) else "")
    if isinstance(provenance.get("revision"), str):
        revisions.add(provenance["revision"])
    if not revisions:
        return None
    return ",".join(sorted(revisions))[:300]  # a server's text: bounded before it reaches a log


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
        self.token = token if token is not None else opa_token(os.environ)
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

    def decide(self, gate: str, input_json: str, input_value: Any) -> Answer:
        import requests

        where = f"OPA server {self.url}"
        try:
            answer = self.client().query_rule(input_value, f"factory.{gate}", "decision",
                                              query_params={"provenance": "true"})
        except requests.exceptions.Timeout:
            raise EngineFailure(f"{where} did not answer within {self.timeout:g} s (fail closed)") from None
        except requests.exceptions.ConnectionError as error:
            raise EngineFailure(f"{where} is unreachable (fail closed): {type(error).__name__}") from None
        except requests.exceptions.HTTPError as error:
            status = error.response.status_code if error.response is not None else "?"
            body = error.response.text[:200].strip() if error.response is not None else ""
            hint = ""
            if status == 401:
                hint = (" (no token was sent; set FACTORY_OPA_TOKEN or FACTORY_OPA_TOKEN_FILE)" if not self.token
                        else " (the server refused the token of FACTORY_OPA_TOKEN/FACTORY_OPA_TOKEN_FILE)")
            raise EngineFailure(f"{where} answered HTTP {status} (fail closed): {body}{hint}") from None
        except ValueError as error:  # the body is not JSON
            raise EngineFailure(f"{where} sent a malformed answer (fail closed): {error}") from None
        except Exception as error:
            raise EngineFailure(f"{where} failed (fail closed): {type(error).__name__}: {error}") from None
        if not isinstance(answer, dict):
            raise EngineFailure(f"{where} sent a malformed answer (fail closed): {str(answer)[:200]}")
        if "result" not in answer:
            raise EngineFailure(f"{where} has no decision for gate {gate} (fail closed; policy not loaded?)")
        try:
            return Answer(check_decision(answer["result"], where), reported_revision(answer))
        except EngineFailure as error:
            raise EngineFailure(f"{error} (fail closed)") from None
