"""Sanitization: what a data owner removes before a dataset leaves its site.

Rules come from `conf/sanitization.yaml`, per site and release purpose. `sanitize` is
pure (frame in, frame + report out); `sanitize_file` and `sanitize_dataset` add the
Parquet and catalog edges. The report is what the `data_release` gate reads
(`passed`, `remaining_sensitive_columns`).
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import read_yaml
from pipelines.context import StepError
from pipelines.data import schema
from pipelines.data.spec import DIGITS, DataSpec, spec_of
from pipelines.fileio import sha256_bytes, write_atomic

CONFIG_FILE = "sanitization.yaml"
GEO_COLUMNS = ("latitude", "longitude")
TIME_COLUMN = "capture_time"


class SanitizationError(StepError):
    """The input cannot be sanitized (missing columns, unknown purpose, bad config)."""


def is_sensitive_name(column: str) -> bool:
    """A column that identifies people, missions, equipment or places, by name or by look."""
    lowered = column.lower()
    return column in schema.SENSITIVE_COLUMNS or any(p in lowered for p in schema.SENSITIVE_NAME_PATTERNS)


def sensitive_columns(columns, spec: DataSpec | None = None) -> list[str]:
    """The columns sensitive by name, or because the data's spec marks them sensitive."""
    marked = set(spec.sensitive_columns) if spec else set()
    return [c for c in columns if is_sensitive_name(str(c)) or str(c) in marked]


def _dropped_columns(site: str) -> set[str]:
    """The columns the site's rules drop outright, for any purpose."""
    conf = read_yaml(CONFIG_FILE)
    sections = [conf.get("defaults") or {}, *(((conf.get("sites") or {}).get(site) or {}).values())]
    return {str(c) for section in sections for c in (section or {}).get("drop_columns") or ()}


def configured_columns(site: str) -> set[str]:
    """Every column the site's sanitization rules act on by name, for any purpose: dropped, geo, time.

    An imported file's columns named here are metadata, not features."""
    return {*_dropped_columns(site), *GEO_COLUMNS, TIME_COLUMN}


def sensitive_metadata(site: str, columns) -> list[str]:
    """Which of an imported dataset's metadata columns are sensitive: by name, or because the site's
    rules drop them or treat them as places (latitude, longitude)."""
    dropped = _dropped_columns(site)
    return [c for c in columns if is_sensitive_name(str(c)) or c in dropped or c in GEO_COLUMNS]


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def rules_for(site: str, purpose: str) -> dict[str, Any]:
    """The effective rules for one site and purpose; an unlisted purpose is refused."""
    conf = read_yaml(CONFIG_FILE)
    site_conf = (conf.get("sites") or {}).get(site)
    if site_conf is None:
        raise SanitizationError(f"conf/{CONFIG_FILE} has no section for site {site!r}")
    if purpose not in site_conf:
        raise SanitizationError(
            f"site {site!r} allows no release for purpose {purpose!r} in conf/{CONFIG_FILE}; "
            f"allowed purposes: {', '.join(sorted(site_conf))}"
        )
    rules = _merge(conf.get("defaults") or {}, site_conf[purpose] or {})
    geo_mode = (rules.get("geo") or {}).get("mode", "drop")
    if geo_mode not in ("drop", "round", "keep"):
        raise SanitizationError(f"geo.mode must be drop, round or keep, not {geo_mode!r}")
    coarsen = (rules.get("capture_time") or {}).get("coarsen", "day")
    if coarsen not in ("day", "week", "drop", "keep"):
        raise SanitizationError(f"capture_time.coarsen must be day, week, drop or keep, not {coarsen!r}")
    method = (rules.get("outliers") or {}).get("method", "mad")
    if method not in ("mad", "isolation_forest", "none"):
        raise SanitizationError(f"outliers.method must be mad, isolation_forest or none, not {method!r}")
    return rules


