"""Test history: each test's results across the runs of a branch, uploaded by runs, shown per test.

A run of `kernel-ci test` on a branch uploads one record (the write token, like a build): every test's
state — passed, failed, flaky, pre-existing or skipped — and the patch blamed for a regression. The page
`/history?branch=B&test=T` lists that test's runs newest first, and `/api/v1/history` gives the same as
JSON. The records live in the service's index database (SQLite or PostgreSQL), in a table of their own.

Uploads are untrusted (SECURITY.md): the body is capped, parsed by the service's strict JSON reader, every
field checked (states from a fixed set; names, branches and run ids bounded; nothing but strings), and
the page is a Jinja2 template (templates/history.html) with autoescape on, like the service's other
pages (web.py): an uploaded value reaches it only as escaped text.

The upload's format is kernel_ci.cache.history (the client builds uploads without the service's
dependencies); its names are re-exported here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from kernel_ci.cache.history import (
    HISTORY_SCHEMA,
    MAX_NAME,
    MAX_TESTS,
    STATES,
    HistoryError,
    HistoryUpload,
    TestResult,
    check_ref,
    page_url,
)
from kernel_ci.cache.server import web
from kernel_ci.cache.server.auth import Access
from kernel_ci.cache.server.service import CacheService, ServiceError, parse_json
from kernel_ci.cache.server.transfer import read_limited

__all__ = ["HISTORY_SCHEMA", "MAX_NAME", "MAX_TESTS", "STATES", "History", "HistoryUpload", "TestResult"]
__all__ += ["page_url", "render_page"]
MAX_UPLOAD_BYTES = 1 << 20
MAX_RUNS_SHOWN = 100

TABLE = """CREATE TABLE IF NOT EXISTS test_history (
    branch TEXT NOT NULL, run_id TEXT NOT NULL, test TEXT NOT NULL, state TEXT NOT NULL,
    blamed TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, PRIMARY KEY (branch, run_id, test))"""


def _upload(doc: Any) -> HistoryUpload:
    try:
        return HistoryUpload.from_json(doc)
    except HistoryError as exc:
        raise ServiceError(str(exc)) from exc


def _ref(value: Any, what: str) -> str:
    try:
        return check_ref(value, what)
    except HistoryError as exc:
        raise ServiceError(str(exc)) from exc


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


def render_page(branch: str, test: str, rows: Sequence[HistoryRow]) -> str:
    """The history page (templates/history.html, autoescaped like every page of the service)."""
    runs = [
        {
            "run_id": row.run_id,
            "state": row.state,
            "state_class": web.status_class(row.state),
            "blamed": row.blamed,
            "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime(row.created)),
        }
        for row in rows
    ]
    template = web.TEMPLATES.env.get_template("history.html")
    return template.render(branch=branch, test=test, runs=runs)


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
            upload = _upload(await run_in_threadpool(parse_json, body, "the history upload"))
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
