"""The site's list of revoked model versions: what a withdrawn contribution took out of service.

A revoked version keeps its registry entry (it still resolves by NAME/VERSION, for inspection) and
is marked twice: in the site-local list `state/revoked-models.json`, written first and atomically,
which `factory serve` reads on every request through `RevocationWatch` (one `stat` while nothing
changed), and in the MLflow registry as the model-version tag `factory.revoked`
(`pipelines.learning.registry.mark_revoked`). The list holds, per local `name/version`:
`{revocation_id, dataset, owner, replaced_by, at, name, version, run_key}`. The run key names the
trained artefact everywhere it travels (the trainer's and each partner's registry tag
`factory.run_key`), so a site refuses at intake a model it knows is revoked.

A leaf module: the registry, serving and steps read it; it imports none of them.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from pipelines.fileio import read_json, update_json
from pipelines.workspace import SitePaths

LIST_NAME = "revoked-models.json"
RECORD_KEYS = ("revocation_id", "dataset", "owner", "replaced_by", "at")


def list_path(paths: SitePaths) -> Path:
    return paths.state_dir / LIST_NAME


def revoked_models(paths: SitePaths) -> dict[str, dict[str, Any]]:
    """Every revoked version of this site: `name/version` -> its record ({} when none is revoked)."""
    try:
        data = read_json(list_path(paths))
    except FileNotFoundError:
        return {}
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ValueError(f"{list_path(paths)} holds no 'models' object")
    return models


def record_revoked(paths: SitePaths, *, name: str, version: str, run_key: str | None,
                   revocation: dict[str, Any]) -> dict[str, Any]:
    """Add (or update: a later `replaced_by`) the list entry of `name/version`; returns the entry."""
    entry = {**{k: revocation.get(k) for k in RECORD_KEYS}, "name": name, "version": str(version),
             "run_key": run_key}
    with update_json(list_path(paths), {"models": {}}) as data:
        models = data.setdefault("models", {})
        key = f"{name}/{version}"
        known = models.get(key) or {}
        if not known.get("revocation_id") or known["revocation_id"] == revocation.get("revocation_id"):
            # the same revocation again (a resumed run): fills in what it now knows, e.g. `replaced_by`
            models[key] = {**known, **{k: v for k, v in entry.items() if v is not None or k not in known}}
        # else: the first revocation of a version stands
        return dict(models[key])


def revoked_run(paths: SitePaths, name: str, run_key: str | None) -> dict[str, Any] | None:
    """The list entry of a revoked version of `name` trained in run `run_key` (None when there is none)."""
    if not run_key:
        return None
    return next((entry for entry in revoked_models(paths).values()
                 if entry.get("name") == name and entry.get("run_key") == run_key), None)


def describe(record: dict[str, Any]) -> str:
    """One line naming a revocation, for error messages and HTTP answers."""
    replaced = f"; replaced by {record['replaced_by']}" if record.get("replaced_by") else ""
    return (f"revoked by revocation {record.get('revocation_id')} (dataset {record.get('dataset')} withdrawn by "
            f"{record.get('owner')}{replaced})")


class RevocationWatch:
    """Whether one served version is revoked, read from the site's list only when the file changed.

    `check()` costs one `os.stat` while the list is unchanged (its mtime, size and inode are the
    cache key). An unreadable list fails closed: the version is treated as revoked, naming why."""

    def __init__(self, paths: SitePaths, name: str, version: str) -> None:
        self.path = list_path(paths)
        self.paths = paths
        self.uri = f"{name}/{version}"
        self._lock = threading.Lock()
        self._key: tuple[int, int, int] | None = None
        self._record: dict[str, Any] | None = None

    def check(self) -> dict[str, Any] | None:
        try:
            st = os.stat(self.path)
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            key = (0, 0, 0)
        if key == self._key:
            return self._record
        with self._lock:
            try:
                record = revoked_models(self.paths).get(self.uri) if key != (0, 0, 0) else None
            except (OSError, ValueError) as error:
                record = {"revocation_id": None, "reason": f"the site's revocation list is unreadable: {error}"}
            self._key, self._record = key, record
            return record
