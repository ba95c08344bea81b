"""The policy bundle a site trusts: its pinned digest, and the refusal of any other bundle.

The environment chooses which bundle runs (FACTORY_POLICIES, FACTORY_OPA_URL); the site
decides which bundle it believes. `evaluate(..., site=S)` compares the digest of the bundle
that decided (for an OPA server, the bundle revision the server reports as well) with S's
pin, and a difference is a denial naming both digests, audited like any decision.

Where the pin comes from (conf/sites.yaml `policy_bundle_digest` of the site):
- `auto` (default): `<site home>/policy-pin.json`, written by `factory init` (the policy
  folder in effect at init) and changed only by `factory policy pin --site S` after a
  reviewed policy change (audited as `policy.pinned`); a site whose home holds no pin yet
  (a home made before pins, a test's workspace) trusts the project's own `policies/`
  folder, never the folder an environment variable names.
- `sha256:<hex>`: that digest; a pin in the home must agree with it.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from pathlib import Path
from typing import Any

from pipelines.config import PROJECT_ROOT, load_config
from pipelines.fileio import file_lock, write_atomic, write_json
from pipelines.policy.bundle import DIGEST, BundleError, load_bundle
from pipelines.workspace import SitePaths

PIN_FILE = "policy-pin.json"
AUTO = "auto"


class PinError(RuntimeError):
    """The site's pin cannot be read, or a bundle is not the one the site trusts; the message is the denial reason."""


def pin_file(paths: SitePaths) -> Path:
    return paths.root / PIN_FILE


def project_policies() -> Path:
    """The project's own policy folder (what `auto` trusts when the home holds no pin)."""
    return PROJECT_ROOT / "policies"


def configured(site: str) -> str:
    """The site's conf/sites.yaml `policy_bundle_digest`: "auto" or "sha256:<hex>"."""
    entry = load_config().sites.get(site)
    if entry is None:
        raise PinError(f"site {site!r} is not in conf/sites.yaml, so it trusts no policy bundle")
    return entry.policy_bundle_digest


def read_pin(paths: SitePaths) -> dict[str, Any] | None:
    """The site's pin record, None when its home holds none; PinError when it is unreadable or malformed."""
    path = pin_file(paths)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise PinError(f"the policy pin {path} cannot be read: {error.strerror}") from None
    return _read_pin(str(path), paths.site, (stat.st_ino, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _read_pin(path: str, site: str, stamp: tuple[int, int, int]) -> dict[str, Any]:
    """Read and check a pin file, again only when it changes (`stamp`): gates call this for every decision."""
    try:
        with open(path, "rb") as handle:
            record = json.loads(handle.read(65536))
    except (OSError, ValueError, RecursionError) as error:
        raise PinError(f"the policy pin {path} is unreadable ({type(error).__name__}); "
                       f"run `factory policy pin --site {site}`") from None
    if not isinstance(record, dict) or not DIGEST.match(str(record.get("digest"))) or record.get("site") != site:
        raise PinError(f"the policy pin {path} is malformed (it needs the site {site!r} and a sha256:<hex> digest); "
                       f"run `factory policy pin --site {site}`")
    return record


def expected_digest(paths: SitePaths) -> tuple[str, str]:
    """(the digest the site trusts, where that comes from); PinError when it cannot be known."""
    setting = configured(paths.site)
    pinned = read_pin(paths)
    where = pin_file(paths)
    if setting != AUTO:
        if pinned is not None and pinned["digest"] != setting:
            raise PinError(f"site {paths.site}: the policy pin {where} ({pinned['digest']}) disagrees with "
                           f"conf/sites.yaml policy_bundle_digest ({setting})")
        return setting, "conf/sites.yaml policy_bundle_digest"
    if pinned is not None:
        return pinned["digest"], f"pin {where}"
    try:
        return load_bundle(project_policies()).digest, f"the project's policy folder {project_policies()} (no pin yet)"
    except BundleError as error:
        raise PinError(f"site {paths.site} has no policy pin ({where}) and the project's policy folder does not "
                       f"load ({error}); run `factory policy pin --site {paths.site}`") from None


def check_bundle(paths: SitePaths, found: str, root: Path) -> None:
    """PinError unless `found` (the digest of the bundle at `root`) is the one the site trusts."""
    expected, source = expected_digest(paths)
    if found != expected:
        raise PinError(f"policy bundle refused for site {paths.site}: expected {expected} ({source}), "
                       f"found {found} ({root})")


def check_revision(paths: SitePaths, revision: str | None, url: str) -> None:
    """PinError unless the OPA server reported the bundle revision the site trusts."""
    expected, source = expected_digest(paths)
    if revision is None:
        raise PinError(f"OPA server {url} reports no bundle revision, so site {paths.site} cannot tell which policies "
                       f"decided: expected {expected} ({source}); serve the policies as a bundle with that "
                       "revision (`opa build -b policies/ --revision $(factory policy digest)`)")
    if revision != expected:
        raise PinError(f"OPA bundle refused for site {paths.site}: expected revision {expected} ({source}), "
                       f"found {revision} (OPA server {url})")


def service_actor(site: str) -> str:
    identity = load_config().service_identities.get(site)
    return identity.id if identity else site


def write_pin(paths: SitePaths, policies: Path, *, actor: str | None = None, reason: str = "",
              replace: bool = True) -> dict[str, Any] | None:
    """Pin the site to the bundle of `policies` and audit it as `policy.pinned`; return the record
    (None when `replace` is False and the site already has a pin).

    The folder must load (BundleError otherwise); with a digest in conf/sites.yaml it must be
    that one (PinError). The pin and its audit entry are written together or not at all."""
    from pipelines.trust import audit

    bundle = load_bundle(policies)
    setting = configured(paths.site)
    if setting != AUTO and bundle.digest != setting:
        raise PinError(f"site {paths.site} trusts {setting} (conf/sites.yaml policy_bundle_digest); the folder "
                       f"{bundle.root} is {bundle.digest}: change conf/sites.yaml, or pin that folder")
    actor = actor or service_actor(paths.site)
    path = pin_file(paths)
    with file_lock(path.with_name(f".{PIN_FILE}.lock")):
        if not replace and path.exists():
            return None
        try:
            previous = read_pin(paths)
            previous_digest = previous["digest"] if previous else None
        except PinError:
            previous_digest = "unreadable"
        old_bytes = path.read_bytes() if path.exists() else None
        record = {
            "site": paths.site, "digest": bundle.digest, "policies": str(bundle.root),
            "pinned_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "pinned_by": actor, "reason": reason[:500], "previous": previous_digest,
        }
        write_json(path, record)
        try:
            audit.append(paths, action="policy.pinned", actor=actor, object=bundle.digest, outcome="success",
                         details={"previous": previous_digest, "policies": str(bundle.root), "reason": reason[:500]})
        except BaseException:
            if old_bytes is None:
                path.unlink(missing_ok=True)
            else:
                write_atomic(path, old_bytes)
            raise
    return record


def ensure_pin(paths: SitePaths) -> dict[str, Any] | None:
    """`factory init`: pin the policy folder in effect when the site has no pin yet; None when it has one."""
    from pipelines.policy.bundle import policy_root

    if pin_file(paths).exists():
        return None
    return write_pin(paths, policy_root(), reason="factory init", replace=False)
