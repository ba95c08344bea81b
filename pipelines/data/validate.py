"""Validation with Great Expectations 1.x in ephemeral mode.

The digits demo's suites are JSON files in `pipelines/data/expectations/` (`training`,
`release`). A dataset with a data spec (an imported one, or one derived from it) is checked
against a suite built for it (`suite_for`): the suite derived from its data at import
(`repo/expectations/<name>/<md5>.json`: types, per-feature ranges, classes, no nulls where there
were none), or, where no such suite is at hand (data received from another site), one derived
from its spec; plus the purpose's check of sensitive column names. The GX context, data source
and validation definitions are built once per process (GX is slow to import and to set up).
`validate` never crashes on bad data: every problem becomes a failed expectation, and a failure
raises `ValidationFailed` naming each expectation and column.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.context import StepError
from pipelines.data import schema
from pipelines.data.spec import DataSpec, spec_of
from pipelines.fileio import read_json, write_json

SUITES_DIR = Path(__file__).resolve().parent / "expectations"
DATA_SOURCE = "frames"
PURPOSES = ("training", "release")  # the suites every dataset can be checked against
STRING_TYPES = ["string", "str", "object"]

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


@dataclass
class ValidationResult:
    success: bool
    suite: str
    dataset_id: str | None
    failures: list[dict[str, Any]] = field(default_factory=list)
    evaluated: int = 0
    checks: list[dict[str, Any]] = field(default_factory=list)  # every expectation: type, column, success
    data_docs: Path | None = None
    result_file: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "suite": self.suite,
            "dataset_id": self.dataset_id,
            "evaluated_expectations": self.evaluated,
            "failures": self.failures,
            "checks": self.checks,
            "data_docs": str(self.data_docs) if self.data_docs else None,
        }

    def message(self) -> str:
        what = self.dataset_id or "dataset"
        if self.success:
            return f"{what} passed suite {self.suite!r} ({self.evaluated} expectations)"
        parts = [
            f"{f['expectation']}" + (f" on {f['column']}" if f.get("column") else "") + f" (observed {f['observed']})"
            for f in self.failures
        ]
        return f"{what} failed suite {self.suite!r}: {len(parts)} expectation(s) failed: " + "; ".join(parts)


class ValidationFailed(StepError):
    """The data failed its expectation suite; `.result` holds every failure."""

    def __init__(self, result: ValidationResult):
        super().__init__(result.message())
        self.result = result


class _GX:
    """The process-wide ephemeral GX context and what hangs off it."""

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        define_custom_expectations()
        self.gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        self.source = self.context.data_sources.add_pandas(DATA_SOURCE)
        self.suites: dict[str, Any] = {}
        self.definitions: dict[str, Any] = {}
        self.docs_sites: dict[Path, str] = {}
        self.lock = threading.Lock()

    def suite(self, suite: str | Mapping[str, Any]):
        """A suite by name (a JSON file of SUITES_DIR) or given whole (a built one, kept per content)."""
        if isinstance(suite, Mapping):
            body = json.dumps(suite, sort_keys=True, default=str).encode()
            key = f"{suite['name']}.{hashlib.sha256(body).hexdigest()[:16]}"
            if key not in self.suites:
                self.suites[key] = self.context.suites.add(self.gx.ExpectationSuite(**{**suite, "name": key}))
            return self.suites[key]
        name = suite
        if name not in self.suites:
            path = SUITES_DIR / f"{name}.json"
            if not path.exists():
                known = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.json")))
                raise StepError(f"unknown expectation suite {name!r}; suites: {known}")
            spec = json.loads(path.read_text())
            self.suites[name] = self.context.suites.add(self.gx.ExpectationSuite(**spec))
        return self.suites[name]

    def batch_definition(self, asset_name: str):
        if asset_name not in self.definitions:
            try:
                asset = self.source.get_asset(asset_name)
            except LookupError:
                asset = self.source.add_dataframe_asset(asset_name)
            self.definitions[asset_name] = asset.add_batch_definition_whole_dataframe(f"{asset_name}-whole")
        return self.definitions[asset_name]

    def docs_site(self, directory: Path) -> str:
        if directory not in self.docs_sites:
            name = f"site{len(self.docs_sites)}"
            self.context.add_data_docs_site(
                name,
                {
                    "class_name": "SiteBuilder",
                    "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(directory)},
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                },
            )
            self.docs_sites[directory] = name
        return self.docs_sites[directory]


_STATE: _GX | None = None
_STATE_LOCK = threading.Lock()


def _gx() -> _GX:
    global _STATE
    with _STATE_LOCK:
        if _STATE is None:
            _STATE = _GX()
        return _STATE


_CUSTOM_DEFINED = False


def define_custom_expectations() -> None:
    """Register the project's own expectation types (GX registers a class when it is defined)."""
    global _CUSTOM_DEFINED
    if _CUSTOM_DEFINED:
        return
    from great_expectations.execution_engine import PandasExecutionEngine
    from great_expectations.expectations.expectation import BatchExpectation, ColumnMapExpectation
    from great_expectations.expectations.metrics import ColumnMapMetricProvider, column_condition_partial

    class ExpectTableColumnsToExcludeSensitiveNames(BatchExpectation):
        """Expect no column named like a sensitive field: `names` exactly, or containing any of `patterns`
        (case-insensitive), except the columns listed in `allowed`."""

        names: list[str] = []
        patterns: list[str] = []
        allowed: list[str] = []
        metric_dependencies = ("table.columns",)
        domain_keys = ("batch_id",)
        success_keys = ("names", "patterns", "allowed")

        def _validate(self, metrics, runtime_configuration=None, execution_engine=None):
            bad = [
                str(c)
                for c in metrics["table.columns"]
                if str(c) not in self.allowed
                and (str(c) in self.names or any(p in str(c).lower() for p in self.patterns))
            ]
            return {"success": not bad, "result": {"observed_value": bad}}

    class ExpectTableColumnTypesToMatch(BatchExpectation):
        """Expect each listed column (when present) to have one of the listed pandas dtypes.

        One table-level check instead of one per column keeps GX's per-expectation cost down."""

        types: dict[str, list[str]] = {}
        metric_dependencies = ("table.column_types",)
        domain_keys = ("batch_id",)
        success_keys = ("types",)

        def _validate(self, metrics, runtime_configuration=None, execution_engine=None):
            actual = {str(c["name"]): str(c["type"]) for c in metrics["table.column_types"]}
            wrong = {
                column: actual[column]
                for column, allowed in self.types.items()
                if column in actual and actual[column] not in allowed
            }
            return {"success": not wrong, "result": {"observed_value": wrong}}

    class ColumnValuesByteLengthEquals(ColumnMapMetricProvider):
        """Per value: is it `value` bytes long (GX's own length metric decodes values as text)."""

        condition_metric_name = "column_values.byte_length_equals"
        condition_value_keys = ("value",)

        @column_condition_partial(engine=PandasExecutionEngine)
        def _pandas(cls, column, value, **kwargs):
            return column.map(len) == value

    class ExpectColumnValuesToBeBytesOfLength(ColumnMapExpectation):
        """Expect each non-null value of the column (bytes, e.g. pixels) to be exactly `value` bytes long."""

        value: int
        map_metric = "column_values.byte_length_equals"
        success_keys = ("value", "mostly")

    globals()["ExpectTableColumnsToExcludeSensitiveNames"] = ExpectTableColumnsToExcludeSensitiveNames
    globals()["ExpectTableColumnTypesToMatch"] = ExpectTableColumnTypesToMatch
    globals()["ExpectColumnValuesToBeBytesOfLength"] = ExpectColumnValuesToBeBytesOfLength
    _CUSTOM_DEFINED = True


