"""The site's dataset catalog: every dataset version as a record in the site repo.

A version is identified by its content: `<site>/<name>@<md5[:12]>` (the DVC md5). Its record,
`repo/catalog/<name>/<md5>.json`, is committed in git; the data itself is DVC-tracked and pushed
to the site remote. Records carry the lineage (parents by id), the owner and the flags the
policies read (`local_only`, `export_authorized`, `releasable_to`, `classification`). A
version that fails validation is quarantined: kept forever, never usable again.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.config import LEVELS, load_config
from pipelines.context import StepError
from pipelines.fileio import file_digest, write_json
from pipelines.workspace import SAFE_NAME, SitePaths, UnsafeName, safe_name

KINDS = ("raw", "sanitized", "received", "derived")
_ID = re.compile(r"^(?P<site>[a-z]+)/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)@(?P<md5>[0-9a-f]{6,32})$")
# When nothing says otherwise a dataset is treated as the most restricted kind.
RESTRICTIVE = {
    "classification": "secret",
    "local_only": True,
    "export_authorized": False,
    "releasable_to": (),
    "purposes": (),
}


class CatalogError(StepError):
    """A dataset reference or registration is invalid; the message says which."""


class DatasetQuarantined(StepError):
    """A quarantined dataset version was asked for; the message names the quarantine."""

    def __init__(self, version: DatasetVersion):
        super().__init__(
            f"dataset {version.id} is quarantined ({version.quarantine_reason}) since "
            f"{version.quarantined_at}; it cannot be used. Produce a new version instead."
        )
        self.version = version


@dataclass(frozen=True)
class DatasetVersion:
    id: str
    site: str
    name: str
    md5: str
    path: Path  # the working file it was registered from (a later version may overwrite it)
    owner: str
    kind: str
    parents: tuple[str, ...]
    classification: str
    local_only: bool
    export_authorized: bool
    releasable_to: tuple[str, ...]
    purposes: tuple[str, ...]
    registered_at: str
    status: str = "ok"
    quarantine_reason: str | None = None
    quarantined_at: str | None = None
    upstream: tuple[dict, ...] = ()  # lineage entries of parents held by other sites
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.status == "ok"

    @property
    def reason(self) -> str | None:
        return self.quarantine_reason

    @property
    def flags(self) -> dict[str, Any]:
        return {
            "classification": self.classification,
            "local_only": self.local_only,
            "export_authorized": self.export_authorized,
            "releasable_to": list(self.releasable_to),
            "purposes": list(self.purposes),
        }

    def to_dict(self, repo: Path | None = None) -> dict[str, Any]:
        """The record; with `repo` the path is stored relative to it (records move with the repo)."""
        data = asdict(self)
        for key in ("parents", "releasable_to", "purposes", "upstream"):
            data[key] = list(data[key])
        data["path"] = str(self.path.relative_to(repo) if repo and self.path.is_absolute() else self.path)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], repo: Path | None = None) -> DatasetVersion:
        data = dict(data)
        for key in ("parents", "releasable_to", "purposes", "upstream"):
            data[key] = tuple(data.get(key) or ())
        data["path"] = (repo / data["path"]) if repo else Path(data["path"])
        return cls(**data)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def catalog_dir(paths: SitePaths) -> Path:
    return paths.repo / "catalog"


def _record_path(paths: SitePaths, name: str, md5: str) -> Path:
    return catalog_dir(paths) / name / f"{md5}.json"


def combine_flags(flag_sets: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Flags of data derived from several sources: the most restrictive of each."""
    flag_sets = list(flag_sets)
    if not flag_sets:
        return dict(RESTRICTIVE)
    # Intersections keep the first source's order, so a single source's flags come back unchanged.
    releasable = [s for s in flag_sets[0].get("releasable_to") or () if all(
        s in (f.get("releasable_to") or ()) for f in flag_sets[1:])]
    purposes = [p for p in flag_sets[0].get("purposes") or () if all(
        p in (f.get("purposes") or ()) for f in flag_sets[1:])]
    return {
        "classification": max((f.get("classification", "secret") for f in flag_sets), key=_level),
        "local_only": any(bool(f.get("local_only", True)) for f in flag_sets),
        "export_authorized": all(bool(f.get("export_authorized", False)) for f in flag_sets),
        "releasable_to": tuple(releasable),
        "purposes": tuple(purposes),
    }