def parquet_bytes(df: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _ids(df: pd.DataFrame, mask, spec: DataSpec = DIGITS) -> list[str]:
    return [str(x) for x in df.loc[mask, spec.id_column]]


def _feature_keys(df: pd.DataFrame, spec: DataSpec) -> pd.Series:
    """An exact per-row key for the feature vector: hash first, raw bytes where hashes collide."""
    features = df[list(spec.feature_columns)]
    hashes = pd.util.hash_pandas_object(features, index=False)
    keys = hashes.astype("uint64").astype(object)
    candidates = np.flatnonzero(hashes.duplicated(keep=False).to_numpy())
    if spec.encoding == "pixels":
        raw = features[spec.feature_columns[0]]
        for i in candidates:
            keys.iat[i] = bytes(raw.iat[i])
    else:
        rows = np.ascontiguousarray(features.to_numpy())
        for i in candidates:
            keys.iat[i] = rows[i].tobytes()
    return keys


def _duplicates(df: pd.DataFrame, rules: dict, spec: DataSpec = DIGITS) -> tuple[pd.DataFrame, list[dict]]:
    conf = rules.get("duplicates") or {}
    key = _feature_keys(df, spec).reset_index(drop=True)
    labels = df[spec.label_column].reset_index(drop=True)
    results = []
    keep = np.ones(len(df), dtype=bool)
    if conf.get("contradictory", True):
        n_labels = labels.groupby(key, sort=False).transform("nunique")
        contradictory = (n_labels > 1).to_numpy()
        groups: dict[Any, list] = {}
        for i in np.flatnonzero(contradictory):
            groups.setdefault(key.iat[i], []).append(i)
        details = {}
        for members in groups.values():
            copies = [str(df[spec.id_column].iat[i]) for i in members]
            found = sorted({int(labels.iat[i]) for i in members})
            for rid in copies:
                details[rid] = f"same features as {', '.join(c for c in copies if c != rid)}; labels {found}"
        results.append(
            {
                "rule": "contradictory_duplicates",
                "reason": "records with identical features but different labels; every copy removed",
                "removed": _ids(df, contradictory, spec),
                "details": details,
            }
        )
        keep &= ~contradictory
    if conf.get("exact", True):
        # Within each group of identical records the lowest record id (the first captured) stays.
        frame = pd.DataFrame({"key": key, "label": labels, "rid": df[spec.id_column].astype(str).to_numpy()})
        frame = frame[keep]
        ordered = frame.sort_values("rid", kind="stable")
        extra = ordered.duplicated(["key", "label"], keep="first")
        kept = ordered.loc[~extra].set_index(["key", "label"])["rid"]
        exact = np.zeros(len(df), dtype=bool)
        exact[ordered.index[extra.to_numpy()]] = True
        details = {
            row.rid: f"copy of {kept.loc[(row.key, row.label)]}" for row in ordered.loc[extra].itertuples()
        }
        results.append(
            {
                "rule": "exact_duplicates",
                "reason": "records identical in features and label to another; the lowest record id is kept",
                "removed": _ids(df, exact, spec),
                "details": details,
            }
        )
        keep &= ~exact
    return df.loc[keep], results


def _outliers(df: pd.DataFrame, rules: dict, spec: DataSpec = DIGITS) -> tuple[pd.DataFrame, list[dict]]:
    conf = rules.get("outliers") or {}
    method = conf.get("method", "mad")
    if method == "none" or df.empty:
        return df, []
    x = spec.features(df).astype(np.float64)
    what, typical = ("pixels", "median image") if spec.kind == "image" else ("features", "median record")
    if method == "isolation_forest":
        from sklearn.ensemble import IsolationForest

        forest = IsolationForest(
            contamination=conf.get("contamination", "auto"), random_state=conf.get("random_state", 0)
        )
        flagged = forest.fit_predict(np.nan_to_num(x)) == -1
        scores = -forest.score_samples(np.nan_to_num(x))
        reason = f"IsolationForest (contamination={conf.get('contamination', 'auto')}) marks it anomalous"
    else:
        z_max = float(conf.get("z", 6.0))
        floor = float(conf.get("mad_floor", 0.05))
        max_fraction = float(conf.get("max_fraction", 0.25))
        scores = np.zeros(len(df))
        labels = df[spec.label_column].to_numpy()
        # Per label: a record's features (a digit's pixels) are compared with the typical record of its label.
        for label in np.unique(labels):
            rows = labels == label
            median = np.nanmedian(x[rows], axis=0)
            mad = np.nanmedian(np.abs(x[rows] - median), axis=0) * 1.4826
            z = np.abs(x[rows] - median) / np.maximum(mad, floor)
            scores[rows] = np.mean(np.nan_to_num(z, nan=np.inf) > z_max, axis=1)
        flagged = scores > max_fraction
        reason = (
            f"more than {max_fraction:.0%} of its {what} lie over {z_max} robust deviations "
            f"(median/MAD per label, MAD floor {floor}) from its label's {typical}"
        )
    details = {
        str(rid): f"score {score:.3f}"
        for rid, score in zip(df.loc[flagged, spec.id_column], scores[flagged], strict=True)
    }
    result = {"rule": "critical_outliers", "reason": reason, "removed": _ids(df, flagged, spec), "details": details}
    return df.loc[~flagged], [result]


def _coarsen_time(series: pd.Series, how: str) -> pd.Series:
    times = pd.to_datetime(series, utc=True)
    day = times.dt.floor("D")
    if how == "week":
        return day - pd.to_timedelta(day.dt.weekday, unit="D")
    return day


def sanitize(
    df: pd.DataFrame, site: str, purpose: str, *, input_digest: str | None = None, spec: DataSpec | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Apply the site's rules for `purpose`; return the clean frame and the sanitization report.

    The digests are sha256 of the Parquet bytes (`input_digest` overrides the input's, e.g. the
    bytes of the file it was read from). `spec` says where the features, labels and sensitive
    columns are (default: the digits demo).
    """
    clean, report, _ = _sanitize(df, site, purpose, input_digest, spec or DIGITS)
    return clean, report


def _sanitize(df: pd.DataFrame, site: str, purpose: str, input_digest: str | None, spec: DataSpec = DIGITS):
    rules = rules_for(site, purpose)
    required = [spec.id_column, *spec.feature_columns, spec.label_column]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SanitizationError(f"cannot sanitize: missing required columns {', '.join(missing)}")
    if df[spec.id_column].duplicated().any():
        dupes = df.loc[df[spec.id_column].duplicated(), spec.id_column].head(5).tolist()
        raise SanitizationError(f"cannot sanitize: {spec.id_column} is not unique (e.g. {dupes})")
    input_digest = input_digest or sha256_bytes(parquet_bytes(df))
    rows_in = len(df)
    out = df.reset_index(drop=True)
    report_rules: list[dict] = []

    out, found = _duplicates(out, rules, spec)
    report_rules += found
    out, found = _outliers(out.reset_index(drop=True), rules, spec)
    report_rules += found

    columns_removed: list[str] = []
    coarsened: dict[str, str] = {}
    drop = [c for c in rules.get("drop_columns", []) if c in out.columns]
    columns_removed += drop
    geo = rules.get("geo") or {}
    present_geo = [c for c in GEO_COLUMNS if c in out.columns]
    if geo.get("mode", "drop") == "drop":
        columns_removed += present_geo
    elif geo.get("mode") == "round":
        grid = float(geo.get("grid_deg", 1.0))
        out = out.copy()
        for column in present_geo:
            out[column] = (np.round(out[column].astype("float64") / grid) * grid).round(6)
            coarsened[column] = f"rounded to a {grid} degree grid"
    how = (rules.get("capture_time") or {}).get("coarsen", "day")
    if TIME_COLUMN in out.columns:
        if how == "drop":
            columns_removed.append(TIME_COLUMN)
        elif how in ("day", "week"):
            out = out.copy()
            out[TIME_COLUMN] = _coarsen_time(out[TIME_COLUMN], how)
            coarsened[TIME_COLUMN] = f"truncated to the {how}"
    out = out.drop(columns=columns_removed).reset_index(drop=True)

    remaining_sensitive = sensitive_columns(out.columns, spec)
    allow_sensitive = bool(rules.get("allow_sensitive", False))
    problems = []
    if remaining_sensitive and not allow_sensitive:
        problems.append(f"sensitive columns remain: {', '.join(remaining_sensitive)}")
    if out.empty:
        problems.append("no records remain")
    data = parquet_bytes(out)
    report = {
        "site": site,
        "purpose": purpose,
        "rules_config": rules,
        "rows_in": rows_in,
        "rows_out": len(out),
        "rules": [{**r, "count": len(r["removed"])} for r in report_rules],
        "columns_removed": columns_removed,
        "columns_coarsened": coarsened,
        "remaining_columns": [str(c) for c in out.columns],
        "remaining_sensitive_columns": remaining_sensitive,
        "allow_sensitive": allow_sensitive,
        "passed": not problems,
        "problems": problems,
        "input_digest": input_digest,
        "output_digest": sha256_bytes(data),
    }
    return out, report, data


def render_markdown(report: dict[str, Any]) -> str:
    """A readable summary of a sanitization report for officers."""
    lines = [
        f"# Sanitization report: {report['site']} / {report['purpose']}",
        "",
        f"- result: **{'passed' if report['passed'] else 'FAILED'}**"
        + (f" ({'; '.join(report['problems'])})" if report["problems"] else ""),
        f"- rows: {report['rows_in']} in, {report['rows_out']} out",
        f"- input: `{report['input_digest']}`",
        f"- output: `{report['output_digest']}`",
        f"- columns removed: {', '.join(report['columns_removed']) or 'none'}",
        "- columns coarsened: "
        + (", ".join(f"{k} ({v})" for k, v in report["columns_coarsened"].items()) or "none"),
        f"- remaining sensitive columns: {', '.join(report['remaining_sensitive_columns']) or 'none'}",
        f"- remaining columns: {len(report['remaining_columns'])}",
        "",
        "| rule | removed | why |",
        "|---|---|---|",
    ]
    for rule in report["rules"]:
        lines.append(f"| {rule['rule']} | {rule['count']} | {rule['reason']} |")
    for rule in report["rules"]:
        if rule["removed"]:
            lines += ["", f"## {rule['rule']}", ""]
            lines += [f"- `{rid}`: {rule['details'].get(rid, '')}" for rid in rule["removed"][:200]]
            if rule["count"] > 200:
                lines.append(f"- ... and {rule['count'] - 200} more (see the JSON report)")
    return "\n".join(lines) + "\n"


def report_paths(directory: Path, dataset_id: str) -> tuple[Path, Path]:
    base = Path(directory) / dataset_id
    return base.with_name(base.name + ".json"), base.with_name(base.name + ".md")


def write_report(report: dict[str, Any], directory: Path, dataset_id: str) -> tuple[Path, Path]:
    """Write `<directory>/<dataset_id>.json` and `.md` (a site/ folder per dataset id); return both."""
    json_path, md_path = report_paths(directory, dataset_id)
    write_atomic(json_path, json.dumps(report, indent=2, sort_keys=True, default=str).encode())
    write_atomic(md_path, render_markdown(report).encode())
    return json_path, md_path


def read_report(directory: Path, dataset_id: str) -> dict[str, Any] | None:
    """The sanitization report written for `dataset_id`, or None when there is none."""
    json_path, _ = report_paths(directory, dataset_id)
    if not json_path.is_file():
        return None
    return json.loads(json_path.read_text())


def read_parquet(path: Path) -> tuple[pd.DataFrame, bytes]:
    """Read a Parquet file; an unreadable one raises SanitizationError naming it."""
    try:
        data = Path(path).read_bytes()
        return pd.read_parquet(io.BytesIO(data)), data
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise SanitizationError(f"cannot read Parquet file {path}: {exc}") from exc


def sanitize_file(
    in_path: Path, out_path: Path, site: str, purpose: str, spec: DataSpec | None = None
) -> dict[str, Any]:
    """Sanitize one Parquet file into another and write `<out>.sanitization.{json,md}` beside it."""
    df, data = read_parquet(in_path)
    _, report, out_data = _sanitize(df, site, purpose, sha256_bytes(data), spec or DIGITS)
    write_atomic(Path(out_path), out_data)
    write_report(report, Path(out_path).parent, f"{Path(out_path).stem}.sanitization")
    return report


def sanitize_dataset(paths, ref: str, purpose: str, *, name: str | None = None, actor: str | None = None):
    """Sanitize a catalogued dataset into a new version whose parent is `ref`; return (version, report).

    The output is `data/sanitized/<source>-<purpose>.parquet`, DVC-tracked, registered as
    `<source>-sanitized` (kind sanitized); the report goes to `repo/reports/sanitization/<id>.{json,md}`
    (committed) and its summary into the version's record (`extra.sanitization`). A source with a data
    spec passes it on without the columns sanitization removed (`extra.spec`).
    """
    from pipelines.data import catalog, repo

    df, source = catalog.load_dataset(paths, ref)
    spec = spec_of(source.extra)
    clean, report, out_data = _sanitize(df, paths.site, purpose, None, spec)
    out_path = paths.data_dir / "sanitized" / f"{source.name}-{purpose}.parquet"
    write_atomic(out_path, out_data)
    extra: dict[str, Any] = {"sanitization": _summary(report)}
    if "spec" in source.extra:
        extra["spec"] = spec.keep_columns(clean.columns).to_dict()
    version = catalog.register_dataset(
        paths,
        name or f"{source.name}-sanitized",
        out_path,
        parents=(source.id,),
        kind="sanitized",
        extra=extra,
        actor=actor,
    )
    files = write_report(report, paths.repo / "reports" / "sanitization", version.id)
    repo.commit_files(paths, list(files), f"Sanitization report for {version.id}")
    return version, report


def _summary(report: dict) -> dict:
    """The part of the report the catalog keeps (record ids stay in the full report)."""
    keys = (
        "purpose",
        "rows_in",
        "rows_out",
        "columns_removed",
        "columns_coarsened",
        "remaining_sensitive_columns",
        "passed",
        "input_digest",
        "output_digest",
    )
    summary = {k: report[k] for k in keys}
    summary["removed"] = {r["rule"]: r["count"] for r in report["rules"]}
    return summary
