"""Test history: each test's results across the runs of a branch, uploaded by runs, shown per test.

A run of `kernel-ci test` on a branch uploads one record (the write token, like a build): every test's
state — passed, failed, flaky, pre-existing or skipped — and the patch blamed for a regression. The page
`/history?branch=B&test=T` lists that test's runs newest first, and `/api/v1/history` gives the same as
JSON. The records live in the service's index database (SQLite or PostgreSQL), in a table of their own.

Uploads are untrusted (SECURITY.md): the body is capped, parsed by the service's strict JSON reader, every
field checked (states from a fixed set; names, branches and run ids bounded; nothing but strings), and
everything shown on the page is HTML-escaped.
"""

from __future__ import annotations

import html
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from kernel_ci.cache.server.auth import Access
from kernel_ci.cache.server.service import CacheService, ServiceError, parse_json
from kernel_ci.cache.server.transfer import read_limited

HISTORY_SCHEMA = 1
MAX_UPLOAD_BYTES = 1 << 20
MAX_TESTS = 5000
MAX_NAME = 512
MAX_RUNS_SHOWN = 100
STATES = ("passed", "failed", "flaky", "preexisting", "skipped")
_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]{0,199}")  # a branch name or run id

TABLE = """CREATE TABLE IF NOT EXISTS test_history (
    branch TEXT NOT NULL, run_id TEXT NOT NULL, test TEXT NOT NULL, state TEXT NOT NULL,
    blamed TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, PRIMARY KEY (branch, run_id, test))"""


@dataclass(frozen=True)
class TestResult:
    __test__ = False  # not a pytest test class

    test: str
    state: str
    blamed: str = ""


@dataclass(frozen=True)
class HistoryUpload:
    """One run's results on a branch, as a run uploads them."""

    branch: str
    run_id: str
    tests: tuple[TestResult, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": HISTORY_SCHEMA,
            "branch": self.branch,
            "run_id": self.run_id,
            "tests": [{"test": t.test, "state": t.state, "blamed": t.blamed} for t in self.tests],
        }

    @classmethod
    def from_json(cls, doc: Any) -> HistoryUpload:
        """The upload, or a 400 (ServiceError) naming the first thing wrong."""
        if not isinstance(doc, dict) or doc.get("schema") != HISTORY_SCHEMA:
            raise ServiceError(f"a history upload is a JSON object with schema {HISTORY_SCHEMA}")
        if set(doc) != {"schema", "branch", "run_id", "tests"}:
            raise ServiceError("a history upload has exactly: schema, branch, run_id, tests")
        branch, run_id = _ref(doc["branch"], "branch"), _ref(doc["run_id"], "run_id")
        items = doc["tests"]
        if not isinstance(items, list) or len(items) > MAX_TESTS:
            raise ServiceError(f"tests must be a list of at most {MAX_TESTS} results")
        return cls(branch, run_id, tuple(_result(item) for item in items))


