import json

import pandas as pd
import pytest
from click.testing import CliRunner

from pipelines.data import catalog
from pipelines.data.access import AccessDenied, require_access
from pipelines.data.repo import git_head
from pipelines.data.sanitize import sanitize_dataset
from pipelines.data.validate import ValidationFailed, validate_dataset
from pipelines.trust import audit


@pytest.fixture(scope="module")
def shared(origin):
    return catalog.register_dataset(origin, "shared", origin.data_dir / "shared.parquet")


def _actions(paths):
    return [(e["action"], e["object"]) for e in audit.entries(paths)]


def test_register_takes_partition_flags_and_commits_the_record(origin, shared):
    assert shared.id == f"origin/shared@{shared.md5[:12]}" and shared.kind == "raw" and shared.status == "ok"
    assert shared.flags == {"classification": "confidential", "local_only": False, "export_authorized": False,
                            "releasable_to": ["supplier"], "purposes": ["training", "collaboration"]}
    record = origin.repo / "catalog" / "shared" / f"{shared.md5}.json"
    assert json.loads(record.read_text())["path"] == "data/shared.parquet"
    from pipelines.data.repo import git
    assert git(origin, "status", "--porcelain", "--", "catalog") == ""  # committed
    assert (origin.repo / "data" / "shared.parquet.dvc").exists()
    assert ("dataset.registered", shared.id) in _actions(origin)


def test_register_is_idempotent_on_content(origin, shared):
    head = git_head(origin)
    again = catalog.register_dataset(origin, "shared", origin.data_dir / "shared.parquet")
    assert again == shared and git_head(origin) == head
    assert len(catalog.list_datasets(origin, "shared")) == 1


def test_get_by_id_prefix_and_name(origin, shared):
    assert catalog.get(origin, shared.id) == shared
    assert catalog.get(origin, f"shared@{shared.md5[:8]}") == shared
    assert catalog.latest(origin, "shared") == shared
    with pytest.raises(catalog.CatalogError, match="catalog of supplier"):
        catalog.get(origin, f"supplier/shared@{shared.md5[:12]}")


def test_private_partition_is_local_only(origin):
    private = catalog.register_dataset(origin, "private", origin.data_dir / "private.parquet")
    assert private.local_only and private.classification == "secret" and private.releasable_to == ()


def test_sanitized_version_has_the_raw_parent_and_its_flags(origin, shared):
    version, report = sanitize_dataset(origin, shared.id, "collaboration")
    assert version.kind == "sanitized" and version.parents == (shared.id,)
    assert version.flags == shared.flags and version.owner == "origin"
    assert version.extra["sanitization"]["passed"] and version.extra["sanitization"]["rows_out"] == 246
    frame, loaded = catalog.load_dataset(origin, version.id)
    assert loaded == version and "latitude" not in frame.columns and len(frame) == 246
    assert (origin.repo / "reports" / "sanitization" / f"{version.id}.md").exists()
    assert validate_dataset(origin, version, "release").success


def test_failed_validation_quarantines_and_nothing_is_lost(origin):
    bad = origin.data_dir / "incoming.parquet"
    frame = pd.read_parquet(origin.data_dir / "test.parquet").assign(callsign="VIPER")
    frame.to_parquet(bad, index=False)
    version = catalog.register_dataset(origin, "incoming", bad, flags={"classification": "confidential"})
    with pytest.raises(ValidationFailed, match="callsign"):
        validate_dataset(origin, version, "training")
    stored = catalog.get(origin, version.id)
    assert stored.status == "quarantined" and "callsign" in stored.quarantine_reason
    with pytest.raises(catalog.DatasetQuarantined, match=f"{version.id} is quarantined .*callsign"):
        catalog.load_dataset(origin, version.id)
    # the same content stays the same, quarantined version; a new version is the only fix
    assert catalog.register_dataset(origin, "incoming", bad).status == "quarantined"
    assert catalog.quarantine(origin, stored, "again").quarantine_reason == stored.quarantine_reason
    frame.drop(columns="callsign").to_parquet(bad, index=False)
    fixed = catalog.register_dataset(origin, "incoming", bad, flags={"classification": "confidential"})
    assert fixed.status == "ok" and fixed.id != version.id
    # the quarantined bytes are still held (DVC cache and remote), even though the file was overwritten
    kept = pd.read_parquet(catalog.content_path(origin, stored))
    assert "callsign" in kept.columns
    assert ("dataset.quarantined", version.id) in _actions(origin)
    audit.verify(origin)


def test_overwritten_working_file_still_loads_the_old_version(origin):
    path = origin.data_dir / "evolving.parquet"
    base = pd.read_parquet(origin.data_dir / "test.parquet")
    base.head(40).to_parquet(path, index=False)
    first = catalog.register_dataset(origin, "evolving", path, flags={"classification": "restricted"})
    base.head(50).to_parquet(path, index=False)
    second = catalog.register_dataset(origin, "evolving", path, flags={"classification": "restricted"})
    assert len(catalog.load_dataset(origin, first.id)[0]) == 40
    assert len(catalog.load_dataset(origin, "evolving")[0]) == 50 and catalog.latest(origin, "evolving") == second


def test_unknown_dataset_without_flags_is_treated_as_secret_and_local(origin):
    path = origin.data_dir / "scratch.parquet"
    pd.read_parquet(origin.data_dir / "test.parquet").head(20).to_parquet(path, index=False)
    version = catalog.register_dataset(origin, "scratch", path)
    assert version.local_only and version.classification == "secret" and not version.export_authorized


def test_data_access_gate_allows_and_denies_with_reasons(origin, shared):
    assert require_access(origin, shared, action="train", purpose="training").allow
    frame, _ = catalog.load_dataset(origin, shared.id, action="read", purpose="collaboration")
    assert len(frame) == 263
    with pytest.raises(AccessDenied) as excinfo:
        require_access(origin, shared, action="train", purpose="export")
    assert "export" in str(excinfo.value) and excinfo.value.reasons
    with pytest.raises(AccessDenied, match="svc-supplier"):
        require_access(origin, shared, action="train", purpose="training",
                       subject={"id": "svc-supplier", "site": "supplier", "roles": ["pipeline"],
                                "clearance": "restricted"})


def test_data_list_shows_versions_with_status(origin, data_home):
    from pipelines.data.cli import data

    result = CliRunner().invoke(data, ["list", "--site", "origin"], env={"FACTORY_HOME": str(data_home)})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("origin/shared@" in line and " ok " in line for line in lines)
    assert any("origin/incoming@" in line and "quarantined: " in line for line in lines)
    listed = CliRunner().invoke(data, ["list", "--site", "origin", "--json"], env={"FACTORY_HOME": str(data_home)})
    statuses = {v["name"]: v["status"] for v in json.loads(listed.output) if v["name"] != "incoming"}
    assert set(statuses.values()) == {"ok"}
