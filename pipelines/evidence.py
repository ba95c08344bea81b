"""What an officer sees on a gate page: the evidence itself, as small Markdown, not a path to it.

Pure functions: reports and records in, Markdown out. The steps before a gate put the result in
their XCom (`evidence_md`) and the gate's body shows it. Each piece is bounded (rows per table,
characters in all) and says what it left out, so an XCom stays small whatever the data. Every value
is escaped for Markdown: column names, dataset ids and comments may come from another party, and
the page must show them as text, never as links, images or HTML.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

MAX_CHARS = 6000  # of one evidence_md
MAX_ROWS = 20  # rows of one table or list
MAX_CELL = 160  # characters of one value
NOT_AVAILABLE = "not available"

_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~&])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def text(value: Any, limit: int = MAX_CELL) -> str:
    """`value` as one line of Markdown text that renders as itself (no markup, links or HTML)."""
    shown = _CONTROL.sub(" ", str(value)).strip()
    if len(shown) > limit:
        shown = shown[:limit] + "…"
    return _MARKDOWN.sub(r"\\\1", shown)


def listed(values: Iterable[Any], *, none: str = "none", limit: int = MAX_ROWS) -> str:
    values = list(values)
    if not values:
        return none
    shown = ", ".join(text(v) for v in values[:limit])
    return shown + (f" … and {len(values) - limit} more" if len(values) > limit else "")


def bounded(markdown: str, limit: int = MAX_CHARS, *, where: str = "the full report at the site") -> str:
    """`markdown` cut at a line boundary to at most `limit` characters, with a note saying so."""
    if len(markdown) <= limit:
        return markdown
    note = f"\n\n*… truncated ({len(markdown) - limit} more characters); see {where}.*"
    cut = markdown[: max(0, limit - len(note))]
    cut = cut[: cut.rfind("\n")] if "\n" in cut else cut
    return cut + note


def _table(header: list[str], rows: list[list[str]], *, what: str = "rows") -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows[:MAX_ROWS]]
    if len(rows) > MAX_ROWS:
        lines.append(f"\n*… and {len(rows) - MAX_ROWS} more {what}.*")
    return lines


def _yes(value: Any) -> str:
    return "yes" if value else "no"


# ---------------------------------------------------------------- data release


def sanitization_md(report: Mapping[str, Any], *, dataset: Mapping[str, Any], lineage: list[Mapping[str, Any]],
                    report_name: str | None = None) -> str:
    """What sanitization did, the released version's classification, purposes and recipients, and its
    lineage back to the raw source.

    `report`: a sanitization report (`pipelines.data.sanitize`); `dataset`: the sanitized version's
    lineage entry (`pipelines.data.lineage.entry`); `lineage`: `lineage_entries` of it."""
    result = "passed" if report.get("passed") else "**FAILED**"
    problems = report.get("problems") or []
    coarsened = report.get("columns_coarsened") or {}
    lines = [
        f"**Sanitization** (rules of {text(report.get('site'))} for *{text(report.get('purpose'))}*): {result}"
        + (f": {listed(problems)}" if problems else ""),
        "",
        *_table(["what", "result"], [
            ["rows before", text(report.get("rows_in"))],
            ["rows after", text(report.get("rows_out"))],
            ["columns dropped", listed(report.get("columns_removed") or [])],
            ["values coarsened", listed(f"{k}: {v}" for k, v in coarsened.items())],
            ["sensitive columns left", listed(report.get("remaining_sensitive_columns") or [])],
            ["columns released", text(len(report.get("remaining_columns") or []))],
            ["input digest", text(report.get("input_digest"))],
            ["output digest", text(report.get("output_digest"))],
        ]),
        "",
        "Rows removed, per reason:",
        "",
        *_table(["rule", "rows removed", "why"],
                [[text(r.get("rule")), text(r.get("count", len(r.get("removed") or []))), text(r.get("reason"), 300)]
                 for r in report.get("rules") or []], what="rules"),
        "",
        f"**Released version** {text(dataset.get('dataset_id'))}: classification "
        f"**{text(dataset.get('classification'))}**; purposes {listed(dataset.get('purposes') or [])}; "
        f"releasable to {listed(dataset.get('releasable_to') or [], none='nobody')}; "
        f"local only {_yes(dataset.get('local_only'))}; export-authorized {_yes(dataset.get('export_authorized'))}",
        "",
        "**Lineage** back to the raw source:",
        "",
        *lineage_md(lineage, dataset.get("dataset_id")),
    ]
    if report_name:
        lines += ["", f"Full report at the site: {text(report_name)}"]
    return bounded("\n".join(lines))


def lineage_md(entries: list[Mapping[str, Any]], start: Any) -> list[str]:
    """The lineage as a nested list from `start` back to its raw sources (each version once)."""
    by_id = {e.get("dataset_id"): e for e in entries}
    lines: list[str] = []

    def show(ref: Any, depth: int, seen: frozenset) -> None:
        if len(lines) >= MAX_ROWS:
            return
        entry = by_id.get(ref)
        indent = "  " * depth
        if entry is None:
            lines.append(f"{indent}- {text(ref)} (held elsewhere, not described)")
            return
        marks = [text(entry.get("kind", "?")), f"owner {text(entry.get('owner'))}",
                 text(entry.get("classification", "?")),
                 "LOCAL\\-ONLY" if entry.get("local_only") else "shareable"]
        if entry.get("status") == "quarantined":
            marks.append("QUARANTINED")
        lines.append(f"{indent}- {text(ref)} ({', '.join(marks)})")
        if ref in seen:
            return
        for parent in entry.get("parents") or []:
            show(parent, depth + 1, seen | {ref})

    show(start, 0, frozenset())
    if len(entries) > len(lines) and len(lines) >= MAX_ROWS:
        lines.append(f"- *… {len(entries) - len(lines)} more versions*")
    return lines or ["- none recorded"]


def validation_md(result: Mapping[str, Any]) -> str:
    """The validation result per expectation: each expectation type with the columns it passed and
    failed on, every failure with what was observed. `result`: `ValidationResult.to_dict()`."""
    checks = result.get("checks") or []
    failures = result.get("failures") or []
    verdict = "passed" if result.get("success") else "**FAILED**"
    grouped: dict[str, dict[str, list[str]]] = {}
    for check in checks:
        group = grouped.setdefault(str(check.get("expectation")), {"passed": [], "failed": []})
        group["passed" if check.get("success") else "failed"].append(str(check.get("column") or "(table)"))
    lines = [f"**Validation** (suite *{text(result.get('suite'))}*, {len(checks) or result.get('evaluated_expectations', 0)} "
             f"expectations): {verdict}", ""]
    rows = [[text(name), "pass" if not group["failed"] else "**FAIL**", text(len(group["passed"])),
             listed(group["failed"], none="")] for name, group in grouped.items()]
    lines += _table(["expectation", "result", "passed on", "failed on"], rows, what="expectation types")
    if failures:
        lines += ["", "Failures:", ""]
        lines += [f"- {text(f.get('expectation'))}" + (f" on {text(f.get('column'))}" if f.get("column") else "")
                  + f": observed {text(f.get('observed'))}" for f in failures[:MAX_ROWS]]
        if len(failures) > MAX_ROWS:
            lines.append(f"- *… and {len(failures) - MAX_ROWS} more*")
    return bounded("\n".join(lines))


# ---------------------------------------------------------------- model release


CHECKS = ("signature", "watermark", "robustness", "privacy")


def _metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def restrictions_text(restrictions: Mapping[str, Any] | None) -> str:
    """A model's capability restrictions in words (Markdown-escaped): "none" when it has none."""
    parts = []
    classes = (restrictions or {}).get("abstain_classes")
    if classes:
        parts.append(f"abstains on classes {listed(classes)}")
    cap = (restrictions or {}).get("max_confidence")
    if cap is not None:
        parts.append(f"confidence capped at {text(cap)}")
    return "; ".join(parts) or "none"


