"""Policy gates (design section 6): `evaluate(gate, input)` returns an allow/deny Decision.

The Rego policies in `policies/` decide; this package only runs them. The embedded
regorus engine is the default; FACTORY_OPA_URL selects an OPA server (see
`pipelines.policy.engines`). Every gate is deny-by-default and fails closed: an unknown
gate, an input that is not JSON, an engine or server failure and an audit log that
cannot be written all give a denial whose reason says what went wrong. With `site`
the decision is appended to that site's audit log.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pipelines.policy.bundle import Bundle, BundleError, load_bundle
from pipelines.policy.engines import EngineFailure, OpaServerEngine, RegorusEngine

__all__ = ["Decision", "evaluate", "allowed_approvers", "gates", "engine_for"]

_GATE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Decision:
    allow: bool
    reasons: tuple[str, ...]
    gate: str
    input_digest: str
    bundle_digest: str
    engine: str
    failed: bool = False  # True when no policy decided (engine, server, input or audit failure): a retry may help
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # other keys of the document

    def to_dict(self) -> dict[str, Any]:
        """The decision document `{"allow": ..., "reasons": [...]}` (CLI output, XCom), plus any extra keys."""
        return {**self.extra, "allow": self.allow, "reasons": list(self.reasons)}

    def record(self) -> dict[str, Any]:
        """The decision with what identifies it (gate, input and bundle digests, engine)."""
        return {**self.to_dict(), "gate": self.gate, "input_digest": self.input_digest,
                "bundle_digest": self.bundle_digest, "engine": self.engine, "failed": self.failed}


def canonical_json(value: Any) -> str:
    """Sorted, compact JSON. orjson costs a tenth of the stdlib here, which matters at ~100 us a gate;
    it writes NaN and infinities as null, which every gate treats as a missing value (deny)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


@functools.lru_cache(maxsize=8)
def _embedded(root: str) -> RegorusEngine:
    return RegorusEngine(load_bundle(Path(root)))


@functools.lru_cache(maxsize=8)
def _server(url: str, timeout: str, token: str) -> OpaServerEngine:
    return OpaServerEngine(url, timeout=float(timeout), token=token or None)


def engine_for(bundle: Bundle) -> RegorusEngine | OpaServerEngine:
    """The engine the environment selects: the OPA server of FACTORY_OPA_URL, else embedded regorus."""
    url = os.environ.get("FACTORY_OPA_URL", "").strip()
    if url:
        return _server(url, os.environ.get("FACTORY_OPA_TIMEOUT", "2"), os.environ.get("FACTORY_OPA_TOKEN", ""))
    return _embedded(str(bundle.root))


def gates() -> tuple[str, ...]:
    """The gates the policy folder defines (data_access, data_release, model_release, approval, ...)."""
    return load_bundle().gates


def evaluate(
    gate: str,
    input: Any,
    *,
    site: str | None = None,
    home: Path | None = None,
    actor: str | None = None,
) -> Decision:
    """Decide `gate` for `input`; with `site`, append the decision to that site's audit log.

    `actor` is who asks (recorded in the audit log); it defaults to the site's service identity.
    """
    input_problem = None
    try:
        input_json = canonical_json(input)
    except (TypeError, ValueError) as error:
        input_json, input_problem = repr(input), f"the gate input is not JSON: {error}"
    input_digest = "sha256:" + hashlib.sha256(input_json.encode()).hexdigest()
    engine_name, bundle_digest, extra, failed = "none", "none", {}, False
    try:
        bundle = load_bundle()
        bundle_digest = bundle.digest
        engine = engine_for(bundle)
        engine_name = engine.name
        if not isinstance(gate, str) or not _GATE_NAME.match(gate) or gate not in bundle.gates:
            raise EngineFailure(f"unknown gate {gate!r}; gates are {', '.join(bundle.gates)}")
        if input_problem:
            raise EngineFailure(input_problem)
        result = engine.decide(gate, input_json, input)
        allow, reasons = result.pop("allow"), tuple(result.pop("reasons"))
        extra = result
        if not allow and not reasons:
            reasons = ("denied without a reason by the policy",)
    except (EngineFailure, BundleError) as error:
        allow, reasons, failed = False, (str(error),), True
    decision = Decision(allow, reasons, str(gate), input_digest, bundle_digest, engine_name, failed, extra)
    if site is not None:
        decision = _record(decision, site, home, actor)
    return decision


def _record(decision: Decision, site: str, home: Path | None, actor: str | None) -> Decision:
    """Append the decision to the site's audit log; a decision that cannot be recorded is a denial."""
    try:
        from pipelines.trust import audit
        from pipelines.workspace import SitePaths

        if actor is None:
            from pipelines.config import load_config

            identity = load_config().service_identities.get(site)
            actor = identity.id if identity else site
        audit.append(
            SitePaths.of(site, home),
            action="policy.decision",
            actor=actor,
            object=decision.gate,
            outcome="allow" if decision.allow else "deny",
            details={
                "input_digest": decision.input_digest,
                "bundle_digest": decision.bundle_digest,
                "engine": decision.engine,
                "reasons": list(decision.reasons),
            },
        )
    except Exception as error:  # fail closed: an unrecorded decision does not allow anything
        reason = f"the decision could not be written to the audit log of {site}: {type(error).__name__}: {error}"
        return dataclasses.replace(decision, allow=False, reasons=(*decision.reasons, reason), failed=True)
    return decision


def allowed_approvers(
    gate_name: str, owner_site: str, required_role: str, requested_by: str | None = None
) -> list:
    """The users of conf/users.yaml whom the `approval` policy lets answer this gate (HITL assigned_users)."""
    from pipelines.config import load_config

    allowed = []
    for user in load_config().users:
        document = {
            "user": {"id": user.id, "site": user.site, "roles": list(user.roles)},
            "gate": {"name": gate_name, "owner_site": owner_site, "required_role": required_role},
            "requested_by": requested_by,
        }
        if evaluate("approval", document).allow:
            allowed.append(user)
    return allowed
