"""Policy gates (design section 6): `evaluate(gate, input)` returns an allow/deny Decision.

The Rego policies in `policies/` decide; this package only runs them. The embedded
regorus engine is the default; FACTORY_OPA_URL selects an OPA server (see
`pipelines.policy.engines`). Every gate is deny-by-default and fails closed: an unknown
gate, an input that is not JSON, a bundle that does not load, an engine or server
failure and an audit log that cannot be written all give a denial whose reason says
what went wrong; nothing raises out of `evaluate()`. With `site` the bundle must be the
one that site pins (`pipelines.policy.pin`; an OPA server must report that revision),
and the decision is appended to the site's audit log.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import orjson

from pipelines.policy.bundle import Bundle, BundleError, load_bundle
from pipelines.policy.engines import Engine, EngineFailure, OpaServerEngine, RegorusEngine, opa_token
from pipelines.policy.pin import PinError, check_bundle, check_revision

__all__ = [
    "Decision", "evaluate", "gates", "engine_for", "policy_data", "release_thresholds", "assigned_approvers",
]

_NO_EXTRA: Mapping[str, Any] = MappingProxyType({})


class Decision(NamedTuple):
    """What a gate decided, and on what (input, policy bundle, engine)."""

    allow: bool
    reasons: tuple[str, ...]
    gate: str
    input_json: bytes  # the canonical JSON of the gate input (what the engine decided on)
    bundle_digest: str
    engine: str
    failed: bool = False  # True when no policy decided (engine, server, input, pin or audit failure)
    extra: Mapping[str, Any] = _NO_EXTRA  # other keys of the document (the ODD gate's mode)
    bundle_revision: str | None = None  # the bundle revision an OPA server reported; None for the embedded engine

    @property
    def input_digest(self) -> str:
        """sha256 of the canonical input, computed when asked (audit log, records), not in every gate call."""
        return "sha256:" + hashlib.sha256(self.input_json).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The decision document `{"allow": ..., "reasons": [...]}` (CLI output, XCom), plus any extra keys."""
        return {**self.extra, "allow": self.allow, "reasons": list(self.reasons)}

    def record(self) -> dict[str, Any]:
        """The decision with what identifies it (gate, input and bundle digests, engine)."""
        return {**self.to_dict(), "gate": self.gate, "input_digest": self.input_digest,
                "bundle_digest": self.bundle_digest, "bundle_revision": self.bundle_revision,
                "engine": self.engine, "failed": self.failed}


