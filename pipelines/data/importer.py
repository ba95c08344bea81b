"""`factory data import`: a site's own image folder or tabular file becomes a dataset version.

Two kinds of source:
- an image folder, one sub-folder per class (class names: the sorted folder names), PNG or JPEG,
  with an optional CSV of per-image metadata (column `file`: the image's path inside the folder;
  every other column rides along, e.g. sensor, capture_time, location). Stored with the `pixels`
  encoding: C*H*W uint8 bytes per image (C=1 for grayscale, 3 for colour). Every image must have
  the first one's mode and size unless `resize` is given (then colour if any image is colour);
- a tabular file, CSV or Parquet, with a label column. Features are the numeric columns other than
  the label and the metadata; metadata are the columns the site's sanitization rules name, those
  named by the caller, and columns with no numeric value. Labels become class indices (classes: the
  sorted distinct labels, or the ones the caller gives).

The source is read in chunks of `chunk_rows` rows into a temporary Parquet file beside the target
(peak memory follows the chunk, not the dataset); a first pass reads only what must be known
before the first row can be written (the labels of a tabular file, the modes of images to
resize). Any bad input is refused naming the file and line (or image), and nothing is left
behind: no temp file, no record, no commit. A good import is registered as one raw version:
the Parquet file DVC-tracked and pushed, its catalog record carrying the data spec
(`extra["spec"]`), where it came from (`extra["source"]`: path, sha256 digest) and the Great
Expectations suite derived from its data (`repo/expectations/<name>/<md5>.json`, committed
with the record), which `validate` uses for it and its descendants. The same content imported
again is the same version: nothing changes.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipelines.context import StepError
from pipelines.data import schema
from pipelines.data.spec import PIXELS_COLUMN, DataSpec, SpecError
from pipelines.fileio import file_digest, write_json
from pipelines.workspace import SitePaths, UnsafeName, safe_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_FORMATS = ("PNG", "JPEG")
CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
METADATA_KEY = "file"  # the metadata CSV's column naming each image
RESERVED = (schema.ID_COLUMN, schema.LABEL_COLUMN, PIXELS_COLUMN)  # columns the factory writes itself
CHUNK_BYTES = 32 * 2**20  # default chunk: about this much data
CSV_BLOCK_BYTES = 4 * 2**20  # what the CSV reader parses at a time
ROW_GROUP_BYTES = 16 * 2**20  # Parquet row groups: about this much data, whatever the chunk (same content, same bytes)
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 256, 262_144
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
TIMESTAMP = pa.timestamp("ns", tz="UTC")
_NULLS = frozenset(pacsv.ConvertOptions().null_values)  # what a CSV cell may hold for "no value"


class ImportRefused(StepError):
    """The input cannot be imported; the message names the file and, where there is one, the line."""

    def __init__(self, file: Path | str, problem: str, *, line: int | None = None, row: int | None = None):
        where = str(file) + (f", line {line}" if line is not None else "") + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {problem}")
        self.file = str(file)
        self.line = line
        self.row = row


@dataclass(frozen=True)
class ImportResult:
    version: Any  # catalog.DatasetVersion
    created: bool  # False: this content was already imported as `version`
    rows: int
    spec: DataSpec
    seconds: float
    source: str

    def message(self) -> str:
        if not self.created:
            status = "" if self.version.usable else f"; that version is quarantined ({self.version.quarantine_reason})"
            return (f"{self.source} is already imported as {self.version.id} "
                    f"(same content, md5 {self.version.md5}); nothing changed{status}")
        spec = self.spec
        return (f"imported {self.rows} rows as {self.version.id}: {spec.kind}, input {'x'.join(map(str, spec.input_shape))}, "
                f"{spec.n_classes} classes, metadata {', '.join(spec.metadata_columns) or 'none'}"
                + (f" (sensitive: {', '.join(spec.sensitive_columns)})" if spec.sensitive_columns else "")
                + f", {self.seconds:.1f} s")


def import_dataset(
    paths: SitePaths,
    name: str,
    source: Path | str,
    *,
    label_column: str = schema.LABEL_COLUMN,
    partition: str | None = None,
    resize: tuple[int, int] | str | None = None,
    metadata: Path | str | None = None,
    metadata_columns: Sequence[str] = (),
    classes: Sequence[str] | None = None,
    chunk_rows: int | None = None,
    progress: bool | None = None,
    actor: str | None = None,
) -> ImportResult:
    """Import `source` (an image folder, a CSV or a Parquet file) as raw dataset `name` of the site.

    `partition`: the conf/sites.yaml partition whose flags the data takes (without one it is treated
    as secret and local-only). `resize`: (H, W) or "HxW" for image folders of mixed sizes or modes.
    `metadata`: the image folder's metadata CSV. `metadata_columns`: tabular columns that are
    metadata, not features. `classes`: the tabular labels in class-index order (a label outside them
    is refused). `progress`: show a progress bar (default: when stderr is a terminal).
    """
    from pipelines.data import catalog

    started = time.perf_counter()
    try:
        safe_name(name, "dataset name")
    except UnsafeName as exc:
        raise StepError(str(exc)) from None
    flags = None
    if partition is not None:
        flags = catalog.partition_flags(paths.site, partition)
        if flags is None:
            from pipelines.config import load_config

            known = ", ".join(load_config().sites[paths.site].data_partitions)
            raise StepError(f"site {paths.site} has no partition {partition!r}; partitions: {known}")
    source = Path(source).expanduser().resolve()
    reader = _open_source(paths.site, name, source, label_column=label_column, resize=resize, metadata=metadata,
                          metadata_columns=metadata_columns, classes=classes)
    target = paths.data_dir / "imported" / f"{name}.parquet"
    with _Progress(sys.stderr.isatty() if progress is None else progress) as bar:
        reader.prepare(bar)
        row_group = _rows_of(ROW_GROUP_BYTES, reader.row_bytes)
        chunk = _chunk_rows(chunk_rows, row_group)
        with _TempParquet(target, reader.schema, row_group) as sink:
            profile = _Profile(reader.feature_columns if reader.encoding == "columns" else ())
            for table in reader.tables(bar, chunk):
                profile.add(table)
                sink.write(table)
            sink.close()
            spec = _spec(reader, paths.site, sink.schema)
            version, created = _register(paths, name, sink, spec, profile, reader.info(), flags, partition, actor)
    return ImportResult(version, created, profile.rows, spec, time.perf_counter() - started, str(source))


def _register(paths, name, sink: _TempParquet, spec: DataSpec, profile: _Profile, source: dict, flags, partition,
              actor) -> tuple[Any, bool]:
    """Move the written file into place and register it with its suite; or find the version it already is."""
    from pipelines.data import catalog, repo, validate

    suite = validate.data_suite(spec, rows=profile.rows, nulls=profile.nulls, ranges=profile.ranges)
    with repo.site_lock(paths):
        existing = [v for v in catalog.list_datasets(paths, name) if v.md5 == sink.md5]
        if existing:
            return existing[0], False
        sink.keep()
        suite_path = paths.repo / "expectations" / name / f"{sink.md5}.json"
        try:
            write_json(suite_path, suite)
            version = catalog.register_dataset(
                paths, name, sink.target, kind="raw", flags=flags, actor=actor, md5=sink.md5, attach=[suite_path],
                extra={
                    "spec": spec.to_dict(),
                    "source": source,
                    "expectations": str(suite_path.relative_to(paths.repo)),
                    "partition": partition,
                    "import": {"rows": profile.rows,
                               "class_counts": {spec.classes[int(k)]: n for k, n in sorted(profile.labels.items())}},
                },
            )
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                sink.target.unlink()
            if not repo.git(paths, "ls-files", "--", str(suite_path.relative_to(paths.repo)), check=False):
                with contextlib.suppress(FileNotFoundError):
                    suite_path.unlink()
            raise
    if version.md5 != sink.md5:  # DVC hashed what was written; a difference would misname the suite
        raise StepError(f"DVC recorded md5 {version.md5} for {sink.target}, but {sink.md5} was written")
    return version, True


def parse_resize(value: tuple[int, int] | str | None) -> tuple[int, int] | None:
    """`HxW` (or an (H, W) pair) -> (H, W), both positive."""
    if value is None:
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
        if not match:
            raise StepError(f"resize {value!r} is not HxW (e.g. 64x64)")
        value = (int(match[1]), int(match[2]))
    height, width = (int(v) for v in value)
    if height < 1 or width < 1:
        raise StepError(f"resize {height}x{width} must be positive")
    return height, width


# ---------------------------------------------------------------------------- writing


def _rows_of(size: int, row_bytes: int) -> int:
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, size // max(row_bytes, 1)))


def _chunk_rows(requested: int | None, row_group: int) -> int:
    """The rows read at a time: as asked, or whole row groups of about CHUNK_BYTES (no row group then
    straddles two chunks)."""
    if requested is not None:
        if int(requested) < 1:
            raise StepError(f"chunk rows must be positive, not {requested}")
        return int(requested)
    return row_group * max(1, CHUNK_BYTES // ROW_GROUP_BYTES)


class _HashingWriter:
    """A binary file that hashes what is written through it (Parquet writes front to back)."""

    def __init__(self, handle, digest):
        self._handle, self._digest, self._written = handle, digest, 0

    def write(self, data) -> int:
        self._digest.update(data)
        self._written += len(data)
        return self._handle.write(data)

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:
        """The sink closes the file itself."""

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


class _TempParquet:
    """A temp Parquet file beside `target` with its md5; removed unless `keep()` moved it to `target`.

    Row groups hold `row_group` rows whatever sizes the tables come in, so the file's bytes depend on
    the data only (not on the chunk size it was read with)."""

    def __init__(self, target: Path, schema_: pa.Schema, row_group: int):
        import pyarrow.parquet as pq

        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.fchmod(fd, 0o644)
        self.path = Path(tmp)
        self._handle = os.fdopen(fd, "wb")
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.schema = schema_
        self._row_group = row_group
        # Pixels hardly compress and their min/max say nothing: stored as they are. Dictionaries only
        # where values repeat (labels, text metadata), never for record ids or features.
        texts = [f.name for f in schema_ if f.name == schema.LABEL_COLUMN or
                 (f.name != schema.ID_COLUMN and (pa.types.is_string(f.type) or pa.types.is_large_string(f.type)))]
        plain = [f.name for f in schema_ if f.name != PIXELS_COLUMN]
        self._writer = pq.ParquetWriter(
            _HashingWriter(self._handle, self._md5), schema_, use_dictionary=texts, write_statistics=plain,
            compression={f.name: "none" if f.name == PIXELS_COLUMN else "snappy" for f in schema_})
        self._pending: pa.Table | None = None
        self.md5: str | None = None

    def write(self, table: pa.Table) -> None:
        table = table.cast(self.schema)
        pending = table if self._pending is None else pa.concat_tables([self._pending, table])
        while pending.num_rows >= self._row_group:
            self._writer.write_table(pending.slice(0, self._row_group), row_group_size=self._row_group)
            pending = pending.slice(self._row_group)
        self._pending = pending

    def close(self) -> None:
        if self._pending is not None and self._pending.num_rows:
            self._writer.write_table(self._pending, row_group_size=self._row_group)
        self._pending = None
        self._writer.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self.md5 = self._md5.hexdigest()

    def keep(self) -> None:
        os.replace(self.path, self.target)

    def __enter__(self) -> _TempParquet:
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        if not self._handle.closed:
            self._handle.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class _Profile:
    """What the import learns of the data on the way: rows, nulls per column, feature ranges, label counts."""

    def __init__(self, range_columns: Sequence[str]):
        self.rows = 0
        self.nulls: Counter[str] = Counter()
        self.ranges: dict[str, tuple[float, float]] = {}
        self.labels: Counter[int] = Counter()
        self._range_columns = tuple(range_columns)

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        for column in table.column_names:
            values = table.column(column)
            nulls = pc.is_null(values, nan_is_null=True) if pa.types.is_floating(values.type) else None
            self.nulls[column] += int(pc.sum(nulls).as_py() or 0) if nulls is not None else values.null_count
        for column in self._range_columns:
            found = pc.min_max(table.column(column)).as_py()
            if found["min"] is None:
                continue
            low, high = self.ranges.get(column, (found["min"], found["max"]))
            self.ranges[column] = (min(low, found["min"]), max(high, found["max"]))
        for item in pc.value_counts(table.column(schema.LABEL_COLUMN)).to_pylist():
            self.labels[item["values"]] += item["counts"]


class _Progress:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, enabled: bool):
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(stderr=True)
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=not console.is_terminal)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def task(self, description: str, total: int | None) -> int | None:
        return self._bar.add_task(description, total=total) if self._bar is not None else None

    def advance(self, task: int | None, amount: int = 0, *, completed: int | None = None) -> None:
        if self._bar is not None and task is not None:
            if completed is not None:
                self._bar.update(task, completed=completed)
            else:
                self._bar.advance(task, amount)


def _spec(reader: _Source, site: str, stored: pa.Schema) -> DataSpec:
    from pipelines.data.sanitize import sensitive_metadata

    dtypes = stored.empty_table().to_pandas().dtypes
    metadata = {c: str(dtypes[c]) for c in reader.metadata_columns}
    try:
        return DataSpec(kind=reader.kind, input_shape=reader.input_shape, feature_columns=tuple(reader.feature_columns),
                        classes=tuple(reader.classes), encoding=reader.encoding, metadata_columns=metadata,
                        sensitive_columns=tuple(sensitive_metadata(site, list(metadata))))
    except SpecError as exc:
        raise ImportRefused(reader.path, str(exc)) from None


# ---------------------------------------------------------------------------- sources


class _Source:
    """What every source gives the writer."""

    path: Path
    kind: str
    encoding: str
    input_shape: tuple[int, ...]
    feature_columns: list[str]
    metadata_columns: list[str]
    classes: list[str]
    schema: pa.Schema
    row_bytes: int

    def prepare(self, bar: _Progress) -> None:
        raise NotImplementedError

    def tables(self, bar: _Progress, chunk: int) -> Iterator[pa.Table]:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        raise NotImplementedError


def _open_source(site, name, source: Path, *, label_column, resize, metadata, metadata_columns, classes) -> _Source:
    if not source.exists():
        raise ImportRefused(source, "no such file or folder")
    if source.is_dir():
        if classes is not None or metadata_columns or label_column != schema.LABEL_COLUMN:
            raise StepError("an image folder's classes are its sub-folders; --classes, --metadata-columns and "
                            "--label-column are for tabular files")
        return _ImageFolder(name, source, resize=parse_resize(resize),
                            metadata=Path(metadata).expanduser().resolve() if metadata else None)
    if resize is not None or metadata is not None:
        raise StepError("--resize and --metadata are for image folders; a tabular file carries its metadata columns")
    from pipelines.data.sanitize import configured_columns

    suffix = source.suffix.lower()
    options = dict(label=label_column, declared=tuple(metadata_columns), configured=configured_columns(site),
                   classes=list(classes) if classes is not None else None)
    if suffix in CSV_SUFFIXES:
        return _CsvFile(name, source, **options)
    if suffix in PARQUET_SUFFIXES:
        return _ParquetFile(name, source, **options)
    raise ImportRefused(source, f"not an image folder, nor a tabular file ({', '.join(CSV_SUFFIXES + PARQUET_SUFFIXES)})")


def _record_ids(name: str, start: int, count: int) -> pa.Array:
    """`<name>-0000001`...: ids by position in the source, so the same source gives the same ids."""
    numbers = pc.cast(pa.array(np.arange(start, start + count, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise(pa.scalar(f"{name}-"), pc.utf8_lpad(numbers, 7, "0"), "")


def _sorted_classes(values) -> list[str]:
    """Natural order: numbers by value (2 before 10), anything else as text."""
    values = [str(v) for v in values]
    if all(re.fullmatch(r"-?\d+", v) for v in values):
        return sorted(values, key=lambda v: (int(v), v))
    return sorted(values)


def _is_number(value: str) -> bool:
    if value in _NULLS:
        return True
    if value != value.strip() or "_" in value:
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _any_number(values: pa.Array) -> bool:
    """Does a text column hold a number (or nothing at all: an empty column is taken for a feature)?"""
    try:
        pc.cast(values, pa.float64())
        return True  # every value a number or null
    except pa.ArrowInvalid:
        return any(_is_number(v) for v in values.to_pylist() if v is not None)


def _is_time(value: str) -> bool:
    if value in _NULLS:
        return True
    try:
        pd.to_datetime(value, utc=True, format="ISO8601")
    except (ValueError, TypeError):
        return False
    return True


def _metadata_type(column: str, values: pa.Array) -> pa.DataType:
    """The stored type of a metadata column (`values`: its text): the site's time column is a UTC time;
    a column whose every value is a number is float64; anything else text."""
    from pipelines.data.sanitize import TIME_COLUMN

    if column == TIME_COLUMN:
        return TIMESTAMP
    if len(values) == values.null_count:
        return pa.string()
    try:
        pc.cast(values, pa.float64())
    except pa.ArrowInvalid:
        return pa.string()
    return pa.float64()


class _BadValue(Exception):
    def __init__(self, index: int, problem: str):
        super().__init__(problem)
        self.index, self.problem = index, problem


def _convert_metadata(column: str, values: pa.Array, kind: pa.DataType) -> pa.Array:
    """Text values of a metadata column as `kind`; a value that is not raises _BadValue with its index."""
    if pa.types.is_string(kind):
        return values
    if pa.types.is_floating(kind):
        try:
            return pc.cast(values, kind)
        except pa.ArrowInvalid:
            bad = next((i for i, v in enumerate(values.to_pylist()) if v is not None and not _is_number(v)), 0)
            raise _BadValue(bad, f"column {column!r}: {values[bad].as_py()!r} is not a number") from None
    texts = values.to_pandas()
    times = pd.to_datetime(texts, utc=True, format="ISO8601", errors="coerce")
    bad = np.flatnonzero(times.isna().to_numpy() & texts.notna().to_numpy())
    if len(bad):
        raise _BadValue(int(bad[0]), f"column {column!r}: {texts.iat[int(bad[0])]!r} is not an ISO 8601 time")
    return pa.array(times, type=kind)


class _ImageFolder(_Source):
    kind, encoding = "image", "pixels"

    def __init__(self, name: str, root: Path, *, resize: tuple[int, int] | None, metadata: Path | None):
        self.name, self.path, self.resize, self.metadata_path = name, root, resize, metadata
        self.feature_columns = [PIXELS_COLUMN]
        self.metadata_columns: list[str] = []
        self._manifest = hashlib.sha256()
        self._skipped = 0

    def prepare(self, bar: _Progress) -> None:
        from PIL import Image

        self.classes = sorted(p.name for p in self.path.iterdir() if p.is_dir() and not p.name.startswith("."))
        loose = [p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if loose:
            raise ImportRefused(loose[0], "images must sit in one sub-folder per class, not at the top of the folder")
        if len(self.classes) < 2:
            raise ImportRefused(self.path, f"needs one sub-folder per class and at least two classes; found {self.classes}")
        self.files: list[tuple[str, int]] = []  # (path in the folder, class index): small, as there may be millions
        for index, label in enumerate(self.classes):
            found = 0
            folder = self.path / label
            for rel in _files_below(folder):
                if Path(rel).suffix.lower() not in IMAGE_SUFFIXES:
                    self._skipped += 1
                    continue
                self.files.append((f"{label}/{rel}", index))
                found += 1
            if not found:
                raise ImportRefused(folder, f"class folder {label!r} holds no PNG or JPEG image")
        self._read_metadata()
        if self.resize is None:
            first = self.path / self.files[0][0]
            try:
                with Image.open(first, formats=IMAGE_FORMATS) as img:
                    self.mode, (width, height) = img.mode, img.size
            except (OSError, SyntaxError, ValueError) as exc:
                raise ImportRefused(first, f"unreadable image: {exc}") from None
            self._first = first
        else:
            height, width = self.resize
            task = bar.task("reading image headers", len(self.files))
            self.mode = "L"
            for rel, _ in self.files:  # colour if any image is colour
                file = self.path / rel
                try:
                    with Image.open(file, formats=IMAGE_FORMATS) as img:
                        if img.mode not in GRAY_MODES:
                            self.mode = "RGB"
                            break
                except (OSError, SyntaxError, ValueError) as exc:
                    raise ImportRefused(file, f"unreadable image: {exc}") from None
                bar.advance(task, 1)
        self.target_mode = "L" if self.mode in GRAY_MODES else "RGB"
        channels = 1 if self.target_mode == "L" else 3
        self.input_shape = (channels, height, width)
        self.row_bytes = channels * height * width + 64
        fields = [(schema.ID_COLUMN, pa.string()), (PIXELS_COLUMN, pa.binary()), (schema.LABEL_COLUMN, pa.int64())]
        self.schema = pa.schema(fields + [(c, self._meta.column(c).type) for c in self.metadata_columns])

    def _read_metadata(self) -> None:
        """The metadata CSV as a table in image order (images it does not name get nulls)."""
        order = {rel: i for i, (rel, _) in enumerate(self.files)}
        self._meta = pa.table({})
        if self.metadata_path is None:
            return
        path = self.metadata_path
        rows: dict[int, list[str]] = {}
        lines: dict[int, int] = {}
        try:
            with path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                if not header:
                    raise ImportRefused(path, "empty; expected a header with a 'file' column", line=1)
                _check_header(path, header)
                reserved = [c for c in header if c in RESERVED]
                if reserved:
                    raise ImportRefused(path, f"column {reserved[0]!r} is reserved for what the factory stores "
                                        f"({', '.join(RESERVED)}); rename it", line=1)
                if METADATA_KEY not in header:
                    raise ImportRefused(path, f"no {METADATA_KEY!r} column naming each image; columns: {header}", line=1)
                key = header.index(METADATA_KEY)
                for row in reader:
                    if not row:
                        continue
                    if len(row) != len(header):
                        raise ImportRefused(path, f"expected {len(header)} columns ({', '.join(header)}), found {len(row)}",
                                            line=reader.line_num)
                    rel = PurePosixPath(row[key].strip())
                    if rel.is_absolute() or ".." in rel.parts or rel.as_posix() not in order:
                        raise ImportRefused(path, f"{row[key]!r} is not an image of the folder", line=reader.line_num)
                    index = order[rel.as_posix()]
                    if index in rows:
                        raise ImportRefused(path, f"{row[key]!r} is described twice", line=reader.line_num)
                    rows[index] = row
                    lines[index] = reader.line_num
        except UnicodeDecodeError as exc:
            raise ImportRefused(path, f"not UTF-8 text: {exc}") from None
        except OSError as exc:
            raise ImportRefused(path, f"cannot read it: {exc}") from None
        self._metadata_digest = "sha256:" + file_digest(path)
        columns = {}
        for j, column in enumerate(header):
            if j == key:
                continue
            values = [rows[i][j] if i in rows and rows[i][j] not in _NULLS else None for i in range(len(self.files))]
            text = pa.array(values, pa.string())
            kind = _metadata_type(column, text)
            try:
                columns[column] = _convert_metadata(column, text, kind)
            except _BadValue as bad:
                raise ImportRefused(path, bad.problem, line=lines[bad.index]) from None
        self.metadata_columns = list(columns)
        self._meta = pa.table(columns) if columns else pa.table({})

    def tables(self, bar: _Progress, chunk: int) -> Iterator[pa.Table]:
        task = bar.task(f"importing {len(self.files)} images", len(self.files))
        size = self.input_shape[0] * self.input_shape[1] * self.input_shape[2]
        chunk = max(1, min(chunk, (2**31 - 1) // size))  # binary offsets are 32-bit
        start = 0
        while start < len(self.files):
            part = self.files[start:start + chunk]
            data = bytearray(len(part) * size)
            for i, (rel, _) in enumerate(part):
                data[i * size:(i + 1) * size] = self._pixels(rel, self.path / rel, size)
            data = pa.py_buffer(data)
            offsets = pa.py_buffer(np.arange(len(part) + 1, dtype=np.int32) * size)
            columns = {
                schema.ID_COLUMN: _record_ids(self.name, start, len(part)),
                PIXELS_COLUMN: pa.Array.from_buffers(pa.binary(), len(part), [None, offsets, data]),
                schema.LABEL_COLUMN: pa.array([label for _, label in part], pa.int64()),
                **{c: self._meta.column(c).slice(start, len(part)) for c in self.metadata_columns},
            }
            yield pa.table(columns, schema=self.schema)
            bar.advance(task, len(part))
            start += len(part)

    def _pixels(self, rel: str, file: Path, size: int) -> bytes:
        from PIL import Image

        try:
            data = file.read_bytes()
        except OSError as exc:
            raise ImportRefused(file, f"cannot read it: {exc}") from None
        self._manifest.update(f"{hashlib.sha256(data).hexdigest()}  {rel}\n".encode())
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                img.load()
                height, width = self.input_shape[1:]
                if self.resize is None and (img.mode != self.mode or img.size != (width, height)):
                    raise ImportRefused(file, f"is a {img.mode} image of {img.width}x{img.height} (WxH), but the first "
                                        f"image {self._first} is {self.mode} {width}x{height}; give a resize (--resize HxW) "
                                        "to import images of mixed sizes or modes")
                out = img if img.mode == self.target_mode else img.convert(self.target_mode)
                if out.size != (width, height):
                    out = out.resize((width, height), Image.Resampling.BILINEAR)
                # channel-first: each band's plane in turn
                pixels = out.tobytes() if out.mode == "L" else b"".join(band.tobytes() for band in out.split())
        except ImportRefused:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImportRefused(file, f"unreadable image: {exc}") from None
        if len(pixels) != size:  # a mode Pillow converts to more or fewer bands than asked for
            raise ImportRefused(file, f"gives {len(pixels)} pixel bytes, not {size}")
        return pixels

    def info(self) -> dict[str, Any]:
        described = {"path": str(self.path), "format": "image-folder", "images": len(self.files),
                     "digest": "sha256:" + self._manifest.hexdigest(),
                     "digest_of": "sha256 of the lines '<sha256 of the file>  <path in the folder>', in import order"}
        if self._skipped:
            described["skipped_files"] = self._skipped
        if self.metadata_path is not None:
            described["metadata"] = {"path": str(self.metadata_path), "digest": self._metadata_digest}
        return described


def _files_below(folder: Path) -> list[str]:
    """Paths (posix, relative to `folder`) of the regular files below it, sorted; hidden ones left out."""
    found = []
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        base = Path(directory).relative_to(folder)
        found += [(base / f).as_posix() for f in files if not f.startswith(".") and os.path.isfile(os.path.join(directory, f))]
    return sorted(found)


def _check_header(path: Path, header: Sequence[str]) -> None:
    empty = [i + 1 for i, c in enumerate(header) if not c.strip()]
    if empty:
        raise ImportRefused(path, f"column {empty[0]} of the header has no name", line=1)
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise ImportRefused(path, f"column name(s) {', '.join(repeated)} appear more than once", line=1)


class _Tabular(_Source):
    """What CSV and Parquet files share: which column is what, the classes, the stored schema."""

    kind, encoding = "tabular", "columns"

    def __init__(self, name, path: Path, *, label: str, declared: Sequence[str], configured: set[str],
                 classes: list[str] | None):
        self.name, self.path, self.label = name, path, label
        self.declared, self.configured = tuple(declared), configured
        self.given_classes = classes
        if classes is not None and (len(set(classes)) != len(classes) or len(classes) < 2):
            raise StepError(f"classes must be two or more distinct names, not {classes}")

    def _check_columns(self, header: Sequence[str], where: dict) -> None:
        _check_header(self.path, header)
        if self.label not in header:
            raise ImportRefused(self.path, f"no label column {self.label!r}; columns: {', '.join(header)}", **where)
        reserved = [c for c in header if c in (schema.ID_COLUMN, schema.LABEL_COLUMN) and c != self.label]
        if reserved:
            raise ImportRefused(self.path, f"column {reserved[0]!r} is reserved for what the factory stores "
                                f"({schema.ID_COLUMN}, {schema.LABEL_COLUMN}); rename it", **where)
        unknown = [c for c in self.declared if c not in header]
        if unknown:
            raise StepError(f"metadata column(s) {', '.join(unknown)} are not in {self.path}")

    def _finish(self, kinds: dict[str, pa.DataType]) -> None:
        self.classes = list(self.given_classes) if self.given_classes is not None else self.classes
        if not self.feature_columns:
            raise ImportRefused(self.path, "no numeric feature column (every column is the label or metadata)")
        if len(self.classes) < 2:
            raise ImportRefused(self.path, f"needs at least two classes; the label column holds {self.classes}")
        self.input_shape = (len(self.feature_columns),)
        self.row_bytes = 4 * len(self.feature_columns) + 40 + 24 * len(self.metadata_columns)
        fields = [(schema.ID_COLUMN, pa.string()), *[(c, pa.float32()) for c in self.feature_columns],
                  (schema.LABEL_COLUMN, pa.int64()), *[(c, kinds[c]) for c in self.metadata_columns]]
        self.schema = pa.schema(fields)
        self._class_index = pa.array(self.classes, pa.string())

    def _indices(self, labels: pa.Array) -> tuple[pa.Array, int | None, str | None]:
        """Class indices of `labels`; the first position that has none (and why)."""
        labels = pc.cast(labels, pa.string())
        indices = pc.index_in(labels, value_set=self._class_index)
        if indices.null_count:
            bad = int(pc.index(pc.is_null(indices), True).as_py())
            value = labels[bad].as_py()
            why = ("no label" if value is None or value == "" else
                   f"label {value!r} is not one of the classes {self.classes}")
            return indices, bad, why
        return pc.cast(indices, pa.int64()), None, None


class _CsvFile(_Tabular):
    def prepare(self, bar: _Progress) -> None:
        self._size = self.path.stat().st_size
        try:
            with self.path.open(newline="", encoding="utf-8-sig") as handle:
                header = next(csv.reader(handle), None)
        except (OSError, UnicodeDecodeError) as exc:
            raise ImportRefused(self.path, f"cannot read it as UTF-8 CSV: {exc}", line=1) from None
        if not header:
            raise ImportRefused(self.path, "empty; expected a header naming the columns", line=1)
        self._check_columns(header, {"line": 1})
        self.header = header
        # The first block as text decides which columns hold numbers.
        first = self._first_block()
        self.feature_columns, self.metadata_columns, kinds = [], [], {}
        for column in header:
            if column == self.label:
                continue
            values = first.column(column) if first is not None else pa.array([], pa.string())
            if column in self.declared or column in self.configured or not _any_number(values):
                self.metadata_columns.append(column)
                kinds[column] = _metadata_type(column, values)
            else:
                self.feature_columns.append(column)
        self._kinds = kinds
        if self.given_classes is None:
            found: set[str] = set()
            task = bar.task("reading labels", self._size)
            for block, done in self._blocks(types={self.label: pa.string()}, include=[self.label]):
                labels = block.column(0)
                if labels.null_count:
                    self._locate()
                found.update(pc.unique(labels).to_pylist())
                bar.advance(task, completed=done)
            self.classes = _sorted_classes(found)
        self._finish(kinds)

    def _first_block(self) -> pa.Table | None:
        return next((block for block, _ in self._blocks(types=dict.fromkeys(self.header, pa.string()))), None)

    def _blocks(self, *, types: dict, include: Sequence[str] | None = None,
                digest=None) -> Iterator[tuple[pa.Table, int]]:
        """The file parsed block by block (whole lines of about CSV_BLOCK_BYTES), with the bytes read so far.

        The reader feeds Arrow one block at a time: its own streaming reader reads ahead without bound."""
        options = dict(
            parse_options=pacsv.ParseOptions(),
            convert_options=pacsv.ConvertOptions(column_types=types, include_columns=include,
                                                 strings_can_be_null=True, quoted_strings_can_be_null=True),
        )
        done, first = 0, True
        for text in _lines_in_blocks(self.path, CSV_BLOCK_BYTES, digest):
            done += len(text)
            read = pacsv.ReadOptions(column_names=self.header, skip_rows=1 if first else 0)
            first = False
            try:
                block = pacsv.read_csv(pa.BufferReader(text), read_options=read, **options)
            except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
                self._locate(exc)
            if block.num_rows:
                yield block, done

    def tables(self, bar: _Progress, chunk: int) -> Iterator[pa.Table]:
        types = {self.label: pa.string(), **dict.fromkeys(self.feature_columns, pa.float32()),
                 **dict.fromkeys(self.metadata_columns, pa.string())}
        task = bar.task(f"importing {self.path.name}", self._size)
        self._digest = hashlib.sha256()
        pending: list[pa.Table] = []
        start = rows = 0
        for block, done in self._blocks(types=types, include=self.header, digest=self._digest):
            pending.append(block)
            rows += block.num_rows
            if rows - start >= chunk:
                yield self._table(pa.concat_tables(pending), start)
                pending, start = [], rows
            bar.advance(task, completed=done)
        if pending:
            yield self._table(pa.concat_tables(pending), start)

    def _table(self, table: pa.Table, start: int) -> pa.Table:
        indices, bad, _ = self._indices(table.column(self.label))
        if bad is not None:
            self._locate()
        columns = {schema.ID_COLUMN: _record_ids(self.name, start, table.num_rows)}
        columns.update({c: table.column(c) for c in self.feature_columns})
        columns[schema.LABEL_COLUMN] = indices
        for column in self.metadata_columns:
            try:
                columns[column] = _convert_metadata(column, table.column(column).combine_chunks(), self._kinds[column])
            except _BadValue:
                self._locate()
        return pa.table(columns, schema=self.schema)

    def _row_problem(self, row: list[str], width: int) -> str | None:
        if len(row) != width:
            return f"expected {width} columns ({', '.join(self.header)}), found {len(row)}"
        values = dict(zip(self.header, row, strict=True))
        label = values[self.label]
        if label in _NULLS:
            return f"no value in the label column {self.label!r}"
        classes = getattr(self, "classes", None)
        if classes is not None and label not in classes:
            return f"label {label!r} is not one of the classes {classes}"
        for column in getattr(self, "feature_columns", ()):
            if not _is_number(values[column]):
                return f"column {column!r}: {values[column]!r} is not a number"
        for column, kind in getattr(self, "_kinds", {}).items():
            if pa.types.is_floating(kind) and not _is_number(values[column]):
                return f"column {column!r}: {values[column]!r} is not a number"
            if kind == TIMESTAMP and not _is_time(values[column]):
                return f"column {column!r}: {values[column]!r} is not an ISO 8601 time"
        return None

    def _locate(self, error: Exception | None = None) -> NoReturn:
        """Find the first bad line by reading the file again as plain CSV (only when something is wrong)."""
        try:
            with self.path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                next(reader, None)
                for row in reader:
                    if not row:
                        continue
                    problem = self._row_problem(row, len(self.header))
                    if problem:
                        raise ImportRefused(self.path, problem, line=reader.line_num)
        except UnicodeDecodeError as exc:
            raise ImportRefused(self.path, f"not UTF-8 text: {exc}") from None
        raise ImportRefused(self.path, f"cannot be read: {error or 'a value does not fit its column'}")

    def info(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": "csv", "digest": "sha256:" + self._digest.hexdigest()}


def _lines_in_blocks(path: Path, size: int, digest=None) -> Iterator[bytes]:
    """The file's bytes in blocks of whole lines (a line longer than `size` makes its block longer);
    `digest` is updated with every byte read."""
    with path.open("rb") as handle:
        rest = b""
        while data := handle.read(size):
            if digest is not None:
                digest.update(data)
            data = rest + data
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield data[:cut]
        if rest:
            yield rest


class _ParquetFile(_Tabular):
    def prepare(self, bar: _Progress) -> None:
        import pyarrow.parquet as pq

        try:
            self._file = pq.ParquetFile(self.path)
        except (OSError, pa.ArrowException) as exc:
            raise ImportRefused(self.path, f"not a readable Parquet file: {exc}") from None
        stored = self._file.schema_arrow
        self._check_columns(stored.names, {})
        self.feature_columns, self.metadata_columns, kinds = [], [], {}
        for column in stored.names:
            if column == self.label:
                continue
            kind = stored.field(column).type
            numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
            if column in self.declared or column in self.configured or not numeric:
                self.metadata_columns.append(column)
                kinds[column] = kind
            else:
                self.feature_columns.append(column)
        if self.given_classes is None:
            found: set[str] = set()
            task = bar.task("reading labels", self._file.metadata.num_rows)
            offset = 0
            for batch in self._file.iter_batches(columns=[self.label], batch_size=65536):
                labels = pc.cast(batch.column(0), pa.string())
                if labels.null_count:
                    row = offset + int(pc.index(pc.is_null(labels), True).as_py()) + 1
                    raise ImportRefused(self.path, f"no value in the label column {self.label!r}", row=row)
                found.update(pc.unique(labels).to_pylist())
                offset += batch.num_rows
                bar.advance(task, batch.num_rows)
            self.classes = _sorted_classes(found)
        self._finish(kinds)

    def tables(self, bar: _Progress, chunk: int) -> Iterator[pa.Table]:
        task = bar.task(f"importing {self.path.name}", self._file.metadata.num_rows)
        start = 0
        for batch in self._file.iter_batches(batch_size=chunk):
            indices, bad, why = self._indices(batch.column(self.label))
            if bad is not None:
                raise ImportRefused(self.path, why, row=start + bad + 1)
            columns = {schema.ID_COLUMN: _record_ids(self.name, start, batch.num_rows)}
            columns.update({c: pc.cast(batch.column(c), pa.float32(), safe=False) for c in self.feature_columns})
            columns[schema.LABEL_COLUMN] = indices
            columns.update({c: batch.column(c) for c in self.metadata_columns})
            yield pa.table(columns, schema=self.schema)
            bar.advance(task, batch.num_rows)
            start += batch.num_rows

    def info(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": "parquet", "digest": "sha256:" + file_digest(self.path)}

