"""The compliance report (`factory audit report`): what a site decided, approved, released, received,
quarantined and did with its keys, with who, when, why and on which evidence, as one HTML file.

Everything comes from the site's audit log; the result of `audit.verify` (chain, signatures, the
signed head and the heads partners witnessed) stands at the top, red and naming the first bad entry
when the log is broken. Entries are listed oldest first (newest last). Every value in an entry may
come from another party (a package header, a gate answer's comment), so the template escapes all of
it (Jinja2 autoescape) and long values are cut.

No PDF: no well-kept HTML-to-PDF library is installed here (WeasyPrint and the like pull native
libraries); a browser prints the HTML file.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from pipelines.config import SITES
from pipelines.fileio import write_atomic
from pipelines.trust import audit, keys
from pipelines.workspace import SitePaths

# What the report lists, by audit action; other actions are counted at the end, not listed.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "gate decision": ("policy.decision",),
    "approval": ("approval.answered", "approval.document", "approval.sent", "export.requested",
                 "export.approved", "export.rejected"),
    "release": ("model.released", "package.sealed", "package.delivered", "transfer.exported"),
    "receipt": ("package.received", "package.opened", "transfer.imported", "model.registered",
                "dataset.registered"),
    "quarantine": ("package.quarantined", "package.rejected", "package.refused", "package.delivery_refused",
                   "dataset.quarantined", "transfer.refused"),
    "key event": ("site.initialised", "keys.rotated", "keys.accepted", "keys.revoked", "keys.passphrase_changed",
                  "policy.pinned", "audit.recovered", "audit.head_refused", "audit.fork_witnessed"),
}
CATEGORY_OF = {action: category for category, actions in CATEGORIES.items() for action in actions}

# details keys that name the evidence an entry rests on; path-like ones are shown by their file name only
EVIDENCE_KEYS = ("dataset", "dataset_id", "model", "stage", "variant", "digest", "md5", "request_id",
                 "package_id", "sender", "recipient", "purpose", "end_use", "content_type", "content_digest",
                 "input_digest", "bundle_digest", "bundle_revision", "dag_id", "run_id", "owner_site", "by",
                 "signing_key_id", "key_id", "generation", "previous")
PATH_KEYS = ("report", "file", "path", "moved_to", "policies")
REASON_KEYS = ("reasons", "reason", "comment", "problems")
MAX_TEXT = 300  # characters of one shown value
MAX_ITEMS = 12  # values of one list shown


class ReportError(ValueError):
    """The report cannot be made as asked (an unreadable --since)."""


def parse_since(text: str | None) -> datetime | None:
    """A date (`2026-12-01`, midnight UTC) or an ISO time with or without zone (UTC assumed)."""
    if not text:
        return None
    try:
        moment = keys.parse_time(text)
    except ValueError:
        raise ReportError(f"--since {text[:40]!r} is not a date (YYYY-MM-DD) or an ISO time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "…"


def _name(value: Any) -> str:
    """The file name of a path-like value (a full path of the site is not evidence, its name is)."""
    return _short(PurePosixPath(str(value)).name or str(value))


def _values(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [f"{k}={_short(v)}" for k, v in list(value.items())[:MAX_ITEMS]]
    if isinstance(value, list):
        shown = [_short(v) for v in value[:MAX_ITEMS]]
        return shown + ([f"… {len(value) - MAX_ITEMS} more"] if len(value) > MAX_ITEMS else [])
    return [_short(value)]


def _approvals(value: Any) -> list[str]:
    out = []
    for approval in value[:MAX_ITEMS] if isinstance(value, list) else []:
        if isinstance(approval, dict):
            out.append(f"{_short(approval.get('decision'))} by {_short(approval.get('user'))} of "
                       f"{_short(approval.get('site'))}" + (f": {_short(approval['comment'])}"
                                                            if approval.get("comment") else ""))
    return out


def evidence(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) pairs naming what the entry's decision or act rests on."""
    details = entry.get("details") if isinstance(entry.get("details"), dict) else {}
    pairs = []
    subject = details.get("subject")  # what a gate decided on (pipelines.policy.decision_subject)
    if isinstance(subject, dict):
        pairs += [(str(k)[:40], _short(v)) for k, v in list(subject.items())[:MAX_ITEMS]]
    for key in EVIDENCE_KEYS:
        if details.get(key) not in (None, "", [], {}):
            pairs += [(key, text) for text in _values(details[key])]
    for key in PATH_KEYS:
        if details.get(key):
            pairs.append((key, _name(details[key])))
    for text in _approvals(details.get("approvals")):
        pairs.append(("approval", text))
    return pairs


def reasons(entry: dict[str, Any]) -> list[str]:
    details = entry.get("details") if isinstance(entry.get("details"), dict) else {}
    out = []
    for key in REASON_KEYS:
        value = details.get(key)
        if value not in (None, "", []):
            out += _values(value)
    return out


def _verification(paths: SitePaths) -> dict[str, Any]:
    """`audit.verify` with every head the partners under this FACTORY_HOME witnessed."""
    try:
        heads = [head for partner in SITES if partner != paths.site
                 for head in audit.witnessed_heads(SitePaths.of(partner, paths.home), paths.site)]
        audit.verify(paths, heads)
    except (audit.AuditError, keys.TrustError, OSError) as error:
        return {"ok": False, "message": str(error), "witnessed": 0}
    return {"ok": True, "message": "chain, signatures and signed head verify", "witnessed": len(heads)}


