"""The test-history upload's format, shared by the client (a run's `--attribute --branch` upload) and the
service (kernel_ci.cache.server.history, which stores and shows it).

A module of its own, outside ``cache/server/``, so that a client install (no ``[server]`` extra) can build
and send an upload without importing anything of the service (Starlette, Jinja2, ...).
Uploads are untrusted on the service's side: ``HistoryUpload.from_json`` checks every field and raises
``HistoryError`` naming the first thing wrong (the service answers 400 with it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

HISTORY_SCHEMA = 1
MAX_TESTS = 5000
MAX_NAME = 512
STATES = ("passed", "failed", "flaky", "preexisting", "skipped")
_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]{0,199}")  # a branch name or run id


class HistoryError(ValueError):
    """An upload (or a query) that breaks the format; the message says what."""


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
        """The upload, or a HistoryError naming the first thing wrong."""
        if not isinstance(doc, dict) or doc.get("schema") != HISTORY_SCHEMA:
            raise HistoryError(f"a history upload is a JSON object with schema {HISTORY_SCHEMA}")
        if set(doc) != {"schema", "branch", "run_id", "tests"}:
            raise HistoryError("a history upload has exactly: schema, branch, run_id, tests")
        branch, run_id = check_ref(doc["branch"], "branch"), check_ref(doc["run_id"], "run_id")
        items = doc["tests"]
        if not isinstance(items, list) or len(items) > MAX_TESTS:
            raise HistoryError(f"tests must be a list of at most {MAX_TESTS} results")
        return cls(branch, run_id, tuple(_result(item) for item in items))


def check_ref(value: Any, what: str) -> str:
    """A branch name or run id: 1-200 characters of a safe set."""
    if not isinstance(value, str) or not _REF.fullmatch(value):
        raise HistoryError(f"{what} must be 1-200 characters of letters, digits and ._/+-")
    return value


def _result(item: Any) -> TestResult:
    if not isinstance(item, dict) or set(item) - {"test", "state", "blamed"}:
        raise HistoryError("each test result is an object with test, state and blamed")
    test, state, blamed = item.get("test"), item.get("state"), item.get("blamed", "")
    for value in (test, blamed):
        if not isinstance(value, str) or len(value) > MAX_NAME or "\x00" in value:
            raise HistoryError(f"test and blamed are strings of at most {MAX_NAME} characters")
    if not test:
        raise HistoryError("a test result has an empty test name")
    if state not in STATES:
        raise HistoryError(f"a test's state is one of {', '.join(STATES)}")
    return TestResult(str(test), str(state), str(blamed))


def page_url(base: str, branch: str, test: str) -> str:
    """The link a run's summary gives to a test's history page."""
    return f"{base.rstrip('/')}/history?branch={quote(branch, safe='')}&test={quote(test, safe='')}"
