import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from pipelines.data import schema
from pipelines.data.builder import build_frames, build_site_data
from pipelines.data.sanitize import SanitizationError, read_report, sanitize, sanitize_file
from pipelines.workspace import SitePaths


@pytest.fixture(scope="module")
def origin_frames():
    frames, defects = build_frames("origin")
    return frames, defects


def _removed(report, rule):
    return {rid for r in report["rules"] if r["rule"] == rule for rid in r["removed"]}


def test_sanitize_removes_exactly_the_injected_defects(tmp_path):
    paths = SitePaths.of("origin", tmp_path)
    files = build_site_data(paths)
    defects = json.loads((paths.data_dir / "injected_defects.json").read_text())
    raw = pd.read_parquet(files[defects["partition"]])
    clean, report = sanitize(raw, "origin", "collaboration")
    assert _removed(report, "critical_outliers") == set(defects["outliers"])
    assert _removed(report, "contradictory_duplicates") == set(defects["contradictory_duplicates"])
    assert _removed(report, "exact_duplicates") == set(defects["exact_duplicates"])
    injected = {*defects["outliers"], *defects["contradictory_duplicates"], *defects["exact_duplicates"]}
    assert report["rows_in"] - report["rows_out"] == len(injected)  # no clean record removed
    assert set(raw[schema.ID_COLUMN]) - set(clean[schema.ID_COLUMN]) == injected
    assert report["passed"] and report["remaining_sensitive_columns"] == []


@pytest.mark.parametrize(("site", "purpose"), [("origin", "collaboration"), ("destination", "collaboration"),
                                               ("destination", "contribution"), ("supplier", "training")])
def test_sanitize_keeps_every_clean_record(site, purpose):
    frames, _ = build_frames(site)
    for name, frame in frames.items():
        if site == "origin" and name == "shared":
            continue  # the one partition with injected defects
        _, report = sanitize(frame, site, purpose)
        assert report["rows_out"] == report["rows_in"], (name, report["rules"])


def test_sanitize_drops_and_coarsens_metadata(origin_frames):
    frames, _ = origin_frames
    raw = frames["private"]
    clean, report = sanitize(raw, "origin", "collaboration")
    for column in ("sensor_serial", "operator", "mission_id", "latitude", "longitude"):
        assert column not in clean.columns and column in report["columns_removed"]
    times = clean["capture_time"]
    assert (times == times.dt.floor("D")).all() and not (raw["capture_time"] == raw["capture_time"].dt.floor("D")).all()
    assert report["remaining_columns"] == [schema.ID_COLUMN, *schema.FEATURE_COLUMNS, schema.LABEL_COLUMN,
                                           "capture_time"]


def test_export_purpose_coarsens_capture_time_to_the_week(origin_frames):
    clean, report = sanitize(origin_frames[0]["export_authorized"], "origin", "export")
    assert (clean["capture_time"].dt.weekday == 0).all()
    assert (clean["capture_time"] == clean["capture_time"].dt.floor("D")).all()
    assert report["columns_coarsened"]["capture_time"] == "truncated to the week"


def test_training_purpose_rounds_geo_and_reports_it_as_sensitive(origin_frames):
    clean, report = sanitize(origin_frames[0]["private"], "origin", "training")
    assert np.allclose((clean["latitude"] / 0.5).round(), clean["latitude"] / 0.5)
    assert set(report["remaining_sensitive_columns"]) == {"latitude", "longitude"}
    assert report["passed"]  # allowed for training at the site, never for a release


def test_unknown_sensitive_column_fails_a_release_sanitization(origin_frames):
    raw = origin_frames[0]["private"].assign(callsign="VIPER-1")
    _, report = sanitize(raw, "origin", "collaboration")
    assert not report["passed"]
    assert report["remaining_sensitive_columns"] == ["callsign"]
    assert "callsign" in report["problems"][0]


def test_unknown_purpose_is_refused(origin_frames):
    with pytest.raises(SanitizationError, match="purpose 'evaluation'.*allowed purposes: collaboration"):
        sanitize(origin_frames[0]["private"], "origin", "evaluation")


def test_missing_feature_columns_are_named(origin_frames):
    with pytest.raises(SanitizationError, match="missing required columns f03, label"):
        sanitize(origin_frames[0]["private"].drop(columns=["f03", "label"]), "origin", "collaboration")


def test_sanitize_file_digests_match_the_files(tmp_path, origin_frames):
    source = tmp_path / "in.parquet"
    origin_frames[0]["shared"].to_parquet(source, index=False)
    report = sanitize_file(source, tmp_path / "out.parquet", "origin", "collaboration")
    assert report["input_digest"] == "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest()
    assert report["output_digest"] == "sha256:" + hashlib.sha256((tmp_path / "out.parquet").read_bytes()).hexdigest()
    assert read_report(tmp_path, "out.sanitization") == json.loads(json.dumps(report, default=str))
    summary = (tmp_path / "out.sanitization.md").read_text()
    assert "| critical_outliers | 6 |" in summary and "rows: 263 in, 246 out" in summary


def test_sanitize_file_refuses_corrupt_parquet(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SanitizationError, match="cannot read Parquet file .*bad.parquet"):
        sanitize_file(bad, tmp_path / "out.parquet", "origin", "collaboration")
    assert not (tmp_path / "out.parquet").exists()
