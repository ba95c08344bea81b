from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd

from pipelines.data import builder
from pipelines.data.schema import ALL_COLUMNS, FEATURE_COLUMNS, PARTITIONS
from pipelines.workspace import SitePaths


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_builder_writes_byte_identical_files(tmp_path):
    first = builder.build_site_data(SitePaths.of("origin", tmp_path / "a"))
    second = builder.build_site_data(SitePaths.of("origin", tmp_path / "b"))
    assert {k: _digest(v) for k, v in first.items()} == {k: _digest(v) for k, v in second.items()}
    assert sorted(first) == sorted(PARTITIONS["origin"])


def test_partitions_do_not_overlap_across_parties():
    seen_ids: set[str] = set()
    x_all, _ = builder.digits()
    for site in PARTITIONS:
        frames, _ = builder.build_frames(site)
        for partition, frame in frames.items():
            assert list(frame.columns) == list(ALL_COLUMNS)
            ids = set(frame["record_id"])
            assert not ids & seen_ids, f"{site}/{partition} reuses record ids"
            seen_ids |= ids
    indices = builder._split_indices(len(x_all))
    flat = np.concatenate([idx for parts in indices.values() for idx in parts.values()])
    assert len(flat) == len(set(flat.tolist())) == len(x_all)


def test_origin_records_injected_defects(tmp_path):
    paths = SitePaths.of("origin", tmp_path)
    builder.build_site_data(paths)
    defects = json.loads((paths.data_dir / "injected_defects.json").read_text())
    shared = pd.read_parquet(paths.data_dir / "shared.parquet")
    for key in ("outliers", "contradictory_duplicates", "exact_duplicates"):
        assert defects[key] and set(defects[key]) <= set(shared["record_id"])
    contradictory = shared[shared["record_id"].isin(defects["contradictory_duplicates"])]
    groups = contradictory.groupby(list(FEATURE_COLUMNS))["label"].nunique()
    assert (groups > 1).all()


def test_sensor_effects_differ_between_parties():
    means = {site: builder.build_frames(site)[0]["test"][list(FEATURE_COLUMNS)].to_numpy().mean() for site in PARTITIONS}
    assert means["origin"] != means["supplier"] != means["destination"]
    x, _ = builder.digits()
    assert not np.allclose(builder.destination_sensor(x[:5]), x[:5])


def test_scale_augments_the_training_data_and_keeps_the_real_test_images():
    default, _ = builder.build_frames("supplier")
    frames, _ = builder.build_frames("supplier", scale=18000)
    assert 4000 <= len(frames["train"]) <= 5000  # train is 450 of the 1,797 images: a quarter of 18,000
    assert frames["train"][list(FEATURE_COLUMNS)].to_numpy().max() <= 1.0
    kept = [*FEATURE_COLUMNS, "label"]  # the same images; ids and capture metadata are drawn anew
    assert frames["test"][kept].equals(default["test"][kept])
