"""Server-rendered HTML: the build list (newest first) and a page per build. No JavaScript, no build step.

Every stored value is escaped, and every stored value is read through ``_dict`` / ``_strs`` / ``_num``:
an entry stored before the service validated metadata (or by another version) renders with blanks
instead of making its page fail on every visit."""

from __future__ import annotations

import datetime
from html import escape
from typing import Any
from urllib.parse import quote

from kernel_ci.cache.server.index import BuildRow, BuildSummary

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;padding:.35em .5em;
text-align:left;vertical-align:top}th{background:#f4f4f4}code{font-size:12px}
.pass{color:#176f2c;font-weight:600}.fail{color:#b3261e;font-weight:600}.muted{color:#777}
a.dl{margin-right:.6em}pre{background:#f7f7f7;padding:.6em;overflow:auto}
"""


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>"
    )


def _when(timestamp: object) -> str:
    if not isinstance(timestamp, int | float) or isinstance(timestamp, bool):
        return "?"
    try:
        return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (ValueError, OverflowError, OSError):
        return "?"


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strs(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return None
    return float(value)


def _counts(runs: list[dict[str, Any]]) -> dict[str, int] | None:
    """Test counts of the newest run that carried a JUnit report."""
    for run in reversed(runs):
        if isinstance(run, dict) and isinstance(run.get("counts"), dict):
            return run["counts"]
    return None


def summary_json(row: BuildSummary) -> dict[str, Any]:
    return {
        "key": row.key,
        "created": row.created,
        "pinned": row.pinned,
        "bytes": row.bytes,
        **row.summary,
        "tests": _counts(row.runs),
        "runs": [r.get("run_id") for r in row.runs],
    }


def _file_url(key: str, name: str) -> str:
    return f"/api/v1/builds/{key}/files/{quote(name)}"


def _run_url(key: str, run_id: str, part: str) -> str:
    return f"/api/v1/builds/{key}/runs/{quote(run_id)}/{part}"


def _tests_cell(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "<span class=muted>no test run</span>"
    bad = int(_num(counts.get("failed")) or 0) + int(_num(counts.get("errors")) or 0)
    return (
        f"<span class=pass>{int(_num(counts.get('passed')) or 0)} passed</span> / "
        f'<span class="{"fail" if bad else "muted"}">{bad} failed</span>'
        + (
            f" <span class=muted>({int(_num(counts['skipped']) or 0)} skipped)</span>"
            if counts.get("skipped")
            else ""
        )
    )


def _downloads(key: str, outputs: list[str], runs: list[dict[str, Any]]) -> str:
    links = []
    for name in _strs(outputs):
        if name == "bzImage" or name.endswith((".mbox", ".patch")):
            links.append(f'<a class=dl href="{_file_url(key, name)}">{escape(name.rsplit("/", 1)[-1])}</a>')
    for run in runs[-1:]:
        run_id = str(run.get("run_id"))
        if "junit" in run:
            links.append(f'<a class=dl href="{_run_url(key, run_id, "junit.xml")}">JUnit XML</a>')
        if "console" in run:
            links.append(f'<a class=dl href="{_run_url(key, run_id, "console.log")}">console log</a>')
    return " ".join(links) or "<span class=muted>-</span>"


def list_page(rows: list[BuildSummary], total: int, limit: int, offset: int) -> str:
    head = (
        "<tr><th>built</th><th>kernel</th><th>patch series</th><th>config fragments</th><th>tests</th>"
        "<th>ccache hits</th><th>downloads</th><th>key</th></tr>"
    )
    lines = []
    for row in rows:
        s = _dict(row.summary)
        rate = _num(s.get("ccache_hit_rate"))
        lines.append(
            "<tr>"
            f"<td>{escape(_when(row.created))}</td>"
            f"<td>{escape(str(s.get('kernel_version', '')))}<br><span class=muted>"
            f"{escape(str(s.get('kernel_release', '')))}</span></td>"
            f"<td>{escape(', '.join(_strs(s.get('series'))) or 'none (vanilla)')}</td>"
            f"<td>{'<br>'.join(escape(f) for f in _strs(s.get('fragments')))}</td>"
            f"<td>{_tests_cell(_counts(row.runs))}</td>"
            f"<td>{'-' if rate is None else f'{rate:.0%}'}</td>"
            f"<td>{_downloads(row.key, s.get('outputs', []), row.runs)}</td>"
            f'<td><a href="/builds/{row.key}"><code>{row.key[:16]}</code></a>'
            f"{' 📌' if row.pinned else ''}</td>"
            "</tr>"
        )
    nav = []
    if offset > 0:
        nav.append(f'<a href="/?offset={max(offset - limit, 0)}&limit={limit}">newer</a>')
    if offset + limit < total:
        nav.append(f'<a href="/?offset={offset + limit}&limit={limit}">older</a>')
    body = (
        f"<h1>kernel-ci build cache</h1><p>{total} build(s), newest first.</p>"
        f"<table id=builds>{head}{''.join(lines)}</table><p>{' '.join(nav)}</p>"
        '<p class=muted><a href="/openapi.json">API (OpenAPI)</a> · <a href="/metrics">metrics</a></p>'
    )
    return _page("kernel-ci build cache", body)


def build_page(row: BuildRow, explanation: dict[str, Any] | None) -> str:
    key = row.key
    runs = [_run_html(key, r) for r in reversed([r for r in row.runs if isinstance(r, dict)])]
    body = (
        f'<p><a href="/">all builds</a></p><h1>build {key[:16]}</h1><table>{_facts_html(row)}</table>'
        "<h2>outputs</h2><table id=outputs><tr><th>file</th><th>bytes</th><th>sha256</th></tr>"
        f"{_outputs_html(key, row.doc['outputs'])}</table>"
        f"<h2>test results</h2>{''.join(runs) or '<p class=muted>No test run attached.</p>'}"
        f"<h2>why a build with these inputs misses the cache of the others</h2>{_miss_html(explanation)}"
    )
    return _page(f"build {key[:16]}", body)


def _facts_html(row: BuildRow) -> str:
    doc = row.doc
    meta = _dict(doc.get("metadata"))
    kernel = _dict(meta.get("kernel"))
    facts = [
        ("build key", f"<code>{row.key}</code>" + (" (pinned)" if row.pinned else "")),
        ("kernel", escape(f"{kernel.get('version', '')} release {kernel.get('release', '')}")),
        ("patch series", escape(", ".join(_strs(meta.get("series"))) or "none (vanilla)")),
        ("config fragments", "<br>".join(escape(f) for f in _strs(meta.get("fragments")))),
        ("toolchain", escape(str(_dict(meta.get("toolchain")).get("gcc", "")))),
        ("ccache", escape(_ccache_text(meta.get("ccache")))),
        ("published", escape(_when(doc.get("published", row.created)))),
        ("reproduce", f"<code>{escape(str(meta.get('reproduce', '')))}</code>"),
    ]
    return "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)


def _outputs_html(key: str, outputs: list[dict[str, Any]]) -> str:
    return "".join(
        f'<tr><td><a href="{_file_url(key, o["name"])}">{escape(o["name"])}</a>'
        f"{' (tar)' if o['kind'] == 'tar' else ''}</td><td>{o['size']:,}</td>"
        f"<td><code>{o['sha256'][:16]}</code></td></tr>"
        for o in outputs
    )


def _run_html(key: str, run: dict[str, Any]) -> str:
    run_id = str(run.get("run_id"))
    links = []
    if "junit" in run:
        links.append(f'<a href="{_run_url(key, run_id, "junit.xml")}">JUnit XML</a>')
    if "console" in run:
        links.append(f'<a href="{_run_url(key, run_id, "console.log")}">console log</a>')
    cases = "".join(
        f"<tr><td>{escape(str(c.get('suite', '')))}</td><td>{escape(str(c.get('name', '')))}</td>"
        f'<td class="{_status_class(str(c.get("status", "")))}">'
        f"{escape(str(c.get('status', '')))}</td><td>{escape(str(c.get('time', '')))}</td>"
        f"<td>{escape(str(c.get('message', '')))}</td></tr>"
        for c in run.get("cases", [])
        if isinstance(c, dict)
    )
    return (
        f"<h3>run {escape(run_id)} {escape(str(run.get('outcome', '')))}</h3>"
        f"<p>{_tests_cell(_dict(run.get('counts')) or None)} · {' · '.join(links)}</p>"
        + (
            "<table class=cases><tr><th>suite</th><th>test</th><th>result</th><th>s</th>"
            "<th>message</th></tr>"
            f"{cases}</table>"
            if cases
            else ""
        )
    )


def _miss_html(explanation: dict[str, Any] | None) -> str:
    if explanation and explanation.get("busy"):
        return "<p class=muted>Too many comparisons in progress: reload this page in a moment.</p>"
    if explanation and explanation.get("nearest"):
        nearest = explanation["nearest"]
        return (
            f'<p>Nearest other build: <a href="/builds/{nearest}"><code>{nearest[:16]}</code></a> '
            f"(of {explanation['candidates']} compared).</p><pre>{escape(explanation['text'])}</pre>"
        )
    return "<p class=muted>No other build to compare with.</p>"


def _ccache_text(ccache: object) -> str:
    rate = _num(_dict(ccache).get("hit_rate"))
    if rate is None:
        return "-"
    hits, misses = _dict(ccache).get("hits", 0), _dict(ccache).get("misses", 0)
    return f"{rate:.0%} hits ({hits} hits, {misses} misses)"


def _status_class(status: str) -> str:
    return "pass" if status == "passed" else "fail" if status in ("failed", "error") else "muted"


def not_found_page(key: str) -> str:
    return _page("not found", f'<p><a href="/">all builds</a></p><h1>no build {escape(key[:64])}</h1>')