def _readable_entries(paths: SitePaths) -> tuple[list[dict[str, Any]], str | None]:
    """The entries that can be read, and why reading stopped early (None when all could)."""
    read: list[dict[str, Any]] = []
    try:
        for entry in audit.entries(paths):
            read.append(entry if isinstance(entry, dict) else {"action": "?", "details": {}})
    except audit.AuditError as error:
        return read, str(error)
    return read, None


def collect(paths: SitePaths, since: datetime | None = None) -> dict[str, Any]:
    """The report's content: verification, listed rows (oldest first) and counts."""
    entries, unreadable = _readable_entries(paths)
    rows, others = [], Counter()
    for entry in entries:
        when = entry.get("time")
        if since is not None:
            try:
                if keys.parse_time(str(when)) < since:
                    continue
            except ValueError:
                pass  # an unreadable time is listed: hiding it would hide tampering
        action = str(entry.get("action"))
        category = CATEGORY_OF.get(action)
        if category is None:
            others[action] += 1
            continue
        rows.append({"seq": _short(entry.get("seq")), "time": _short(when), "category": category,
                     "action": _short(action), "actor": _short(entry.get("actor")),
                     "object": _short(entry.get("object")), "outcome": _short(entry.get("outcome")),
                     "reasons": reasons(entry), "evidence": evidence(entry)})
    return {"site": paths.site, "since": since.isoformat() if since else None,
            "generated": keys.iso(keys.now()), "verification": _verification(paths), "unreadable": unreadable,
            "rows": rows, "counts": Counter(row["category"] for row in rows),
            "others": sorted(others.items()), "total": len(entries)}


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Compliance report: {{ r.site }}</title>
<style>
body { font-family: sans-serif; margin: 2em; }
table { border-collapse: collapse; width: 100%; font-size: 0.85em; }
th, td { border: 1px solid #bbb; padding: 0.3em; vertical-align: top; text-align: left; }
th { background: #eee; }
.ok { background: #d4edda; border: 2px solid #2e7d32; padding: 0.8em; }
.broken { background: #f8d7da; border: 2px solid #c62828; color: #8b0000; padding: 0.8em; }
.deny, .reject, .rejected, .refused, .invalid, .forged, .fork { color: #c62828; font-weight: bold; }
code { word-break: break-all; }
ul { margin: 0; padding-left: 1.2em; }
</style></head>
<body>
<h1>Compliance report: site {{ r.site }}</h1>
<p>Generated {{ r.generated }}{% if r.since %}; entries since {{ r.since }}{% endif %}.
{{ r.total }} audit entries read; {{ r.rows | length }} listed below, oldest first.</p>
{% if r.verification.ok %}
<div class="ok" id="chain"><strong>Audit chain verified:</strong> {{ r.verification.message }};
{{ r.verification.witnessed }} heads witnessed by partners found in it.</div>
{% else %}
<div class="broken" id="chain"><strong>AUDIT CHAIN BROKEN:</strong> {{ r.verification.message }}.
The entries below cannot be relied on.</div>
{% endif %}
{% if r.unreadable %}<p class="broken">Reading stopped early: {{ r.unreadable }}</p>{% endif %}
<h2>Summary</h2>
<ul>{% for category in categories %}<li>{{ category }}: {{ r.counts.get(category, 0) }}</li>{% endfor %}</ul>
<h2>Decisions, approvals, releases, receipts, quarantines and key events</h2>
<table>
<thead><tr><th>seq</th><th>time (UTC)</th><th>kind</th><th>action</th><th>who</th><th>object</th>
<th>outcome</th><th>why</th><th>evidence</th></tr></thead>
<tbody>
{% for row in r.rows %}
<tr><td>{{ row.seq }}</td><td>{{ row.time }}</td><td>{{ row.category }}</td><td>{{ row.action }}</td>
<td>{{ row.actor }}</td><td><code>{{ row.object }}</code></td>
<td class="{{ row.outcome }}">{{ row.outcome }}</td>
<td>{% if row.reasons %}<ul>{% for reason in row.reasons %}<li>{{ reason }}</li>{% endfor %}</ul>{% endif %}</td>
<td>{% if row.evidence %}<ul>{% for name, value in row.evidence %}<li>{{ name }}: <code>{{ value }}</code></li>
{% endfor %}</ul>{% endif %}</td></tr>
{% endfor %}
</tbody></table>
{% if r.others %}
<h2>Other entries (not listed)</h2>
<ul>{% for action, count in r.others %}<li>{{ action }}: {{ count }}</li>{% endfor %}</ul>
<p>See <code>factory audit show --site {{ r.site }}</code>.</p>
{% endif %}
</body></html>
"""


def _html(content: dict[str, Any]) -> str:
    from jinja2 import Environment

    environment = Environment(autoescape=True, keep_trailing_newline=True)
    return environment.from_string(TEMPLATE).render(r=content, categories=list(CATEGORIES))


def render(paths: SitePaths, since: datetime | None = None) -> str:
    """The report as one HTML page (every value escaped)."""
    return _html(collect(paths, since))


def write_report(paths: SitePaths, out: Path, since: datetime | None = None) -> dict[str, Any]:
    """Write the HTML report to `out` (atomically); return whether the chain verified, why not, and the
    number of entries listed."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"--out {out.name[:80]} must end in .html: no PDF renderer is installed here "
                          "(print the HTML page from a browser instead)")
    content = collect(paths, since)
    write_atomic(out, _html(content).encode())
    return {"verified": content["verification"]["ok"], "message": content["verification"]["message"],
            "listed": len(content["rows"])}