def _level(classification: str) -> int:
    if classification not in LEVELS:
        raise CatalogError(f"unknown classification {classification!r}; levels are {', '.join(LEVELS)}")
    return LEVELS.index(classification)


def partition_flags(site: str, partition: str) -> dict[str, Any] | None:
    """The flags conf/sites.yaml gives a site's partition, or None if it has no such partition."""
    try:
        part = load_config().partition(site, partition)
    except KeyError:
        return None
    return {
        "classification": part.classification,
        "local_only": part.local_only,
        "export_authorized": part.export_authorized,
        "releasable_to": tuple(part.releasable_to),
        "purposes": tuple(part.purposes),
    }


def _audit(paths: SitePaths, **entry: Any) -> None:
    from pipelines.trust import audit

    audit.append(paths, **entry)


def _actor(paths: SitePaths, actor: str | None) -> str:
    if actor:
        return actor
    return load_config().service_identities[paths.site].id


def _write_record(paths: SitePaths, version: DatasetVersion, message: str, attach: Sequence[Path] = ()) -> None:
    from pipelines.data import repo

    target = _record_path(paths, version.name, version.md5)
    record = version.to_dict(paths.repo.resolve())
    write_json(target, record)
    repo.commit_files(paths, [target, *attach], message)


def register_dataset(
    paths: SitePaths,
    name: str,
    file: Path,
    *,
    parents: Sequence[str] = (),
    flags: dict[str, Any] | None = None,
    kind: str = "raw",
    owner: str | None = None,
    upstream: Sequence[dict] = (),
    extra: dict[str, Any] | None = None,
    actor: str | None = None,
    md5: str | None = None,
    attach: Sequence[Path] = (),
) -> DatasetVersion:
    """Register `file` (inside the site repo) as a version of dataset `name`.

    Idempotent on content: the same bytes give the same version and make no commit. Flags:
    a raw dataset named after a partition gets that partition's flags from conf/sites.yaml;
    a derived one the most restrictive of its parents' (explicit `flags` can only restrict
    further); anything else is treated as secret and local-only unless `flags` say otherwise.
    `upstream` carries the lineage entries of parents held by another site (received data).
    A version without a data spec (`extra["spec"]`) takes the one its parents share, if they share one.
    `md5`: the caller already hashed the file (spares reading it once more; DVC's own md5 still decides
    the version). `attach`: files in the site repo committed in git together with the record.
    """
    from pipelines.data import repo

    try:
        safe_name(name, "dataset name")
    except UnsafeName as error:
        raise CatalogError(str(error)) from None
    if kind not in KINDS:
        raise CatalogError(f"unknown dataset kind {kind!r}; kinds are {', '.join(KINDS)}")
    file = Path(file).resolve()
    if paths.repo.resolve() not in file.parents:
        raise CatalogError(f"{file} is outside the {paths.site} site repo {paths.repo}")
    if not file.is_file():
        raise CatalogError(f"cannot register {file}: no such file")
    owner = owner or paths.site
    with repo.site_lock(paths):
        md5 = md5 or file_digest(file, "md5")
        existing = _record_path(paths, name, md5)
        if existing.exists():
            return _read(paths, existing)
        upstream = _complete_upstream(paths, parents, upstream, flags, owner)
        parent_flags = [_parent_flags(paths, p, upstream) for p in parents]
        effective = _effective_flags(paths, name, kind, owner, parent_flags, flags)
        extra = dict(extra or {})
        if "spec" not in extra and parents:
            shared = _shared_spec(paths, parents, upstream)
            if shared is not None:
                extra["spec"] = shared
        tracked = repo.commit_tracked(paths, [file], f"Track dataset {name} ({kind})")
        md5 = tracked[file]
        version = DatasetVersion(
            id=f"{paths.site}/{name}@{md5[:12]}",
            site=paths.site,
            name=name,
            md5=md5,
            path=file,
            owner=owner,
            kind=kind,
            parents=tuple(parents),
            registered_at=_now(),
            upstream=tuple(upstream),
            extra=extra,
            **effective,
        )
        _write_record(paths, version, f"Register dataset {version.id}", attach)
        _audit(paths, action="dataset.registered", actor=_actor(paths, actor), object=version.id, outcome="ok",
               details={"md5": md5, "kind": kind, "owner": owner, "parents": list(parents), **version.flags})
        return version


