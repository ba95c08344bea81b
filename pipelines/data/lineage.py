"""Lineage proof: from a dataset or model back to the raw datasets it came from.

`lineage_entries` gives the design section 6 `model.lineage` list for datasets: every
version on the walk (the ones used and all their ancestors, back to raw), each with its
owner and flags. Derived versions carry the most restrictive flags of their sources, so a
sanitized or received dataset cannot shed a raw source's `local_only`. Parents held by
another site are resolved from the `upstream` entries their package carried; a parent that
cannot be resolved is an error (a lineage with holes proves nothing).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipelines.data import catalog
from pipelines.workspace import SitePaths

ENTRY_KEYS = ("dataset_id", "owner", "local_only", "export_authorized", "releasable_to", "md5")


def entry(version: catalog.DatasetVersion) -> dict[str, Any]:
    """One version's lineage entry. Imported data adds where it came from (`source`: path and digest)
    and every version with a data spec carries it, so a receiving site knows what the records hold."""
    described = {
        "dataset_id": version.id,
        "owner": version.owner,
        "local_only": version.local_only,
        "export_authorized": version.export_authorized,
        "releasable_to": list(version.releasable_to),
        "md5": version.md5,
        "classification": version.classification,
        "purposes": list(version.purposes),
        "kind": version.kind,
        "status": version.status,
        "parents": list(version.parents),
    }
    if "spec" in version.extra:
        described["spec"] = version.extra["spec"]
    if "source" in version.extra:
        described["source"] = _without_paths(version.extra["source"])
    return described


def _without_paths(source: Any) -> Any:
    """Where imported data came from, as it may travel with the data: formats and digests, no local
    paths (a path on the owner's machine tells a partner about the owner's systems; the owner's
    own record keeps it, `factory data show`)."""
    if isinstance(source, dict):
        return {key: _without_paths(value) for key, value in source.items() if key != "path"}
    return source


def lineage_entries(paths: SitePaths, dataset_ids: Iterable[str]) -> list[dict[str, Any]]:
    """The flattened lineage of the given datasets: each version once, used ones first."""
    out: dict[str, dict[str, Any]] = {}

    def walk(ref: str, upstream: tuple[dict, ...]) -> None:
        known = {e["dataset_id"]: e for e in upstream if "dataset_id" in e}
        if ref in out:
            return
        if ref in known and not _local(paths, ref):
            for item in upstream:  # the sender's own walk, already flattened
                out.setdefault(item["dataset_id"], dict(item))
            return
        if not _local(paths, ref):
            raise catalog.CatalogError(
                f"lineage incomplete: {ref} is held by another site and no upstream entry describes it"
            )
        version = catalog.get(paths, ref)
        out[version.id] = entry(version)
        for parent in version.parents:
            walk(parent, version.upstream)

    for ref in dataset_ids:
        walk(ref, ())
    return list(out.values())


def _local(paths: SitePaths, ref: str) -> bool:
    return ref.split("/", 1)[0] == paths.site


def model_lineage(metadata: dict[str, Any]) -> list[dict[str, Any]]:
    """The `lineage` list a model's metadata.json records (written by the training code)."""
    return list(metadata.get("lineage") or [])


def render_text(title: str, entries: list[dict[str, Any]], base_model: dict | None = None) -> str:
    """The lineage as an indented tree with flags, for people."""
    by_id = {e["dataset_id"]: e for e in entries}
    children = {p for e in entries for p in e.get("parents") or []}
    roots = [e for e in entries if e["dataset_id"] not in children]
    lines = [title]
    if base_model:
        lines.append(
            f"  base model {base_model.get('name')}/{base_model.get('version')} ({base_model.get('digest')})"
        )

    def flags(e: dict) -> str:
        marks = [
            e.get("classification", "?"),
            "LOCAL-ONLY" if e.get("local_only") else "shareable",
            "export-authorized" if e.get("export_authorized") else "not export-authorized",
            "releasable to " + (", ".join(e.get("releasable_to") or []) or "nobody"),
        ]
        if e.get("status") == "quarantined":
            marks.append("QUARANTINED")
        if "dp" in e:  # a model's lineage: the privacy spent on this source along the model's chain
            dp = e["dp"]
            marks.append(f"DP epsilon {dp['epsilon']:.2f}, delta {dp['delta']:g}" if dp else "trained without DP")
        return f"{e['dataset_id']} [{e.get('kind', '?')}, owner {e.get('owner')}] " + "; ".join(marks)

    def show(e: dict, depth: int, seen: set) -> None:
        lines.append("  " * depth + "<- " + flags(e))
        source = e.get("source")
        if source:
            lines.append("  " * (depth + 1) + f"imported from a {source.get('format', 'file')} ({source.get('digest')})")
        if e["dataset_id"] in seen:
            return
        for parent in e.get("parents") or []:
            if parent in by_id:
                show(by_id[parent], depth + 1, seen | {e["dataset_id"]})
            else:
                lines.append("  " * (depth + 1) + f"<- {parent} (held elsewhere)")

    for root in roots:
        show(root, 1, set())
    return "\n".join(lines)
