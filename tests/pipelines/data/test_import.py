"""`factory data import`: image folders and tabular files the test writes itself, into a real site repo."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from pipelines.data import catalog
from pipelines.data.importer import ImportRefused, import_dataset
from pipelines.data.lineage import lineage_entries
from pipelines.data.repo import dvc_md5, git, git_head
from pipelines.data.sanitize import sanitize_dataset
from pipelines.data.spec import DataSpec, spec_of
from pipelines.data.validate import ValidationFailed, suite_for, validate, validate_dataset

CLASSES = ("armour", "truck", "van")  # folder names; sorted, they are the classes
PER_CLASS = 10
FEATURES = [f"x{i}" for i in range(7)]
LABELS = ("alpha", "bravo", "charlie", "delta")


@pytest.fixture(scope="module")
def site(data_home):
    """origin's repo and keys, without the digits demo data."""
    from pipelines.data.repo import init_site_repo
    from pipelines.trust.keys import ensure_site_keys
    from pipelines.workspace import SitePaths

    paths = SitePaths.of("origin", data_home)
    init_site_repo(paths)
    ensure_site_keys(paths)
    return paths


def _image(rng, mode="RGB", size=(12, 12)) -> Image.Image:
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def write_images(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for label in CLASSES:
        (root / label).mkdir(parents=True)
        for i in range(PER_CLASS):
            _image(rng).save(root / label / f"img{i:02d}.png")
    return root


def write_metadata(path: Path, rows: list[str] | None = None) -> Path:
    lines = rows if rows is not None else [
        f"{label}/img{i:02d}.png,S-{i % 3},2024-05-{1 + i:02d}T10:30:00Z,{52.0 + i / 100:.2f}"
        for label in CLASSES[:2] for i in range(PER_CLASS)
    ]
    path.write_text("file,sensor,capture_time,latitude\n" + "\n".join(lines) + "\n")
    return path


def tabular_frame(n: int = 120, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(0, 1, (n, len(FEATURES))).round(4) * [1, 10, 100, 1, 1, 1, 1000], columns=FEATURES)
    frame.insert(3, "label", [LABELS[i % len(LABELS)] for i in range(n)])
    frame["operator"] = [f"op-{i % 5}" for i in range(n)]
    return frame


def write_csv(path: Path, frame: pd.DataFrame | None = None) -> Path:
    (frame if frame is not None else tabular_frame()).to_csv(path, index=False)
    return path


def _state(paths) -> dict:
    """Everything a refused import must leave as it was."""
    return {
        "head": git_head(paths),
        "versions": [v.id for v in catalog.list_datasets(paths)],
        "files": sorted(str(p.relative_to(paths.repo)) for p in paths.repo.rglob("*") if ".git" not in p.parts
                        and ".dvc" not in p.parts[:1]),
        "status": git(paths, "status", "--porcelain"),
    }


@pytest.fixture(scope="module")
def images(site, tmp_path_factory):
    root = write_images(tmp_path_factory.mktemp("images") / "vehicles")
    meta = write_metadata(root.parent / "meta.csv")
    result = import_dataset(site, "vehicles", root, metadata=meta, partition="shared")
    return root, meta, result


@pytest.fixture(scope="module")
def table(site, tmp_path_factory):
    path = write_csv(tmp_path_factory.mktemp("tabular") / "readings.csv")
    return path, import_dataset(site, "readings", path, chunk_rows=25)


def test_image_folder_becomes_a_version_with_its_spec(site, images):
    root, _, result = images
    version = result.version
    assert result.created and result.rows == len(CLASSES) * PER_CLASS
    assert version.kind == "raw" and version.id == f"origin/vehicles@{version.md5[:12]}"
    assert version.flags == catalog.partition_flags("origin", "shared") | {"releasable_to": ["supplier"],
                                                                         "purposes": ["training", "collaboration"]}
    spec = spec_of(version.extra)
    assert spec == DataSpec(kind="image", input_shape=(3, 12, 12), feature_columns=("pixels",), classes=CLASSES,
                            encoding="pixels",
                            metadata_columns={"sensor": "object", "capture_time": "datetime64[ns, UTC]",
                                              "latitude": "float64"},
                            sensitive_columns=("latitude",))
    frame, _ = catalog.load_dataset(site, version.id)
    assert list(frame.columns) == list(spec.columns)
    assert frame["label"].tolist() == [k for k in range(len(CLASSES)) for _ in range(PER_CLASS)]
    # the pixels are the image's, channel first; metadata where the CSV has a row, null elsewhere
    row = frame.iloc[PER_CLASS + 3]
    original = np.asarray(Image.open(root / "truck" / "img03.png"))
    assert np.array_equal(np.frombuffer(row["pixels"], np.uint8).reshape(3, 12, 12), original.transpose(2, 0, 1))
    assert row["sensor"] == "S-0" and row["latitude"] == 52.03
    assert row["capture_time"] == pd.Timestamp("2024-05-04T10:30:00Z")
    assert frame.loc[frame["label"] == 2, "sensor"].isna().all()
    assert np.allclose(spec.features(frame)[PER_CLASS + 3], original.transpose(2, 0, 1).ravel() / 255.0)


def test_import_is_dvc_tracked_pushed_and_committed(site, images):
    version = images[2].version
    data = site.data_dir / "imported" / "vehicles.parquet"
    assert version.path == data.resolve() and dvc_md5(data) == version.md5
    assert (site.dvc_remote / "files" / "md5" / version.md5[:2] / version.md5[2:]).is_file()
    tracked = git(site, "ls-files").splitlines()
    suite = f"expectations/vehicles/{version.md5}.json"
    assert {"data/imported/vehicles.parquet.dvc", f"catalog/vehicles/{version.md5}.json", suite} <= set(tracked)
    assert version.extra["expectations"] == suite
    assert git(site, "status", "--porcelain") == ""
    assert not list(site.repo.rglob("*.tmp"))


def test_lineage_names_the_source_and_its_digest(site, images):
    root, meta, result = images
    (entry,) = lineage_entries(site, [result.version.id])
    manifest = hashlib.sha256()
    for label in CLASSES:
        for i in range(PER_CLASS):
            rel = f"{label}/img{i:02d}.png"
            manifest.update(f"{hashlib.sha256((root / rel).read_bytes()).hexdigest()}  {rel}\n".encode())
    assert entry["source"]["format"] == "image-folder"
    assert entry["source"]["digest"] == f"sha256:{manifest.hexdigest()}"
    assert entry["source"]["metadata"] == {"digest": "sha256:" + hashlib.sha256(meta.read_bytes()).hexdigest()}
    assert str(root) not in json.dumps(entry)  # lineage travels with releases: no path on the owner's machine
    assert result.version.extra["source"]["path"] == str(root)  # the owner's own record keeps it
    assert entry["spec"] == result.version.extra["spec"] and entry["kind"] == "raw" and entry["parents"] == []


def test_derived_suite_passes_the_data_and_fails_a_corrupted_copy(site, images):
    version = images[2].version
    suite = json.loads((site.repo / version.extra["expectations"]).read_text())
    kinds = {e["type"] for e in suite["expectations"]}
    assert {"expect_table_column_types_to_match", "expect_column_distinct_values_to_be_in_set",
            "expect_column_values_to_be_bytes_of_length"} <= kinds
    not_null = {e["kwargs"]["column"] for e in suite["expectations"]
                if e["type"] == "expect_column_proportion_of_non_null_values_to_be_between"}
    assert {"record_id", "label", "pixels"} <= not_null and "sensor" not in not_null  # sensor has nulls
    assert validate_dataset(site, version.id, "training").success

    frame, _ = catalog.load_dataset(site, version.id)
    frame.loc[0, "label"] = 7  # no such class
    frame.loc[1, "pixels"] = b"\x00" * 10  # not 3x12x12
    corrupt = site.data_dir / "vehicles-corrupt.parquet"
    frame.to_parquet(corrupt, index=False)
    copy = catalog.register_dataset(site, "vehicles-corrupt", corrupt, parents=[version.id], kind="derived")
    assert copy.extra["spec"] == version.extra["spec"]  # a derived version takes its parent's spec
    with pytest.raises(ValidationFailed) as excinfo:
        validate_dataset(site, copy.id, "training")
    failed = {(f["expectation"], f["column"]) for f in excinfo.value.result.failures}
    assert failed == {("expect_column_distinct_values_to_be_in_set", "label"),
                      ("expect_column_values_to_be_bytes_of_length", "pixels")}
    assert catalog.get(site, copy.id).status == "quarantined"


def test_tabular_csv_features_labels_metadata_and_ranges(site, table):
    path, result = table
    source = pd.read_csv(path)
    spec = result.spec
    assert spec.kind == "tabular" and spec.encoding == "columns" and spec.input_shape == (7,)
    assert spec.feature_columns == tuple(FEATURES) and spec.classes == LABELS
    assert spec.metadata_columns == {"operator": "object"} and spec.sensitive_columns == ("operator",)
    frame, version = catalog.load_dataset(site, result.version.id)
    assert version.local_only and version.classification == "secret"  # no partition: the most restricted
    assert frame["record_id"].tolist()[:2] == ["readings-0000000", "readings-0000001"]
    assert frame["record_id"].is_unique and len(frame) == len(source) == result.rows
    assert frame[FEATURES].dtypes.eq("float32").all()
    assert np.array_equal(frame[FEATURES].to_numpy(), source[FEATURES].to_numpy(np.float32))
    assert [spec.classes[k] for k in frame["label"]] == source["label"].tolist()
    assert version.extra["import"]["class_counts"] == {label: 30 for label in LABELS}
    suite = json.loads((site.repo / version.extra["expectations"]).read_text())
    ranges = {e["kwargs"]["column"]: (e["kwargs"]["min_value"], e["kwargs"]["max_value"])
              for e in suite["expectations"] if e["type"] == "expect_column_max_to_be_between"}
    assert ranges == {c: (float(np.float32(source[c].min())), float(np.float32(source[c].max()))) for c in FEATURES}
    assert version.extra["source"] == {"path": str(path), "format": "csv",
                                       "digest": "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()}


def test_tabular_suite_checks_ranges_nulls_and_sensitive_columns(site, table):
    version = table[1].version
    frame, _ = catalog.load_dataset(site, version.id)
    training = suite_for(site, version, "training")
    assert validate(frame, training).success
    bad = frame.copy()
    bad.loc[0, "x2"] = np.float32(frame["x2"].max() + 1)
    bad.loc[1, "x5"] = np.nan
    result = validate(bad, training, check=False)
    assert {(f["expectation"], f["column"]) for f in result.failures} == {
        ("expect_column_max_to_be_between", "x2"), ("expect_column_proportion_of_non_null_values_to_be_between", "x5")}
    release = validate(frame, suite_for(site, version, "release"), check=False)
    assert [(f["expectation"], f["observed"]) for f in release.failures] == [
        ("expect_table_columns_to_exclude_sensitive_names", ["operator"])]


def test_sanitized_tabular_data_keeps_a_narrowed_spec_and_passes_release(site, table):
    version, report = sanitize_dataset(site, table[1].version.id, "collaboration")
    assert report["passed"] and report["columns_removed"] == ["operator"]
    assert spec_of(version.extra) == table[1].spec.keep_columns(["record_id", *FEATURES, "label"])
    assert validate_dataset(site, version.id, "release").success


def test_importing_the_same_content_again_changes_nothing(site, images, table):
    root, meta, first = images
    before = _state(site)
    again = import_dataset(site, "vehicles", root, metadata=meta, partition="shared")
    assert not again.created and again.version == first.version
    assert "already imported as origin/vehicles@" in again.message()
    path, tabular = table
    assert import_dataset(site, "readings", path, chunk_rows=1000).version == tabular.version  # chunks do not matter
    assert _state(site) == before


def test_parquet_file_with_given_classes(site, tmp_path):
    frame = tabular_frame(40)
    path = tmp_path / "readings.parquet"
    frame.to_parquet(path, index=False)
    result = import_dataset(site, "readings-pq", path, classes=["delta", "charlie", "bravo", "alpha"],
                            metadata_columns=["x6"])
    assert result.spec.classes == ("delta", "charlie", "bravo", "alpha")
    assert result.spec.feature_columns == tuple(FEATURES[:6]) and list(result.spec.metadata_columns) == ["x6", "operator"]
    stored, _ = catalog.load_dataset(site, result.version.id)
    assert [result.spec.classes[k] for k in stored["label"]] == frame["label"].tolist()


def test_resize_imports_mixed_sizes_and_modes(site, tmp_path):
    root = write_images(tmp_path / "mixed", seed=3)
    rng = np.random.default_rng(4)
    _image(rng, "L", (20, 16)).save(root / "van" / "gray.png")
    _image(rng, "RGB", (9, 7)).convert("RGB").save(root / "van" / "small.jpg", quality=95)
    result = import_dataset(site, "mixed", root, resize="16x16")
    assert result.spec.input_shape == (3, 16, 16) and result.rows == len(CLASSES) * PER_CLASS + 2
    frame, _ = catalog.load_dataset(site, result.version.id)
    assert frame["pixels"].map(len).eq(3 * 16 * 16).all()


# ---------------------------------------------------------------------------- refused input


def _csv_lines(path: Path, change) -> Path:
    lines = write_csv(path).read_text().splitlines()
    change(lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def _set(lines, number, column, value):
    header = lines[0].split(",")
    cells = lines[number - 1].split(",")
    cells[header.index(column)] = value
    lines[number - 1] = ",".join(cells)


def bad_image(tmp):
    root = write_images(tmp / "imgs")
    (root / "truck" / "img04.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really an image")
    return dict(source=root), str(root / "truck" / "img04.png"), None, "unreadable image"


def mixed_sizes(tmp):
    root = write_images(tmp / "imgs")
    _image(np.random.default_rng(9), size=(12, 10)).save(root / "van" / "img05.png")
    return dict(source=root), str(root / "van" / "img05.png"), None, "--resize"


def mixed_modes(tmp):
    root = write_images(tmp / "imgs")
    _image(np.random.default_rng(9), mode="L").save(root / "armour" / "img07.png")
    return dict(source=root), str(root / "armour" / "img07.png"), None, "is a L image"


def metadata_unknown_file(tmp):
    root = write_images(tmp / "imgs")
    meta = write_metadata(tmp / "meta.csv", ["armour/img00.png,S-1,2024-05-01T00:00:00Z,1.0",
                                             "../secret.png,S-1,2024-05-01T00:00:00Z,1.0"])
    return dict(source=root, metadata=meta), str(meta), 3, "is not an image of the folder"


def metadata_short_row(tmp):
    root = write_images(tmp / "imgs")
    meta = write_metadata(tmp / "meta.csv", ["armour/img00.png,S-1,2024-05-01T00:00:00Z,1.0",
                                             "armour/img01.png,S-1,2024-05-01T00:00:00Z,1.0", "armour/img02.png,S-2"])
    return dict(source=root, metadata=meta), str(meta), 4, "expected 4 columns"


def metadata_bad_time(tmp):
    root = write_images(tmp / "imgs")
    meta = write_metadata(tmp / "meta.csv", ["armour/img00.png,S-1,2024-05-01T00:00:00Z,1.0",
                                             "armour/img01.png,S-1,last tuesday,1.0"])
    return dict(source=root, metadata=meta), str(meta), 3, "'last tuesday' is not an ISO 8601 time"


def metadata_reserved_column(tmp):
    root = write_images(tmp / "imgs")
    meta = tmp / "meta.csv"
    meta.write_text("file,label\narmour/img00.png,tank\n")
    return dict(source=root, metadata=meta), str(meta), 1, "column 'label' is reserved"


def parquet_missing_label(tmp):
    frame = tabular_frame(20)
    frame.loc[4, "label"] = None
    path = tmp / "t.parquet"
    frame.to_parquet(path, index=False)
    return dict(source=path, classes=list(LABELS)), str(path), "row 5", "no label"


def unknown_label(tmp):
    path = _csv_lines(tmp / "t.csv", lambda lines: _set(lines, 17, "label", "echo"))
    return dict(source=path, classes=list(LABELS)), str(path), 17, "label 'echo' is not one of the classes"


def missing_label_column(tmp):
    path = write_csv(tmp / "t.csv", tabular_frame().drop(columns=["label"]))
    return dict(source=path), str(path), 1, "no label column 'label'"


def short_row(tmp):
    def cut(lines):
        lines[22] = lines[22].rsplit(",", 2)[0]
    path = _csv_lines(tmp / "t.csv", cut)
    return dict(source=path), str(path), 23, "expected 9 columns"


def non_numeric_feature(tmp):
    path = _csv_lines(tmp / "t.csv", lambda lines: _set(lines, 31, "x4", "12,5".replace(",", ";")))
    return dict(source=path, chunk_rows=10), str(path), 31, "column 'x4': '12;5' is not a number"


def missing_label_value(tmp):
    path = _csv_lines(tmp / "t.csv", lambda lines: _set(lines, 9, "label", ""))
    return dict(source=path), str(path), 9, "no value in the label column"


@pytest.mark.parametrize("case", [bad_image, mixed_sizes, mixed_modes, metadata_unknown_file, metadata_short_row,
                                  metadata_bad_time, metadata_reserved_column, parquet_missing_label, unknown_label,
                                  missing_label_column, short_row, non_numeric_feature, missing_label_value])
def test_bad_input_is_refused_naming_file_and_line_and_leaves_nothing(site, images, tmp_path, case):
    options, file, where, problem = case(tmp_path)
    before = _state(site)
    with pytest.raises(ImportRefused) as excinfo:
        import_dataset(site, "refused", **options)
    message = str(excinfo.value)
    where = f", line {where}" if isinstance(where, int) else f", {where}" if where else ""
    assert message.startswith(f"{file}{where}: "), message
    assert problem in message and excinfo.value.file == file
    assert _state(site) == before
    assert not list(site.repo.rglob("*.tmp")) and not list(site.repo.rglob(".refused*"))


def test_csv_read_in_many_blocks_gives_the_same_version_and_finds_late_errors(site, table, tmp_path, monkeypatch):
    from pipelines.data import importer

    monkeypatch.setattr(importer, "CSV_BLOCK_BYTES", 1024)  # the 120-row file in ~10 blocks
    path, first = table
    assert import_dataset(site, "readings", path, chunk_rows=7).version == first.version
    before = _state(site)
    late = _csv_lines(tmp_path / "late.csv", lambda lines: _set(lines, 101, "x6", "seven"))
    with pytest.raises(ImportRefused, match=f"^{late}, line 101: column 'x6': 'seven' is not a number$"):
        import_dataset(site, "late", late, chunk_rows=7)
    assert _state(site) == before and not list(site.repo.rglob("*.tmp"))


def test_cli_imports_and_refuses_with_one_line(site, tmp_path):
    from pipelines.data.cli import data

    path = write_csv(tmp_path / "cli.csv", tabular_frame(30, seed=5))
    runner = CliRunner()
    ok = runner.invoke(data, ["import", "--site", "origin", "--name", "cli-readings", "--from", str(path),
                              "--partition", "test", "--metadata-columns", "x0"])
    assert ok.exit_code == 0, ok.output
    assert "imported 30 rows as origin/cli-readings@" in ok.output and "tabular, input 6, 4 classes" in ok.output
    assert catalog.latest(site, "cli-readings").flags == catalog.partition_flags("origin", "test") | {
        "releasable_to": [], "purposes": ["evaluation"]}
    again = runner.invoke(data, ["import", "--site", "origin", "--name", "cli-readings", "--from", str(path),
                                 "--partition", "test", "--metadata-columns", "x0"])
    assert again.exit_code == 0 and "already imported" in again.output
    bad = _csv_lines(tmp_path / "bad.csv", lambda lines: _set(lines, 5, "x1", "n/a?"))
    refused = runner.invoke(data, ["import", "--site", "origin", "--name", "cli-bad", "--from", str(bad)])
    assert refused.exit_code == 1 and f"{bad}, line 5: column 'x1': 'n/a?' is not a number" in refused.output
    unknown = runner.invoke(data, ["import", "--site", "origin", "--name", "cli-bad", "--from", str(path),
                                   "--partition", "nowhere"])
    assert unknown.exit_code == 1 and "has no partition 'nowhere'" in unknown.output