def _complete_upstream(paths, parents, upstream, flags, owner) -> tuple[dict, ...]:
    """Parents held by another site need a lineage entry. Without one from the sender's package,
    the flags the (signed) package declared stand in for the parent, so its restrictions carry over."""
    out = [dict(e) for e in upstream]
    described = {e.get("dataset_id") for e in out}
    for parent in parents:
        if parent.split("/", 1)[0] == paths.site or parent in described:
            continue
        if not flags:
            raise CatalogError(
                f"parent {parent} is held by another site: pass its lineage (`upstream`) or its flags"
            )
        merged = {**RESTRICTIVE, **flags}
        out.append({
            "dataset_id": parent,
            "owner": owner,
            "local_only": bool(merged["local_only"]),
            "export_authorized": bool(merged["export_authorized"]),
            "releasable_to": list(merged.get("releasable_to") or ()),
            "md5": None,
            "classification": merged["classification"],
            "purposes": list(merged.get("purposes") or ()),
            "kind": "declared by sender",
            "parents": [],
        })
    return tuple(out)


def _shared_spec(paths: SitePaths, parents: Sequence[str], upstream: Sequence[dict]) -> dict | None:
    """The data spec every parent records (a local parent in its record, a remote one in its lineage entry)."""
    specs = []
    for parent in parents:
        if parent.split("/", 1)[0] == paths.site:
            specs.append(get(paths, parent).extra.get("spec"))
        else:
            specs.append(next((e.get("spec") for e in upstream if e.get("dataset_id") == parent), None))
    first = specs[0]
    return first if first is not None and all(s == first for s in specs) else None


def _parent_flags(paths: SitePaths, parent: str, upstream: Sequence[dict]) -> dict[str, Any]:
    for entry in upstream:
        if entry.get("dataset_id") == parent:
            return entry
    return get(paths, parent).flags


def _effective_flags(paths, name, kind, owner, parent_flags, flags) -> dict[str, Any]:
    base: dict[str, Any] | None
    if parent_flags:
        base = combine_flags(parent_flags)
    elif kind == "raw":
        base = partition_flags(owner, name)
    else:
        base = None
    if base is None:
        base = dict(flags) if flags else dict(RESTRICTIVE)
        merged = {**RESTRICTIVE, **base}
    else:
        merged = combine_flags([base, {**base, **flags}]) if flags else base
    _level(merged["classification"])
    return {
        "classification": merged["classification"],
        "local_only": bool(merged["local_only"]),
        "export_authorized": bool(merged["export_authorized"]),
        "releasable_to": tuple(merged.get("releasable_to") or ()),
        "purposes": tuple(merged.get("purposes") or ()),
    }


def _read(paths: SitePaths, path: Path) -> DatasetVersion:
    try:
        return DatasetVersion.from_dict(json.loads(path.read_text()), paths.repo.resolve())
    except (ValueError, TypeError) as exc:
        raise CatalogError(f"catalog record {path} is unreadable: {exc}") from exc


