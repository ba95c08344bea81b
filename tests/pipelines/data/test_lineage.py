import json
import shutil

import pytest
from click.testing import CliRunner

from pipelines.data import catalog
from pipelines.data.lineage import lineage_entries
from pipelines.data.sanitize import sanitize_dataset


@pytest.fixture(scope="module")
def flows(origin, supplier):
    """Origin sanitizes its export-authorized subset; the supplier receives it beside its own data."""
    export_raw = catalog.register_dataset(origin, "export_authorized", origin.data_dir / "export_authorized.parquet")
    private = catalog.register_dataset(origin, "private", origin.data_dir / "private.parquet")
    export_clean, _ = sanitize_dataset(origin, export_raw.id, "export")
    target = supplier.data_dir / "received" / "origin-export.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(catalog.content_path(origin, export_clean), target)
    received = catalog.register_dataset(
        supplier, "origin-export", target, parents=[export_clean.id], kind="received", owner="origin",
        flags=export_clean.flags, upstream=lineage_entries(origin, [export_clean.id]),
    )
    train = catalog.register_dataset(supplier, "train", supplier.data_dir / "train.parquet")
    return {"export_raw": export_raw, "private": private, "export_clean": export_clean,
            "received": received, "train": train}


def test_lineage_of_export_authorized_sources_shows_only_those(supplier, flows):
    entries = lineage_entries(supplier, [flows["train"].id, flows["received"].id])
    ids = [e["dataset_id"] for e in entries]
    assert ids == [flows["train"].id, flows["received"].id, flows["export_clean"].id, flows["export_raw"].id]
    assert all(e["export_authorized"] and not e["local_only"] for e in entries)
    assert all("destination" in e["releasable_to"] for e in entries)
    raw = entries[-1]
    assert raw["kind"] == "raw" and raw["owner"] == "origin" and raw["md5"] == flows["export_raw"].md5


def test_mixing_in_a_local_only_dataset_shows_it(origin, flows):
    entries = lineage_entries(origin, [flows["export_clean"].id, flows["private"].id])
    local = [e["dataset_id"] for e in entries if e["local_only"]]
    assert local == [flows["private"].id]


def test_derived_data_keeps_the_most_restrictive_flags(origin, flows):
    mixed = origin.data_dir / "mixed.parquet"
    shutil.copyfile(origin.data_dir / "private.parquet", mixed)
    version = catalog.register_dataset(origin, "mixed", mixed, kind="derived",
                                       parents=[flows["export_raw"].id, flows["private"].id],
                                       flags={"local_only": False, "releasable_to": ["destination"]})
    assert version.local_only and version.classification == "secret" and version.releasable_to == ()
    assert not version.export_authorized


def test_received_parent_without_upstream_is_described_by_the_declared_flags(supplier, flows):
    target = supplier.data_dir / "received" / "origin-export-2.parquet"
    shutil.copyfile(catalog.content_path(supplier, flows["received"]), target)
    version = catalog.register_dataset(supplier, "origin-export-2", target, parents=["origin/private@0123456789ab"],
                                       kind="received", owner="origin", flags=flows["private"].flags)
    entries = lineage_entries(supplier, [version.id])
    assert [e["dataset_id"] for e in entries] == [version.id, "origin/private@0123456789ab"]
    assert all(e["local_only"] for e in entries)
    with pytest.raises(catalog.CatalogError, match="pass its lineage"):
        catalog.register_dataset(supplier, "origin-export-3", target, parents=["origin/x@0123456789ab"],
                                 kind="received", owner="origin")


def test_lineage_show_prints_the_graph_and_the_gate_list(supplier, flows, data_home):
    from pipelines.data.cli import lineage

    env = {"FACTORY_HOME": str(data_home)}
    shown = CliRunner().invoke(lineage, ["show", "--site", "supplier", flows["received"].id], env=env)
    assert shown.exit_code == 0, shown.output
    assert flows["export_raw"].id in shown.output and "export-authorized" in shown.output
    as_json = CliRunner().invoke(lineage, ["show", "--site", "supplier", "origin-export", "--json"], env=env)
    assert json.loads(as_json.output) == lineage_entries(supplier, [flows["received"].id])


def test_lineage_show_unknown_model_fails_with_one_line(supplier, data_home):
    from pipelines.data.cli import lineage

    result = CliRunner().invoke(lineage, ["show", "--site", "supplier", "M7"], env={"FACTORY_HOME": str(data_home)})
    assert result.exit_code == 1
    assert "error:" in result.output and "M7" in result.output
