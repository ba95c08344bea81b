"""pipelines.evidence: the gate pages' evidence as small, escaped, bounded Markdown."""

from __future__ import annotations

import re

from pipelines import evidence

HOSTILE = "<img src=x onerror=alert(1)> [click](http://evil) `code` | pipe"


def _report(**override) -> dict:
    report = {
        "site": "origin", "purpose": "export", "rows_in": 120, "rows_out": 111, "passed": True, "problems": [],
        "columns_removed": ["sensor_serial", "operator", "latitude", "longitude"],
        "columns_coarsened": {"capture_time": "truncated to the week"},
        "remaining_columns": ["record_id", "f00", "label"], "remaining_sensitive_columns": [],
        "input_digest": "sha256:" + "a" * 64, "output_digest": "sha256:" + "b" * 64,
        "rules": [
            {"rule": "contradictory_duplicates", "reason": "identical features, different labels",
             "removed": ["r1", "r2"], "count": 2},
            {"rule": "exact_duplicates", "reason": "copies", "removed": ["r3"] * 4, "count": 4},
            {"rule": "critical_outliers", "reason": "far from the median image", "removed": ["r9"] * 3, "count": 3},
        ],
    }
    return report | override


DATASET = {"dataset_id": "origin/export_authorized-sanitized@6422b431c65d", "classification": "restricted",
           "purposes": ["training", "export"], "releasable_to": ["supplier", "destination"], "local_only": False,
           "export_authorized": True, "kind": "sanitized", "owner": "origin",
           "parents": ["origin/export_authorized@83a12e875b64"]}
RAW = {"dataset_id": "origin/export_authorized@83a12e875b64", "classification": "restricted", "kind": "raw",
       "owner": "origin", "local_only": False, "parents": []}


def test_sanitization_table_counts_and_lineage():
    md = evidence.sanitization_md(_report(), dataset=DATASET, lineage=[DATASET, RAW], report_name="x@1.md")
    lines = md.splitlines()
    assert "| rows before | 120 |" in lines and "| rows after | 111 |" in lines
    assert r"| columns dropped | sensor\_serial, operator, latitude, longitude |" in lines
    assert r"| values coarsened | capture\_time: truncated to the week |" in lines
    assert r"| contradictory\_duplicates | 2 | identical features, different labels |" in lines
    assert r"| exact\_duplicates | 4 | copies |" in lines
    assert "classification **restricted**" in md and "releasable to supplier, destination" in md
    assert "purposes training, export" in md
    # the lineage as a list from the released version back to the raw source
    (released,) = [i for i, line in enumerate(lines) if line.startswith(r"- origin/export\_authorized\-sanitized@")]
    assert lines[released + 1].startswith(r"  - origin/export\_authorized@83a12e875b64 (raw, owner origin")


def test_failed_sanitization_is_marked_and_names_the_problem():
    md = evidence.sanitization_md(_report(passed=False, problems=["sensitive columns remain: operator"],
                                          remaining_sensitive_columns=["operator"]), dataset=DATASET, lineage=[DATASET])
    assert "**FAILED**: sensitive columns remain: operator" in md
    assert "| sensitive columns left | operator |" in md
    assert r"origin/export\_authorized@83a12e875b64 (held elsewhere, not described)" in md


def test_values_from_other_parties_render_as_text():
    md = evidence.sanitization_md(_report(columns_removed=[HOSTILE], site=HOSTILE),
                                  dataset=DATASET | {"classification": HOSTILE}, lineage=[])
    for raw in ("<img", "[click]", "`code`", "| pipe"):  # only ever with each mark escaped
        assert not re.search(r"(?<!\\)" + re.escape(raw), md), raw
    assert r"\<img src=x onerror=alert\(1\)\> \[click\]\(http://evil\) \`code\` \| pipe" in md
    assert evidence.text("a\nb\x00c") == "a b c"


def test_evidence_is_bounded_and_says_what_it_left_out():
    many = [{"rule": f"rule-{i}", "reason": "x" * 300, "removed": [], "count": i} for i in range(200)]
    md = evidence.sanitization_md(_report(rules=many, columns_removed=[f"c{i}" for i in range(500)]),
                                  dataset=DATASET, lineage=[DATASET, RAW])
    assert len(md) <= evidence.MAX_CHARS
    assert "… and 480 more" in md  # the dropped columns beyond the first MAX_ROWS
    assert "*… and 180 more rules.*" in md or "truncated (" in md
    long = evidence.bounded("line\n" * 5000, 1000, where="the report")
    assert len(long) <= 1000 and long.endswith("see the report.*")


def test_validation_per_expectation_with_failures():
    result = {"success": False, "suite": "release", "evaluated_expectations": 4, "checks": [
        {"expectation": "expect_column_min_to_be_between", "column": "f00", "success": True},
        {"expectation": "expect_column_min_to_be_between", "column": "f01", "success": False},
        {"expectation": "expect_table_columns_to_exclude_sensitive_names", "column": None, "success": False},
        {"expectation": "expect_column_values_to_not_be_null", "column": "label", "success": True}],
        "failures": [{"expectation": "expect_column_min_to_be_between", "column": "f01", "observed": -3},
                     {"expectation": "expect_table_columns_to_exclude_sensitive_names", "column": "operator",
                      "observed": ["operator"]}]}
    lines = evidence.validation_md(result).splitlines()
    assert r"**Validation** (suite *release*, 4 expectations): **FAILED**" == lines[0]
    assert r"| expect\_column\_min\_to\_be\_between | **FAIL** | 1 | f01 |" in lines
    assert r"| expect\_column\_values\_to\_not\_be\_null | pass | 1 |  |" in lines
    assert r"| expect\_table\_columns\_to\_exclude\_sensitive\_names | **FAIL** | 0 | \(table\) |" in lines
    assert r"- expect\_column\_min\_to\_be\_between on f01: observed \-3" in lines


def test_model_metrics_beside_the_models_compared_and_checks_not_yet_available():
    md = evidence.model_md(
        {"label": "M5 under review", "short": "M5", "model": "digits-cnn-m5-default/1",
         "metrics": {"origin_test": 0.87}},
        [{"label": "previous version", "model": "digits-cnn-m5-default/0", "metrics": {"origin_test": 0.85}},
         {"label": "M3 (this site's)", "model": "digits-cnn-m3/1", "metrics": {"origin_test": 0.92}},
         {"label": "M4 (this site's)", "model": "digits-cnn-m4/2", "metrics": {}}],
        {"signature": {"passed": True, "required": True, "detail": "verified at origin"}})
    lines = md.splitlines()
    assert lines[:2] == [r"| model | origin\_test |", "|---|---|"]
    assert r"| **M5 under review** digits\-cnn\-m5\-default/1 | 0.8700 |" in lines
    assert r"| previous version digits\-cnn\-m5\-default/0 | 0.8500 (M5 +0.0200) |" in lines
    assert r"| M3 (this site's) digits\-cnn\-m3/1 | 0.9200 (M5 -0.0500) |".replace("(this", r"\(this").replace(
        "site's)", r"site's\)") in lines
    assert r"| M4 \(this site's\) digits\-cnn\-m4/2 |  |" in lines
    assert "| signature | pass | required | verified at origin |" in lines
    for name in ("watermark", "robustness", "privacy"):
        assert f"| {name} | not available |  |  |" in lines
    failed = evidence.model_md({"label": "M5", "model": "m", "metrics": {}},
                               [], {"signature": {"passed": False, "required": True}})
    assert "No metrics on this site's test sets." in failed and "| signature | **FAIL** | required |  |" in failed
