"""A run's summary table read back from its JUnit file: Markdown for $GITHUB_STEP_SUMMARY, or a console table.

`kernel-ci summary out/junit.xml --markdown` renders what `kernel-ci test` printed at the end of the run
(per-suite failed / errors / skipped / passed / time, suites with failures first, then each failing test
with its message), from the JUnit file alone, so a CI job that only has the uploaded report can show it.
When the run's ``run.json`` is found (beside the JUnit file, or in ``latest/``) its outcome and exit code
are shown too.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table
from rich.text import Text

from kernel_ci.core.errors import UsageError

PROBLEM_DETAIL_LINES = 30


class SummaryError(UsageError):
    """The JUnit file is missing or is not JUnit XML."""


@dataclass(frozen=True)
class CaseRow:
    suite: str
    name: str
    state: str  # passed | failed | error | skipped
    message: str
    detail: str


@dataclass
class SuiteSummary:
    name: str
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    passed: int = 0
    seconds: float | None = None
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def tests(self) -> int:
        return self.failed + self.errors + self.skipped + self.passed

    @property
    def bad(self) -> bool:
        return bool(self.failed or self.errors)


@dataclass
class RunSummary:
    suites: list[SuiteSummary]
    problems: list[CaseRow]  # failed cases first, then errored ones, in suite order
    outcome: str | None = None  # from run.json when found
    exit_code: int | None = None

    def total(self, what: str) -> int:
        return sum(getattr(suite, what) for suite in self.suites)

    @property
    def ok(self) -> bool:
        return not any(suite.bad for suite in self.suites)

    @property
    def verdict(self) -> str:
        if self.outcome is not None:
            code = f" (exit {self.exit_code})" if self.exit_code is not None else ""
            return f"{self.outcome}{code}"
        return "PASS" if self.ok else "FAILED"

    def property(self, name: str) -> str | None:
        for suite in self.suites:
            if name in suite.properties:
                return suite.properties[name]
        return None


def _seconds(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def read_junit(path: Path) -> RunSummary:
    """Per-suite counts and the failing cases of a JUnit file (<testsuites> or a single <testsuite>)."""
    path = Path(path)
    if not path.is_file():
        raise SummaryError(f"no JUnit report at {path}: the run did not get as far as writing it")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise SummaryError(f"{path} is not valid XML: {exc}") from exc
    if root.tag == "testsuite":
        suite_elements = [root]
    elif root.tag == "testsuites":
        suite_elements = root.findall("testsuite")
    else:
        raise SummaryError(f"{path} is not a JUnit report (root element <{root.tag}>)")
    suites: list[SuiteSummary] = []
    failed: list[CaseRow] = []
    errored: list[CaseRow] = []
    for element in suite_elements:
        suite = SuiteSummary(element.get("name", "(unnamed)"), seconds=_seconds(element.get("time")))
        for prop in element.iter("property"):
            suite.properties.setdefault(prop.get("name", ""), prop.get("value", ""))
        for case in element.findall("testcase"):
            name = case.get("name", "(unnamed)")
            found = (case.find(tag) for tag in ("failure", "error", "skipped"))
            outcome = next((element for element in found if element is not None), None)
            if outcome is None:
                suite.passed += 1
                continue
            message = (outcome.get("message") or "").strip()
            detail = (outcome.text or "").strip()
            if outcome.tag == "failure":
                suite.failed += 1
                failed.append(CaseRow(suite.name, name, "failed", message, detail))
            elif outcome.tag == "error":
                suite.errors += 1
                errored.append(CaseRow(suite.name, name, "error", message, detail))
            else:
                suite.skipped += 1
        suites.append(suite)
    summary = RunSummary(suites, failed + errored)
    run_json = find_run_json(path)
    if run_json is not None:
        try:
            info = json.loads(run_json.read_text())
            summary.outcome = info.get("outcome")
            summary.exit_code = info.get("exit_code")
        except (OSError, ValueError):
            pass
    return summary


def find_run_json(junit: Path) -> Path | None:
    """The run.json of the run that wrote junit: beside it (out/runs/<time>/) or in latest/ (out/)."""
    for candidate in (junit.parent / "run.json", junit.parent / "latest" / "run.json"):
        if candidate.is_file():
            return candidate
    return None


def _ordered(summary: RunSummary) -> list[SuiteSummary]:
    return sorted(summary.suites, key=lambda suite: not suite.bad)  # stable: failures first


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _time(seconds: float | None) -> str:
    return f"{seconds:.1f}s" if seconds is not None else "-"


def to_markdown(summary: RunSummary, title: str = "kernel-ci test") -> str:
    """The summary as GitHub-flavoured Markdown: heading with the verdict, the table, the failing tests."""
    icon = ":white_check_mark:" if summary.ok else ":x:"
    lines = [f"### {icon} {_md_cell(title)}: {summary.verdict}", ""]
    kernel = summary.property("kernel.version")
    if kernel:
        requested = summary.property("kernel.requested")
        extra = f" (requested {requested})" if requested and requested != kernel else ""
        release = summary.property("kernel.release")
        lines.append(f"Kernel **{kernel}**{extra}" + (f", release `{release}`" if release else ""))
        key = summary.property("build_key")
        if key:
            lines[-1] += f", build key `{key[:16]}`"
        lines.append("")
    lines += ["| suite | failed | errors | skipped | passed | time |", "|---|---:|---:|---:|---:|---:|"]
    for suite in _ordered(summary):
        lines.append(
            f"| {_md_cell(suite.name)} | {suite.failed} | {suite.errors} | {suite.skipped} | {suite.passed} "
            f"| {_time(suite.seconds)} |"
        )
    lines.append(
        f"| **total** | **{summary.total('failed')}** | **{summary.total('errors')}** "
        f"| **{summary.total('skipped')}** | **{summary.total('passed')}** | |"
    )
    for case in summary.problems:
        lines += ["", f"<details><summary>{case.state.upper()} {_html(case.suite)} :: {_html(case.name)}"]
        lines[-1] += f": {_html(case.message)}</summary>" if case.message else "</summary>"
        body = case.detail.splitlines()
        if len(body) > PROBLEM_DETAIL_LINES:
            body = [f"[... {len(body) - PROBLEM_DETAIL_LINES} lines cut ...]", *body[-PROBLEM_DETAIL_LINES:]]
        if body:
            lines += ["", "```", *[line.replace("```", "'''") for line in body], "```"]
        lines.append("</details>")
    return "\n".join(lines) + "\n"


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def missing_markdown(error: SummaryError, title: str = "kernel-ci test") -> str:
    return f"### :x: {_md_cell(title)}: no report\n\n{_md_cell(str(error))}\n"


def to_table(summary: RunSummary) -> Table:
    """The same summary as a rich table for the console."""
    style = "bold green" if summary.ok else "bold red"
    table = Table(title=Text(summary.verdict, style=style))
    for column, justify, colour in (
        ("suite", "left", None),
        ("failed", "right", "red"),
        ("errors", "right", "red"),
        ("skipped", "right", "yellow"),
        ("passed", "right", "green"),
        ("time", "right", None),
    ):
        table.add_column(column, justify=justify, style=colour)  # type: ignore[arg-type]
    for suite in _ordered(summary):
        table.add_row(
            Text(suite.name),
            str(suite.failed),
            str(suite.errors),
            str(suite.skipped),
            str(suite.passed),
            _time(suite.seconds),
        )
    table.add_section()
    table.add_row(
        Text("total", style="bold"),
        *(str(summary.total(what)) for what in ("failed", "errors", "skipped", "passed")),
        "",
    )
    return table
