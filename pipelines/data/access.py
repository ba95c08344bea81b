"""The data-access seam: a step that reads a dataset asks the `data_access` gate first.

The gate input is the one of design section 6. The subject is the site's service
identity (conf/users.yaml `service_identities`) unless the step acts for a user. The
decision comes from `pipelines.policy.evaluate` (and is audit-logged there); a denial,
including any engine failure, stops the step with the policy's reasons.
"""

from __future__ import annotations

from typing import Any

from pipelines.config import load_config
from pipelines.context import StepError
from pipelines.workspace import SitePaths

ACTIONS = ("read", "train", "share", "export")


class AccessDenied(StepError):
    """The data_access gate denied the request; `.reasons` lists why."""

    def __init__(self, message: str, reasons: tuple[str, ...]):
        super().__init__(message)
        self.reasons = reasons


def subject_for(paths: SitePaths, subject: str | dict | None = None) -> dict[str, Any]:
    """The gate's subject: the site's service identity, a user id from conf/users.yaml, or a dict."""
    if isinstance(subject, dict):
        return dict(subject)
    config = load_config()
    if subject is None or subject == config.service_identities[paths.site].id:
        identity = config.service_identities[paths.site]
        return {"id": identity.id, "site": paths.site, "roles": list(identity.roles), "clearance": identity.clearance}
    try:
        user = config.user(subject)
    except KeyError as exc:
        raise AccessDenied(f"data access denied: {exc.args[0]}", (str(exc.args[0]),)) from None
    out: dict[str, Any] = {"id": user.id, "site": user.site, "roles": list(user.roles)}
    clearance = getattr(user, "clearance", None)
    if clearance:  # without one the policy denies (missing required field)
        out["clearance"] = clearance
    return out


def access_input(paths: SitePaths, dataset, *, action: str, purpose: str | None, subject=None) -> dict[str, Any]:
    return {
        "subject": subject_for(paths, subject),
        "action": action,
        "purpose": purpose,
        "resource": {
            "id": dataset.id,
            "owner": dataset.owner,
            "classification": dataset.classification,
            "releasable_to": list(dataset.releasable_to),
            "purposes": list(dataset.purposes),
            "local_only": dataset.local_only,
            "export_authorized": dataset.export_authorized,
        },
    }


def require_access(paths: SitePaths, dataset, *, action: str, purpose: str | None, subject=None):
    """Ask the data_access gate; return the Decision when allowed, raise AccessDenied otherwise."""
    from pipelines import policy

    gate_input = access_input(paths, dataset, action=action, purpose=purpose, subject=subject)
    decision = policy.evaluate(
        "data_access", gate_input, site=paths.site, home=paths.home, actor=gate_input["subject"].get("id")
    )
    if not decision.allow:
        reasons = tuple(decision.reasons) or ("denied",)
        raise AccessDenied(
            f"data access denied for {gate_input['subject'].get('id')} to {action} {dataset.id} "
            f"for {purpose}: " + "; ".join(reasons),
            reasons,
        )
    return decision