_NAMES_COLUMNS = ("expect_table_columns_to_exclude_sensitive_names", "expect_table_column_types_to_match")


def _observed(result) -> Any:
    if result.exception_info and result.exception_info.get("raised_exception"):
        message = str(result.exception_info.get("exception_message") or "error").splitlines()[0]
        return f"error: {message[:200]}"
    observed = (result.result or {}).get("observed_value")
    if observed is None and "unexpected_count" in (result.result or {}):  # a per-value expectation
        return f"{result.result['unexpected_count']} unexpected value(s)"
    if isinstance(observed, float):
        return round(observed, 6)
    if isinstance(observed, dict):
        return {str(k): str(v) for k, v in list(observed.items())[:20]}
    if isinstance(observed, (list, tuple, set)):
        return sorted(str(x) for x in observed)[:20] if isinstance(observed, set) else list(observed)[:20]
    return observed if isinstance(observed, (int, str, bool, type(None))) else str(observed)



def validate(
    df: pd.DataFrame,
    suite: str | Mapping[str, Any],
    *,
    site_paths=None,
    dataset_id: str | None = None,
    check: bool = True,
) -> ValidationResult:
    """Run `suite` (a suite's name, or a built suite such as `suite_for` gives) on `df`. With
    `site_paths`: save the result, build Data Docs, log to MLflow.

    Raises ValidationFailed on failure unless `check=False`.
    """
    state = _gx()
    asset = _asset_name(dataset_id)
    suite_name = suite["name"] if isinstance(suite, Mapping) else suite
    with state.lock:
        expectations = state.suite(suite)
        frame = df if isinstance(df, pd.DataFrame) else pd.DataFrame(df)
        frame = frame.rename(columns=str)
        try:
            batch = state.batch_definition(asset).get_batch(batch_parameters={"dataframe": frame})
            gx_result = batch.validate(expectations, result_format="BASIC")
        except Exception as exc:  # GX itself could not run on this frame (e.g. duplicate column names)
            gx_result = batch = None
            failures = [{"expectation": "great_expectations_run", "column": None,
                         "observed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                         "kwargs": {}}]
        results = gx_result.results if gx_result is not None else []
        if gx_result is not None:
            failures = []
        checks = [{"expectation": item.expectation_config.type,
                   "column": item.expectation_config.kwargs.get("column"), "success": bool(item.success)}
                  for item in results]
        for item in results:
            if item.success:
                continue
            config = item.expectation_config
            observed = _observed(item)
            column = config.kwargs.get("column")
            if column is None and config.type in _NAMES_COLUMNS and observed:
                column = ", ".join(observed)  # the table-level checks name the offending columns
            failures.append(
                {
                    "expectation": config.type,
                    "column": column,
                    "observed": observed,
                    "kwargs": {k: v for k, v in config.kwargs.items() if k not in ("column", "batch_id")
                               and not (isinstance(v, list) and len(v) > 12)},
                }
            )
        result = ValidationResult(
            success=gx_result is not None and bool(gx_result.success) and not failures,
            suite=suite_name,
            dataset_id=dataset_id,
            failures=failures,
            evaluated=len(results),
            checks=checks,
        )
        if site_paths is not None and gx_result is not None:
            result.data_docs = _build_docs(state, site_paths, gx_result, batch, expectations.name, dataset_id)
    if site_paths is not None:
        _record(result, site_paths)
    if check and not result.success:
        raise ValidationFailed(result)
    return result


def _asset_name(dataset_id: str | None) -> str:
    if not dataset_id:
        return "dataset"
    return dataset_id.split("@")[0].replace("/", "-")


def _build_docs(state: _GX, site_paths, gx_result, batch, suite: str, dataset_id: str | None) -> Path | None:
    """Store this one result and render its Data Docs page (and the index) into `<site>/data-docs`."""
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    directory = Path(site_paths.root) / "data-docs"
    name = state.docs_site(directory)
    identifier = ValidationResultIdentifier(
        expectation_suite_identifier=ExpectationSuiteIdentifier(name=suite),
        run_id=RunIdentifier(run_name=(dataset_id or "dataset").replace("/", "_")),
        batch_identifier=batch.id,
    )
    state.context.validation_results_store.set(identifier, gx_result)
    state.context.build_data_docs(site_names=[name], resource_identifiers=[identifier])
    index = directory / "index.html"
    return index if index.exists() else None


def _record(result: ValidationResult, site_paths) -> None:

    payload = result.to_dict()
    if result.dataset_id:
        target = Path(site_paths.state_dir) / "validation" / f"{result.dataset_id}.json"
        write_json(target, payload)
        result.result_file = target
    mlflow = sys.modules.get("mlflow")  # no MLflow import, no active run
    if mlflow is not None and mlflow.active_run() is not None:
        stem = (result.dataset_id or "dataset").replace("/", "_")
        mlflow.log_dict(payload, f"validation/{result.suite}/{stem}.json")


def unreadable(path: Path, suite: str | Mapping, reason: str, dataset_id: str | None = None) -> ValidationResult:
    return ValidationResult(
        success=False,
        suite=suite["name"] if isinstance(suite, Mapping) else suite,
        dataset_id=dataset_id,
        failures=[{"expectation": "readable_parquet", "column": None, "observed": reason, "kwargs": {}}],
    )


def validate_file(
    path: Path, suite: str | Mapping, *, site_paths=None, dataset_id: str | None = None, check: bool = True
) -> ValidationResult:
    """Validate a Parquet file; one that cannot be read fails `readable_parquet` (never crashes)."""
    try:
        df = pd.read_parquet(io.BytesIO(Path(path).read_bytes()))
    except Exception as exc:  # corrupt, truncated, not Parquet, missing
        result = unreadable(path, suite, f"{Path(path).name}: {str(exc).splitlines()[0][:200]}", dataset_id)
        if site_paths is not None:
            _record(result, site_paths)
        if check:
            raise ValidationFailed(result) from exc
        return result
    return validate(df, suite, site_paths=site_paths, dataset_id=dataset_id, check=check)


def validate_dataset(paths, ref, suite: str, *, actor: str | None = None) -> ValidationResult:
    """Validate a catalogued version against `suite_for` it; a failure quarantines it (kept, never
    usable) and raises."""
    from pipelines.data import catalog

    version = catalog.get(paths, ref) if isinstance(ref, str) else ref
    if version.status == "quarantined":
        raise catalog.DatasetQuarantined(version)
    result = validate_file(
        catalog.content_path(paths, version), suite_for(paths, version, suite),
        site_paths=paths, dataset_id=version.id, check=False,
    )
    if not result.success:
        catalog.quarantine(paths, version, result.message(), actor=actor)
        raise ValidationFailed(result)
    return result


def read_for_validation(path: Path, suite: str = "training", dataset_id: str | None = None) -> pd.DataFrame:
    """Read a Parquet file to validate; an unreadable one raises ValidationFailed (`readable_parquet`)."""
    try:
        return pd.read_parquet(io.BytesIO(Path(path).read_bytes()))
    except Exception as exc:
        reason = f"{Path(path).name}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
        raise ValidationFailed(unreadable(path, suite, reason, dataset_id)) from exc


# ---------------------------------------------------------------------------- suites built from specs and data


def _expect(kind: str, notes: str | None = None, **kwargs: Any) -> dict[str, Any]:
    return {"type": kind, "kwargs": kwargs, "meta": {"notes": notes} if notes else {}}


def _types(dtype: str) -> list[str]:
    return STRING_TYPES if dtype in STRING_TYPES else [dtype]


def spec_expectations(spec: DataSpec) -> list[dict[str, Any]]:
    """What any dataset of `spec` satisfies: its columns and their types, unique ids, labels among its classes."""
    features = {c: ["float32"] for c in spec.feature_columns} if spec.encoding == "columns" else {
        spec.feature_columns[0]: ["object"]}
    types = {spec.id_column: STRING_TYPES, spec.label_column: ["int64"], **features,
             **{c: _types(t) for c, t in spec.metadata_columns.items()}}
    out = [
        _expect("expect_table_columns_to_match_set", "id, features and label present",
                column_set=[spec.id_column, *spec.feature_columns, spec.label_column], exact_match=False),
        _expect("expect_table_column_types_to_match", "types as the spec records them", types=types),
        _expect("expect_column_proportion_of_non_null_values_to_be_between", column=spec.id_column, min_value=1.0),
        _expect("expect_column_proportion_of_unique_values_to_be_between", "record ids are unique",
                column=spec.id_column, min_value=1.0),
        _expect("expect_column_proportion_of_non_null_values_to_be_between", column=spec.label_column, min_value=1.0),
        _expect("expect_column_distinct_values_to_be_in_set", f"labels are indices of {spec.n_classes} classes",
                column=spec.label_column, value_set=list(range(spec.n_classes))),
    ]
    if spec.encoding == "pixels":
        column = spec.feature_columns[0]
        out += [
            _expect("expect_column_proportion_of_non_null_values_to_be_between", column=column, min_value=1.0),
            _expect("expect_column_values_to_be_bytes_of_length", f"C*H*W bytes for {list(spec.input_shape)}",
                    column=column, value=spec.n_features),
        ]
    return out


def data_suite(spec: DataSpec, *, rows: int, nulls: Mapping[str, int],
               ranges: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """The suite a dataset's own data gives at import: the spec's expectations, no nulls in the columns
    that had none, each feature within the range it had."""
    out = [_expect("expect_table_row_count_to_be_between", "not empty", min_value=1), *spec_expectations(spec)]
    checked = {e["kwargs"].get("column") for e in out
               if e["type"] == "expect_column_proportion_of_non_null_values_to_be_between"}
    for column in (*spec.feature_columns, *spec.metadata_columns):
        if column not in checked and rows and not nulls.get(column, 0):
            out.append(_expect("expect_column_proportion_of_non_null_values_to_be_between",
                               "no nulls at import", column=column, min_value=1.0))
        if column in ranges:
            low, high = (float(v) for v in ranges[column])
            out += [_expect("expect_column_min_to_be_between", column=column, min_value=low, max_value=high),
                    _expect("expect_column_max_to_be_between", column=column, min_value=low, max_value=high)]
    return {"name": "data", "meta": {"notes": f"derived at import from {rows} rows", "spec": spec.to_dict()},
            "expectations": out}


def _purpose_expectations(spec: DataSpec, purpose: str) -> list[dict[str, Any]]:
    """Training: only the spec's own metadata may look sensitive. Release: nothing that does, nor any
    column the spec marks sensitive."""
    if purpose == "training":
        return [_expect("expect_table_columns_to_exclude_sensitive_names",
                        "only the spec's own metadata columns may look sensitive", names=[],
                        patterns=list(schema.SENSITIVE_NAME_PATTERNS), allowed=list(spec.metadata_columns))]
    return [_expect("expect_table_columns_to_exclude_sensitive_names",
                    "nothing that identifies people, missions, equipment or places leaves a site",
                    names=list(spec.sensitive_columns), patterns=list(schema.SENSITIVE_NAME_PATTERNS), allowed=[])]


def _stored_suite(paths, version) -> tuple[dict[str, Any] | None, str | None]:
    """The suite derived at import for `version` or its nearest ancestor at this site, with that version's id."""
    from pipelines.data import catalog

    queue, seen = [version], set()
    while queue:
        current = queue.pop(0)
        if current.id in seen:
            continue
        seen.add(current.id)
        relative = current.extra.get("expectations")
        if relative:
            root = (paths.repo / "expectations").resolve()
            path = (paths.repo / str(relative)).resolve()
            if root not in path.parents or not path.is_file():
                raise StepError(f"{current.id} names expectations {relative!r}, which are not in the site repo")
            return read_json(path), current.id
        queue += [catalog.get(paths, p) for p in current.parents if p.split("/", 1)[0] == paths.site]
    return None, None


def _narrowed(expectations: list[dict], spec: DataSpec, own: bool) -> list[dict]:
    """An ancestor's data suite for a descendant: only what holds for it. Rows were removed or kept,
    never changed, so the id, feature and label checks hold; metadata may since be dropped or
    coarsened, so its checks only hold for the version the suite was derived for (`own`)."""
    core = [spec.id_column, *spec.feature_columns, spec.label_column]
    keep = set(spec.columns if own else core)
    out = []
    for item in expectations:
        kwargs = dict(item["kwargs"])
        if "column" in kwargs and kwargs["column"] not in keep:
            continue
        if item["type"] == "expect_table_column_types_to_match":
            kwargs["types"] = {c: t for c, t in kwargs["types"].items() if c in keep}
        out.append({**item, "kwargs": kwargs})
    return out


def suite_for(paths, version, purpose: str) -> str | dict[str, Any]:
    """The suite `validate_dataset` checks `version` against for `purpose` (training, release).

    The digits demo (no spec in its record): the JSON suite of that name. A version with a data spec:
    the suite derived at import from its data or its nearest ancestor's at this site, else one derived
    from its spec, plus the purpose's check of sensitive column names."""
    if "spec" not in version.extra:
        return purpose
    if purpose not in PURPOSES:
        raise StepError(f"unknown expectation suite {purpose!r} for {version.id}; suites: {', '.join(PURPOSES)}")
    spec = spec_of(version.extra)
    stored, owner = _stored_suite(paths, version)
    if stored is None:
        body, origin = spec_expectations(spec), "its data spec"
    else:
        body, origin = _narrowed(stored["expectations"], spec, owner == version.id), f"the data of {owner}"
    return {"name": f"{purpose}-{version.name}-{version.md5[:12]}",
            "meta": {"notes": f"{purpose} suite for {version.id}, derived from {origin}"},
            "expectations": body + _purpose_expectations(spec, purpose)}