def model_md(candidate: Mapping[str, Any], others: list[Mapping[str, Any]],
             checks: Mapping[str, Mapping[str, Any] | None] | None = None, *,
             restrictions: Mapping[str, Any] | None = None) -> str:
    """The candidate's metrics on each test set beside the models it is compared with, and the checks.

    `candidate`: {label, model, metrics}; `others`: [{label, model, metrics}] (the model it would
    replace, the site's own models), each row showing the candidate's difference to it; `checks`:
    name -> {passed: bool (None: checked at another site), required: bool | None, detail} or None
    (not available yet); every name of CHECKS is shown. `restrictions` (an export variant's, from its signed metadata; `{}`: none) adds a
    row "capability restrictions" under the checks, enforced by `factory serve` where the model runs."""
    metrics = candidate.get("metrics") or {}
    keys = sorted({*metrics, *(k for o in others for k in (o.get("metrics") or {}))})
    if keys:
        rows = [[f"**{text(candidate.get('label'))}** {text(candidate.get('model'))}",
                 *(_metric(metrics.get(k)) for k in keys)]]
        for other in others:
            cells = []
            for k in keys:
                value, mine = (other.get("metrics") or {}).get(k), metrics.get(k)
                shown = _metric(value)
                if shown and _metric(mine):
                    shown += f" ({text(candidate.get('short', candidate.get('label')))} {mine - value:+.4f})"
                cells.append(shown)
            rows.append([f"{text(other.get('label'))} {text(other.get('model'))}", *cells])
        lines = _table(["model", *(text(k) for k in keys)], rows, what="models")
    else:
        lines = ["No metrics on this site's test sets."]
    checks = dict(checks or {})
    rows = []
    for name in [*CHECKS, *(c for c in checks if c not in CHECKS)]:
        check = checks.get(name)
        if check is None:
            rows.append([text(name), NOT_AVAILABLE, "", ""])
            continue
        required, passed = check.get("required"), check.get("passed")
        rows.append([text(name), "elsewhere" if passed is None else "pass" if passed else "**FAIL**",
                     "" if required is None else ("required" if required else "not required"),
                     text(check.get("detail") or "")])
    lines += ["", *_table(["check", "result", "policy", "detail"], rows, what="checks")]
    if restrictions is not None:
        lines += ["", *_table(["capability restrictions", "enforced"], [[
            restrictions_text(restrictions),
            "by factory serve wherever the model runs (signed with the model)" if restrictions else ""]])]
    return bounded("\n".join(lines))
