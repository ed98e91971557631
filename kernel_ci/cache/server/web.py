"""Server-rendered HTML: the build list (newest first) and a page per build. No JavaScript, no build step.

The pages are Jinja2 templates (``templates/``, shipped as package data) loaded through Starlette's
``Jinja2Templates``, with autoescape on for every template: a stored value can only reach a page as
escaped text, whichever template or field a later change adds, instead of relying on each f-string
remembering its ``escape()``. ``base.html`` holds the page frame; a new page extends it.

This module only turns index rows into plain values for the templates. Every stored value is read
through ``_dict`` / ``_strs`` / ``_num``: an entry stored before the service validated metadata (or by
another version) renders with blanks instead of making its page fail on every visit."""

from __future__ import annotations

import datetime
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from kernel_ci.cache.server.index import BuildRow, BuildSummary

# autoescape=True for every template name, not select_autoescape()'s by-extension default
TEMPLATES = Jinja2Templates(
    env=Environment(
        loader=PackageLoader("kernel_ci.cache.server", "templates"), autoescape=True, auto_reload=False
    )
)


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
    """A page: template ``name`` (under templates/) with ``context``."""
    return TEMPLATES.TemplateResponse(request, name, context, status_code=status_code)


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


def _test_counts(counts: dict[str, Any] | None) -> dict[str, int] | None:
    """passed / bad (failed + errors) / skipped as integers, whatever the stored document held."""
    if counts is None:
        return None

    def count(name: str) -> int:
        return int(_num(counts.get(name)) or 0)

    return {"passed": count("passed"), "bad": count("failed") + count("errors"), "skipped": count("skipped")}


def _run_links(key: str, run: dict[str, Any]) -> list[dict[str, str]]:
    run_id = str(run.get("run_id"))
    links = []
    if "junit" in run:
        links.append({"url": _run_url(key, run_id, "junit.xml"), "text": "JUnit XML"})
    if "console" in run:
        links.append({"url": _run_url(key, run_id, "console.log"), "text": "console log"})
    return links


def _downloads(key: str, outputs: object, runs: list[dict[str, Any]]) -> list[dict[str, str]]:
    links = [
        {"url": _file_url(key, name), "text": name.rsplit("/", 1)[-1]}
        for name in _strs(outputs)
        if name == "bzImage" or name.endswith((".mbox", ".patch"))
    ]
    for run in runs[-1:]:
        links += _run_links(key, run)
    return links


def _list_row(row: BuildSummary) -> dict[str, Any]:
    s = _dict(row.summary)
    rate = _num(s.get("ccache_hit_rate"))
    return {
        "key": row.key,
        "pinned": row.pinned,
        "when": _when(row.created),
        "kernel_version": str(s.get("kernel_version", "")),
        "kernel_release": str(s.get("kernel_release", "")),
        "series": ", ".join(_strs(s.get("series"))) or "none (vanilla)",
        "fragments": _strs(s.get("fragments")),
        "counts": _test_counts(_counts(row.runs)),
        "hit_rate": "-" if rate is None else f"{rate:.0%}",
        "downloads": _downloads(row.key, s.get("outputs", []), row.runs),
    }


def list_context(rows: list[BuildSummary], total: int, limit: int, offset: int) -> dict[str, Any]:
    """What builds.html shows: one page of the build list and its newer/older offsets."""
    return {
        "builds": [_list_row(row) for row in rows],
        "total": total,
        "limit": limit,
        "newer": max(offset - limit, 0) if offset > 0 else None,
        "older": offset + limit if offset + limit < total else None,
    }


def build_context(row: BuildRow, explanation: dict[str, Any] | None) -> dict[str, Any]:
    """What build.html shows: the build's facts, outputs, runs (newest first) and miss explanation."""
    key = row.key
    meta = _dict(row.doc.get("metadata"))
    kernel = _dict(meta.get("kernel"))
    return {
        "key": key,
        "pinned": row.pinned,
        "kernel": f"{kernel.get('version', '')} release {kernel.get('release', '')}",
        "series": ", ".join(_strs(meta.get("series"))) or "none (vanilla)",
        "fragments": _strs(meta.get("fragments")),
        "toolchain": str(_dict(meta.get("toolchain")).get("gcc", "")),
        "ccache": _ccache_text(meta.get("ccache")),
        "published": _when(row.doc.get("published", row.created)),
        "reproduce": str(meta.get("reproduce", "")),
        "outputs": [
            {
                "url": _file_url(key, o["name"]),
                "name": o["name"],
                "tar": o["kind"] == "tar",
                "size": f"{o['size']:,}",
                "sha256": o["sha256"],
            }
            for o in row.doc["outputs"]
        ],
        "runs": [_run_view(key, r) for r in reversed([r for r in row.runs if isinstance(r, dict)])],
        "miss": explanation or {},
    }


def _run_view(key: str, run: dict[str, Any]) -> dict[str, Any]:
    cases = [c for c in run.get("cases", []) if isinstance(c, dict)]
    return {
        "run_id": str(run.get("run_id")),
        "outcome": str(run.get("outcome", "")),
        "counts": _test_counts(_dict(run.get("counts")) or None),
        "links": _run_links(key, run),
        "cases": [
            {
                "suite": str(c.get("suite", "")),
                "name": str(c.get("name", "")),
                "status": str(c.get("status", "")),
                "status_class": status_class(str(c.get("status", ""))),
                "time": str(c.get("time", "")),
                "message": str(c.get("message", "")),
            }
            for c in cases
        ],
    }


def _ccache_text(ccache: object) -> str:
    rate = _num(_dict(ccache).get("hit_rate"))
    if rate is None:
        return "-"
    hits, misses = _dict(ccache).get("hits", 0), _dict(ccache).get("misses", 0)
    return f"{rate:.0%} hits ({hits} hits, {misses} misses)"


def status_class(status: str) -> str:
    """The CSS class of a test's status: pass, fail or muted."""
    return "pass" if status == "passed" else "fail" if status in ("failed", "error") else "muted"