def list_datasets(paths: SitePaths, name: str | None = None) -> list[DatasetVersion]:
    """Every version in the catalog (of one dataset when `name` is given), oldest first."""
    root = catalog_dir(paths)
    pattern = f"{name}/*.json" if name else "*/*.json"
    versions = [_read(paths, p) for p in root.glob(pattern)] if root.is_dir() else []
    return sorted(versions, key=lambda v: (v.registered_at, v.id))


def latest(paths: SitePaths, name: str) -> DatasetVersion:
    versions = list_datasets(paths, name)
    if not versions:
        raise CatalogError(f"site {paths.site} has no dataset named {name!r}")
    return versions[-1]


def get(paths: SitePaths, ref: str) -> DatasetVersion:
    """A version by id (`site/name@md5prefix`), by `name@md5prefix`, or the latest of `name`."""
    match = _ID.match(ref)
    if match is None and "@" in ref:
        match = _ID.match(f"{paths.site}/{ref}")
    if match is None:
        if SAFE_NAME.match(ref):
            return latest(paths, ref)
        raise CatalogError(f"invalid dataset reference {ref!r}; expected site/name@md5, name@md5 or name")
    if match["site"] != paths.site:
        raise CatalogError(f"dataset {ref} belongs to the catalog of {match['site']}, not {paths.site}")
    hits = [v for v in list_datasets(paths, match["name"]) if v.md5.startswith(match["md5"])]
    if len(hits) != 1:
        what = "no" if not hits else "several"
        raise CatalogError(f"{what} dataset version matches {ref!r} at site {paths.site}")
    return hits[0]



def content_path(paths: SitePaths, version: DatasetVersion) -> Path:
    """Where the version's bytes are: the DVC cache, the site remote, or the working file."""
    rel = Path("files") / "md5" / version.md5[:2] / version.md5[2:]
    for candidate in (paths.repo / ".dvc" / "cache" / rel, paths.dvc_remote / rel):
        if candidate.is_file():
            return candidate
    working = version.path
    if working.is_file() and file_digest(working, "md5") == version.md5:
        return working
    raise CatalogError(f"the content of {version.id} (md5 {version.md5}) is missing from the cache and remote")


def load_dataset(
    paths: SitePaths,
    ref: str | DatasetVersion,
    *,
    action: str | None = None,
    purpose: str | None = None,
    subject: Any = None,
) -> tuple[pd.DataFrame, DatasetVersion]:
    """Read a usable version. Refuses a quarantined one, and content whose md5 does not match.

    With `action` (read, train, share, export) the `data_access` gate is asked first.
    """
    version = get(paths, ref) if isinstance(ref, str) else get(paths, ref.id)
    if version.status == "quarantined":
        raise DatasetQuarantined(version)
    if action is not None:
        from pipelines.data.access import require_access

        require_access(paths, version, action=action, purpose=purpose, subject=subject)
    data = content_path(paths, version).read_bytes()
    if hashlib.md5(data, usedforsecurity=False).hexdigest() != version.md5:
        raise CatalogError(f"the stored content of {version.id} does not match its md5; refusing it")
    return pd.read_parquet(io.BytesIO(data)), version


def quarantine(paths: SitePaths, version: DatasetVersion | str, reason: str, *, actor: str | None = None) -> DatasetVersion:
    """Mark a version quarantined. Its data and record are kept; there is no way back."""
    from pipelines.data import repo

    with repo.site_lock(paths):
        current = get(paths, version if isinstance(version, str) else version.id)
        if current.status == "quarantined":
            return current
        updated = replace(current, status="quarantined", quarantine_reason=reason, quarantined_at=_now())
        _write_record(paths, updated, f"Quarantine dataset {updated.id}")
        _audit(paths, action="dataset.quarantined", actor=_actor(paths, actor), object=updated.id,
               outcome="quarantined", details={"md5": updated.md5, "reason": reason[:2000]})
        return updated
