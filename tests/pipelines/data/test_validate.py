import json

import numpy as np
import pytest

from pipelines.data import schema
from pipelines.data.builder import build_frames
from pipelines.data.sanitize import sanitize
from pipelines.data.validate import SUITES_DIR, ValidationFailed, read_for_validation, validate, validate_file
from pipelines.workspace import SitePaths


@pytest.fixture(scope="module")
def raw():
    return build_frames("origin")[0]["private"]


@pytest.fixture(scope="module")
def clean(raw):
    return sanitize(raw, "origin", "collaboration")[0]


def _failed(excinfo):
    return {(f["expectation"], f["column"]) for f in excinfo.value.result.failures}


def test_suites_cover_every_feature():
    for name in ("training", "release"):
        suite = json.loads((SUITES_DIR / f"{name}.json").read_text())
        ranged = {e["kwargs"]["column"] for e in suite["expectations"] if e["type"] == "expect_column_max_to_be_between"}
        assert ranged == set(schema.FEATURE_COLUMNS)


def test_clean_data_passes_both_suites(raw, clean):
    assert validate(raw, "training").success
    result = validate(clean, "release")
    assert result.success and not result.failures and result.evaluated >= 190


def test_raw_data_fails_release_naming_the_sensitive_columns(raw):
    with pytest.raises(ValidationFailed) as excinfo:
        validate(raw, "release")
    (failure,) = excinfo.value.result.failures
    assert failure["expectation"] == "expect_table_columns_to_exclude_sensitive_names"
    assert set(failure["observed"]) == {"sensor_serial", "latitude", "longitude", "mission_id", "operator"}
    assert "latitude" in str(excinfo.value)


@pytest.mark.parametrize("suite", ["training", "release"])
def test_unknown_sensitive_looking_columns_fail(clean, suite):
    with pytest.raises(ValidationFailed) as excinfo:
        validate(clean.assign(gps_lat=1.0, callsign="X"), suite)
    assert excinfo.value.result.failures[0]["observed"] == ["gps_lat", "callsign"]
    assert "gps_lat" in str(excinfo.value) and "callsign" in str(excinfo.value)


def test_wrong_types_nulls_and_ranges_are_each_named(clean):
    bad = clean.copy()
    bad["f01"] = bad["f01"].astype("float64")
    bad.loc[3, "f02"] = np.nan
    bad.loc[4, "f05"] = 1.5
    bad.loc[5, "f06"] = -0.25
    bad["label"] = bad["label"].astype(str)
    with pytest.raises(ValidationFailed) as excinfo:
        validate(bad, "release")
    failed = _failed(excinfo)
    assert ("expect_column_proportion_of_non_null_values_to_be_between", "f02") in failed
    assert ("expect_column_max_to_be_between", "f05") in failed
    assert ("expect_column_min_to_be_between", "f06") in failed
    (types,) = [f for f in excinfo.value.result.failures if f["expectation"] == "expect_table_column_types_to_match"]
    assert types["observed"] == {"f01": "float64", "label": "object"} and types["column"] == "f01, label"
    message = str(excinfo.value)
    assert "expect_column_max_to_be_between on f05 (observed 1.5)" in message
    assert "expect_table_column_types_to_match on f01, label" in message


def test_labels_outside_the_digits_and_missing_columns_fail(clean):
    bad = clean.drop(columns=["f10"]).assign(label=clean["label"].where(clean.index != 0, 42))
    with pytest.raises(ValidationFailed) as excinfo:
        validate(bad, "training")
    failed = _failed(excinfo)
    assert ("expect_column_distinct_values_to_be_in_set", "label") in failed
    assert ("expect_table_columns_to_match_set", None) in failed
    assert ("expect_column_max_to_be_between", "f10") in failed  # a missing column fails, never crashes


def test_too_few_rows_fail(clean):
    with pytest.raises(ValidationFailed, match="expect_table_row_count_to_be_between"):
        validate(clean.head(3), "training")


def test_corrupt_parquet_is_a_failure_not_a_crash(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ValidationFailed, match="readable_parquet.*broken.parquet"):
        validate_file(bad, "training")
    with pytest.raises(ValidationFailed, match="readable_parquet"):
        read_for_validation(bad)
    assert not validate_file(bad, "training", check=False).success


def test_result_saved_docs_rendered_and_logged_to_mlflow(tmp_path, clean):
    import mlflow

    paths = SitePaths.of("origin", tmp_path)
    paths.mlflow_dir.mkdir(parents=True)
    mlflow.set_tracking_uri(paths.mlflow_uri)
    experiment = mlflow.create_experiment("validation-test", artifact_location=paths.mlflow_artifacts.as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        result = validate(clean, "release", site_paths=paths, dataset_id="origin/private-sanitized@0123456789ab")
    saved = json.loads((paths.state_dir / "validation" / "origin" / "private-sanitized@0123456789ab.json").read_text())
    assert saved["success"] and saved["suite"] == "release"
    assert result.data_docs == paths.root / "data-docs" / "index.html" and result.data_docs.exists()
    assert list((paths.root / "data-docs" / "validations").rglob("*.html"))
    logged = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/validation/release/origin_private-sanitized@0123456789ab.json")
    assert logged["success"] is True
    mlflow.set_tracking_uri(None)
