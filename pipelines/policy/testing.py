"""Runs the Rego tests (`test_*` rules of every `*_test.rego`) with the embedded engine, with line coverage.

Also what tests and benchmarks of the OPA server path need: the gate inputs the Rego tests
evaluate (`captured_inputs`) and a small OPA Data API server backed by regorus (`serve_data_api`).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import parse_qs

from pipelines.policy.bundle import Bundle, load_bundle
from pipelines.policy.engines import first_line, new_regorus

_PACKAGE = re.compile(r"^package\s+([\w.]+)", re.MULTILINE)
_TEST_RULE = re.compile(r"^(test_\w+)\b", re.MULTILINE)
GATES = ("data_access", "data_release", "model_release", "approval")

# An export of a supplier model trained on supplier and origin data, approved by both officers:
# the allowed model_release input that tests and the latency benchmark start from.
ALLOWED_EXPORT = {
    "model": {
        "id": "digits-cnn-export/3", "site": "supplier", "metrics": {"supplier_test": 0.93},
        "watermark": {"verified": True}, "signature": {"verified": True},
        "robustness": {"evaluated": True, "accuracy": {"clean": 0.93, "fgsm@0.05": 0.84, "fgsm@0.1": 0.61,
                                                      "pgd@0.05": 0.82}},
        "lineage": [
            {"dataset_id": "supplier/train@1", "owner": "supplier", "local_only": False,
             "export_authorized": True, "releasable_to": ["origin", "destination"]},
            {"dataset_id": "origin/export_authorized@1", "owner": "origin", "local_only": False,
             "export_authorized": True, "releasable_to": ["supplier", "destination"]},
        ],
        # the origin's membership-inference audit of these weights, as its signed approval carried it
        "digest": "sha256:" + "3" * 64,
        "membership_audits": [{"owner": "origin", "model_digest": "sha256:" + "3" * 64, "attack": "loss-threshold",
                               "auc": 0.6, "tpr_at_1pct_fpr": 0.05, "advantage": 0.2}],
    },
    "recipient": "destination", "purpose": "export", "requested_by": "supplier_engineer",
    "approvals": [
        {"user": "origin_officer", "site": "origin", "roles": ["compliance_officer"], "decision": "approve"},
        {"user": "supplier_export_officer", "site": "supplier", "roles": ["export_control_officer"],
         "decision": "approve"},
    ],
}


@dataclass(frozen=True)
class RegoTest:
    path: str  # relative to the policy folder
    package: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.path}::{self.name}"


@dataclass(frozen=True)
class TestResult:
    __test__ = False

    test: RegoTest
    passed: bool
    detail: str  # "" when passed, else "undefined", "false" or the engine error


def discover(bundle: Bundle | None = None) -> list[RegoTest]:
    bundle = bundle or load_bundle()
    found = []
    for path, text in bundle.tests:
        package = _PACKAGE.search(text)
        if not package:
            continue
        seen = set()
        for name in _TEST_RULE.findall(text):
            if name not in seen:  # a rule may have several bodies
                seen.add(name)
                found.append(RegoTest(path, package.group(1), name))
    return found


class TestRunner:
    __test__ = False  # not a pytest class

    """One engine with policies, tests and data; coverage accumulates over the tests it runs."""

    def __init__(self, bundle: Bundle | None = None, *, coverage: bool = False) -> None:
        self.bundle = bundle or load_bundle()
        self.engine = new_regorus(self.bundle, tests=True, coverage=coverage)

    def run(self, test: RegoTest) -> TestResult:
        try:
            value = self.engine.eval_rule(f"data.{test.package}.{test.name}")
        except Exception as error:
            return TestResult(test, False, f"error: {first_line(error)}")
        if value is True:
            return TestResult(test, True, "")
        return TestResult(test, False, "undefined" if value is None else json.dumps(value)[:200])

    def coverage(self) -> dict[str, tuple[int, int]]:
        """Per policy file (tests excluded): (lines covered, lines that can be covered); (0, 0) when never reached."""
        report = json.loads(self.engine.get_coverage_report_as_json())
        result = {}
        for entry in report.get("files", []):
            path = entry["path"]
            if path.endswith("_test.rego"):
                continue
            covered, missed = len(entry.get("covered", [])), len(entry.get("not_covered", []))
            result[path] = (covered, covered + missed)
        for path, _ in self.bundle.modules:  # a file no test reached is not in the engine's report
            result.setdefault(path, (0, 0))
        return result


def run_all(root: Path | None = None, *, coverage: bool = False) -> tuple[list[TestResult], dict]:
    runner = TestRunner(load_bundle(root), coverage=coverage)
    results = [runner.run(test) for test in discover(runner.bundle)]
    return results, (runner.coverage() if coverage else {})


def captured_inputs(bundle: Bundle | None = None, gates: tuple[str, ...] = GATES) -> list[tuple[str, object]]:
    """Every gate input the Rego tests evaluate (with the shipped policy data), deduplicated.

    An extra `allow` body that prints its input and fails is added to each gate for the
    capture only; it cannot change any decision.
    """
    bundle = bundle or load_bundle()
    engine = new_regorus(bundle, tests=True)
    for gate in gates:
        engine.add_policy(f"capture/{gate}.rego", f"package factory.{gate}\nimport rego.v1\n"
                          f'allow if {{\n\tprint("CAPTURE", json.marshal(input))\n\tfalse\n}}\n')
    engine.set_gather_prints(True)
    seen, found = set(), []
    for test in discover(bundle):
        gate = test.path.split("/")[0]
        if gate not in gates:
            continue
        engine.eval_rule(f"data.{test.package}.{test.name}")
        for line in engine.take_prints():
            text = line.split("CAPTURE ", 1)[-1]
            if (gate, text) not in seen:
                seen.add((gate, text))
                found.append((gate, json.loads(text)))
    return found


class DataApiServer(HTTPServer):
    """A small OPA Data API server backed by regorus (tests and benchmarks of the server path).

    `POST /v1/data/<path>` {"input": ...} -> {"result": ...}, evaluated in the server thread. With
    `?provenance=true` the answer carries `provenance.bundles.policies.revision` as OPA's does for
    a bundle: `revision`, by default the bundle's digest (a bundle built with that revision);
    None leaves the bundle out, as `opa run --server <folder>` does.

    `token`: when set, a request without `Authorization: Bearer <token>` gets HTTP 401, as from
    `opa run --authentication=token` with an authorization policy checking that token.

    `mode` makes it misbehave: "ok", "error" (HTTP 500), "garbage" (a body that is not JSON),
    "slow" (answers after `delay` seconds), "no_result" (as OPA answers for an undefined rule).
    """

    def __init__(self, bundle: Bundle | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bundle = bundle or load_bundle()
        self.revision: str | None = self.bundle.digest
        self.token: str | None = None
        self.mode = "ok"
        self.delay = 1.0
        self.engine = None
        self.requests = 0
        self.authorizations: list[str | None] = []  # the Authorization header of each request

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: DataApiServer

    def log_message(self, *args) -> None:  # keep pytest output quiet
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        server = self.server
        server.requests += 1
        payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        server.authorizations.append(self.headers.get("Authorization"))
        if server.token is not None and not hmac.compare_digest(
                self.headers.get("Authorization", "").encode(), f"Bearer {server.token}".encode()):
            return self._send(401, b'{"code": "unauthorized", "message": "request rejected by administrative policy"}')
        path, _, query = self.path.partition("?")
        match = re.fullmatch(r"/v1/data/([\w/]+)", path)
        if server.mode == "error" or not match:
            return self._send(500, b'{"code": "internal_error", "message": "boom"}')
        if server.mode == "garbage":
            return self._send(200, b"<html>not json")
        if server.mode == "slow":
            time.sleep(server.delay)
        if server.mode == "no_result":
            return self._send(200, b"{}")
        if server.engine is None:  # regorus engines are bound to the thread that made them
            server.engine = new_regorus(server.bundle)
        server.engine.set_input_json(json.dumps(payload.get("input")))
        try:
            value = server.engine.eval_rule("data." + match.group(1).replace("/", "."))
        except Exception as error:
            return self._send(500, json.dumps({"code": "eval_error", "message": str(error)[:200]}).encode())
        answer = {} if value is None else {"result": value}
        if parse_qs(query).get("provenance") == ["true"]:
            answer["provenance"] = {"version": "fake-data-api"}
            if server.revision is not None:
                answer["provenance"]["bundles"] = {"policies": {"revision": server.revision}}
        self._send(200, json.dumps(answer).encode())


@contextlib.contextmanager
def serve_data_api(bundle: Bundle | None = None) -> Iterator[DataApiServer]:
    """A DataApiServer on 127.0.0.1 (a free port) in a background thread, shut down on exit."""
    server = DataApiServer(bundle)

    def serve() -> None:
        server.serve_forever()
        server.engine = None  # dropped in the thread that made it (regorus engines are thread-bound)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