def _ref(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _REF.fullmatch(value):
        raise ServiceError(f"{what} must be 1-200 characters of letters, digits and ._/+-")
    return value


def _result(item: Any) -> TestResult:
    if not isinstance(item, dict) or set(item) - {"test", "state", "blamed"}:
        raise ServiceError("each test result is an object with test, state and blamed")
    test, state, blamed = item.get("test"), item.get("state"), item.get("blamed", "")
    for value in (test, blamed):
        if not isinstance(value, str) or len(value) > MAX_NAME or "\x00" in value:
            raise ServiceError(f"test and blamed are strings of at most {MAX_NAME} characters")
    if not test:
        raise ServiceError("a test result has an empty test name")
    if state not in STATES:
        raise ServiceError(f"a test's state is one of {', '.join(STATES)}")
    return TestResult(str(test), str(state), str(blamed))


@dataclass(frozen=True)
class HistoryRow:
    run_id: str
    state: str
    blamed: str
    created: float


class HistoryStore:
    """The test_history table in the service's index database."""

    def __init__(self, service: CacheService) -> None:
        self.index = service.index
        self._created = False
        self._lock = threading.Lock()

    def _ensure(self) -> None:
        with self._lock:
            if not self._created:
                with self.index.transaction(write=True) as tx:
                    tx.x(TABLE)
                self._created = True

    def put(self, upload: HistoryUpload) -> int:
        """Store a run's results; uploading the same run again replaces them (a retried upload)."""
        self._ensure()
        now = time.time()
        with self.index.transaction(write=True) as tx:
            tx.x("DELETE FROM test_history WHERE branch = ? AND run_id = ?", (upload.branch, upload.run_id))
            tx.many(
                "INSERT INTO test_history (branch, run_id, test, state, blamed, created) "
                "VALUES (?,?,?,?,?,?)",
                [(upload.branch, upload.run_id, t.test, t.state, t.blamed, now) for t in upload.tests],
            )
        return len(upload.tests)

    def of(self, branch: str, test: str, limit: int = MAX_RUNS_SHOWN) -> list[HistoryRow]:
        self._ensure()
        with self.index.transaction() as tx:
            rows = tx.q(
                "SELECT run_id, state, blamed, created FROM test_history WHERE branch = ? AND test = ? "
                "ORDER BY created DESC, run_id DESC LIMIT ?",
                (branch, test, limit),
            )
        return [HistoryRow(str(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in rows]


def page_url(base: str, branch: str, test: str) -> str:
    """The link a run's summary gives to a test's history page."""
    return f"{base.rstrip('/')}/history?branch={quote(branch, safe='')}&test={quote(test, safe='')}"


def render_page(branch: str, test: str, rows: Sequence[HistoryRow]) -> str:
    """The history page; every value from an upload is escaped."""
    e = html.escape
    body = "".join(
        f"<tr><td>{e(row.run_id)}</td><td class='{e(row.state)}'>{e(row.state)}</td>"
        f"<td>{e(row.blamed) or '-'}</td>"
        f"<td>{time.strftime('%Y-%m-%d %H:%M', time.gmtime(row.created))}</td></tr>"
        for row in rows
    )
    table = (
        "<table><tr><th>run</th><th>result</th><th>patch blamed</th><th>uploaded (UTC)</th></tr>"
        f"{body}</table>"
        if rows
        else "<p>No results for this test on this branch.</p>"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{e(test)} on {e(branch)} - kernel-ci</title></head><body>"
        f"<h1>{e(test)}</h1><p>branch {e(branch)}</p>{table}</body></html>"
    )


class History:
    """/api/v1/history (POST: a run's results; GET: a test's history) and the /history page."""

    def __init__(self, service: CacheService, access: Access) -> None:
        self.store = HistoryStore(service)
        self.access = access

    def routes(self) -> list[tuple[str, Any, list[str]]]:
        return [
            ("/api/v1/history", self.api, ["GET", "POST"]),
            ("/history", self.page, ["GET"]),
        ]

    def _query(self, request: Request) -> tuple[str, str]:
        branch = _ref(request.query_params.get("branch"), "branch")
        test = request.query_params.get("test") or ""
        if not test or len(test) > MAX_NAME:
            raise ServiceError(f"test: give the test's name (at most {MAX_NAME} characters)")
        return branch, test

    async def api(self, request: Request) -> Response:
        if request.method == "POST":
            self.access.write(request)
            body = await read_limited(request, MAX_UPLOAD_BYTES)
            upload = HistoryUpload.from_json(await run_in_threadpool(parse_json, body, "the history upload"))
            stored = await run_in_threadpool(self.store.put, upload)
            return JSONResponse({"stored": stored}, status_code=201)
        self.access.read(request)
        branch, test = self._query(request)
        rows = await run_in_threadpool(self.store.of, branch, test)
        return JSONResponse(
            {
                "branch": branch,
                "test": test,
                "runs": [
                    {"run_id": r.run_id, "state": r.state, "blamed": r.blamed, "created": r.created}
                    for r in rows
                ],
            }
        )

    async def page(self, request: Request) -> Response:
        self.access.read(request)
        branch, test = self._query(request)
        rows = await run_in_threadpool(self.store.of, branch, test)
        return HTMLResponse(render_page(branch, test, rows))