def canonical_json(value: Any) -> bytes:
    """Sorted, compact JSON (orjson; it writes NaN and infinities as null, which every gate treats
    as a missing value: deny)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


@functools.lru_cache(maxsize=8)
def _embedded(bundle: Bundle) -> RegorusEngine:
    return RegorusEngine(bundle)


@functools.lru_cache(maxsize=8)
def _server(url: str, timeout: str, token: str) -> OpaServerEngine:
    return OpaServerEngine(url, timeout=float(timeout), token=token or "")


def engine_for(bundle: Bundle) -> Engine:
    """The engine the environment selects: the OPA server of FACTORY_OPA_URL, else embedded regorus.

    Settings (and the token file) are read at each call, so a change takes effect at the next
    gate call; the engine for each setting is built once."""
    url = os.environ.get("FACTORY_OPA_URL", "").strip()
    if url:
        return _server(url, os.environ.get("FACTORY_OPA_TIMEOUT", "2"), opa_token(os.environ) or "")
    return _embedded(bundle)


def gates() -> tuple[str, ...]:
    """The gates the policy folder defines (data_access, data_release, model_release, approval, ...)."""
    return load_bundle().gates


def policy_data() -> dict[str, Any]:
    """A copy of the policy data the gates read: `policies/factory/data.json`, `data.factory` in Rego."""
    return copy.deepcopy(load_bundle().data.get("factory", {}))


DEFAULT_END_USE = "evaluation"


def default_end_use(recipient: str) -> str | None:
    """The end use an export to `recipient` is requested for unless someone says otherwise:
    "evaluation" where a licence of the recipient (policy data `export_licences`) names it, else the
    first end use its licences name; None when it holds no licence naming one. Read from the policy
    data alone (no Rego), so a DAG file may call it while it is parsed; `model_release` decides."""
    licences = policy_data().get("export_licences", {}).get(recipient) or []
    end_uses = [use for licence in licences for use in licence.get("end_uses") or [] if isinstance(use, str)]
    if DEFAULT_END_USE in end_uses:
        return DEFAULT_END_USE
    return end_uses[0] if end_uses else None


def release_thresholds(purpose: str) -> dict[str, float]:
    """The metric thresholds a model released for `purpose` ("collaboration" or "export") must meet,
    `{metric: minimum}`: the policy data the `model_release` gate enforces, so a step can hold a model
    to the same bar before it asks the gate. BundleError when the policy data has no entry for `purpose`."""
    thresholds = policy_data().get("release_thresholds", {})
    if purpose not in thresholds:
        raise BundleError(f"policy data release_thresholds has no entry for purpose {purpose!r} "
                          f"(entries: {', '.join(sorted(thresholds)) or 'none'})")
    return thresholds[purpose]


def evaluate(
    gate: str,
    input: Any,
    *,
    site: str | None = None,
    home: Path | None = None,
    actor: str | None = None,
    audit: bool = True,
) -> Decision:
    """Decide `gate` for `input`. With `site`, only the bundle that site pins may decide (an OPA
    server must report that revision), and the decision is appended to the site's audit log
    (unless `audit` is False: a hot path that audits its denials itself, as the ODD gate does).

    `actor` is who asks (recorded in the audit log); it defaults to the site's service identity.
    """
    try:
        input_json, input_problem = canonical_json(input), None
    except TypeError as error:  # orjson.JSONEncodeError
        input_json, input_problem = repr(input).encode(errors="backslashreplace"), f"the gate input is not JSON: {error}"
    engine_name, bundle_digest, extra, failed, revision = "none", "none", _NO_EXTRA, False, None
    try:
        bundle = load_bundle()
        bundle_digest = bundle.digest
        paths = _site_paths(site, home) if site is not None else None
        if paths is not None:
            check_bundle(paths, bundle.digest, bundle.root)  # before any engine runs the bundle
        engine = engine_for(bundle)
        engine_name = engine.name
        if gate not in bundle.gates:
            raise EngineFailure(f"unknown gate {gate!r}; gates are {', '.join(bundle.gates)}")
        if input_problem:
            raise EngineFailure(input_problem)
        result, revision = engine.decide(gate, input_json.decode(), input)
        if paths is not None and isinstance(engine, OpaServerEngine):
            check_revision(paths, revision, engine.url)
        allow, reasons = result["allow"], tuple(result["reasons"])
        extra = {key: value for key, value in result.items() if key not in ("allow", "reasons")}
        if not allow and not reasons:
            reasons = ("denied without a reason by the policy",)
    except (EngineFailure, BundleError, PinError) as error:
        allow, reasons, failed = False, (str(error),), True
    except Exception as error:  # fail closed on anything else (an OS error, a bug): nothing raises out of a gate
        allow, reasons, failed = False, (f"policy evaluation failed (fail closed): {type(error).__name__}: {error}",), True
    decision = Decision(allow, reasons, str(gate), input_json, bundle_digest, engine_name, failed, extra, revision)
    if site is not None and audit:
        decision = _record(decision, site, home, actor)
    return decision


def _site_paths(site: str, home: Path | None):
    from pipelines.workspace import SitePaths, WorkspaceError

    try:
        return SitePaths.of(site, home)
    except WorkspaceError as error:
        raise PinError(str(error)) from None


SUBJECT_FIELDS = {
    "dataset": ("dataset", "id"), "model": ("model", "id"), "resource": ("resource", "id"),
    "user": ("user", "id"), "gate_name": ("gate", "name"), "subject": ("subject", "id"),
    "recipient": ("recipient",), "purpose": ("purpose",), "action": ("action",), "end_use": ("end_use",),
    "requested_by": ("requested_by",),
}


def decision_subject(input_json: bytes) -> dict[str, str]:
    """What a decision was about, for the audit log (the input itself is recorded only by its digest):
    the dataset, model or user ids, recipient, purpose, action, end use and requester the input names,
    each a short text."""
    try:
        document = orjson.loads(input_json)
    except orjson.JSONDecodeError:
        return {}
    subject = {}
    for name, path in SUBJECT_FIELDS.items():
        value: Any = document
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str) and value:
            subject[name] = value[:200]
    return subject


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
                **({"bundle_revision": decision.bundle_revision} if decision.bundle_revision is not None else {}),
                **({"subject": subject} if (subject := decision_subject(decision.input_json)) else {}),
            },
        )
    except Exception as error:  # fail closed: an unrecorded decision does not allow anything
        reason = f"the decision could not be written to the audit log of {site}: {type(error).__name__}: {error}"
        return decision._replace(allow=False, reasons=(*decision.reasons, reason), failed=True)
    return decision


def assigned_approvers(owner_site: str, required_role: str, requested_by: str | None = None) -> list:
    """The users of conf/users.yaml assigned to answer a gate (HITL assigned_users): those of
    `owner_site` who hold `required_role`, other than the requester.

    Read from conf alone, so a DAG file may call it while it is parsed; no policy runs here. Whether
    the user who answers may do so is decided at run time by the `approval` gate."""
    from pipelines.config import load_config

    return [user for user in load_config().users
            if user.site == owner_site and required_role in user.roles and user.id != requested_by]
