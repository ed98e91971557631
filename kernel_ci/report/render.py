"""A run's report for people: the one summary table (console and Markdown) and the failing tests.

`kernel-ci test` prints it at the end of a run; `kernel-ci summary out/junit.xml [--markdown]` prints the
same table from the JUnit file alone (read by kernel_ci.report.junit), so a CI job that only has the
uploaded report can show it in $GITHUB_STEP_SUMMARY.
"""

from __future__ import annotations

import re

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from kernel_ci.report.compare import Comparison, summary_lines
from kernel_ci.report.model import RunReport, SuiteRow

PROBLEM_DETAIL_LINES = 30  # lines of a failing test's detail in the Markdown summary
COLUMNS = ("suite", "failed", "errors", "skipped", "passed", "time")
# decode_stacktrace.sh ends a decoded oops with decodecode's listing of the `Code:` bytes: two headed blocks
# of "  N:\tbytes\tinstruction" lines. Shown last, it pushed the decoded frames (file:line) out of a summary
# that keeps a failure's last lines; the summaries fold it to one line (the JUnit keeps it whole).
DISASSEMBLY_HEADERS = ("All code", "Code starting with the faulting instruction")
DISASSEMBLY_LINE = re.compile(r"^\s*(=+|[0-9a-f]+:\*?(\s.*)?)?$")  # blank lines between the two blocks


def fold_disassembly(lines: list[str]) -> list[str]:
    """LINES with each decodecode listing (a header, its ===== rule, its instruction lines) as one line."""
    out: list[str] = []
    folding = False
    for line in lines:
        if line.strip() in DISASSEMBLY_HEADERS:
            if not folding:
                out.append("[... disassembly of the Code: bytes folded; the JUnit report has it ...]")
            folding = True
        elif not (folding and DISASSEMBLY_LINE.match(line)):
            folding = False
            out.append(line)
    return out


def _time(seconds: float | None) -> str:
    return f"{seconds:.1f}s" if seconds is not None else "-"


def _ordered(report: RunReport) -> list[SuiteRow]:
    return sorted(report.rows, key=lambda row: (row.failed + row.errors) == 0)  # stable: failures first


def table_rows(report: RunReport) -> tuple[list[tuple[str, ...]], tuple[str, ...]]:
    """The summary table's cells: one row per suite (failures first), and the total row."""
    rows: list[tuple[str, ...]] = [
        (row.name, str(row.failed), str(row.errors), str(row.skipped), str(row.passed), _time(row.seconds))
        for row in _ordered(report)
    ]
    total = tuple(str(report.count(state)) for state in ("failed", "error", "skipped", "passed"))
    return rows, total


# --- console -------------------------------------------------------------------------------------------


def render_summary(report: RunReport) -> Table:
    """Per-suite counts, suites with failures first; the verdict (outcome and exit code) in the title."""
    style = "bold green" if report.ok else "bold red"
    table = Table(title=Text(report.verdict, style=style))
    for column, justify, colour in (
        ("suite", "left", None),
        ("failed", "right", "red"),
        ("errors", "right", "red"),
        ("skipped", "right", "yellow"),
        ("passed", "right", "green"),
        ("time", "right", None),
    ):
        table.add_column(column, justify=justify, style=colour)  # type: ignore[arg-type]  # rich wants a
        # Literal for justify; the tuple above holds only its values
    rows, total = table_rows(report)
    for name, *counts in rows:
        table.add_row(Text(name), *counts)
    table.add_section()
    table.add_row(Text("total", style="bold"), *total, "")
    return table


def render_problems(report: RunReport, max_lines: int = 40) -> list[RenderableType]:
    """One panel per failed (then errored) test: its message and the end of its trace or output."""
    panels: list[RenderableType] = []
    for suite, case in report.problems():
        body = case.detail or case.output
        lines = fold_disassembly(body.rstrip().splitlines())
        if len(lines) > max_lines:
            lines = [f"[... {len(lines) - max_lines} lines cut ...]", *lines[-max_lines:]]
        text = Text(case.message, style="bold")
        if lines:
            text.append("\n" + "\n".join(lines), style="")
        style = "red" if case.state == "failed" else "magenta"
        what = f" [{case.outcome.name}]" if report.outcome is not None else ""
        title = Text(f"{case.state.upper()} {suite} :: {case.name}{what}")
        panels.append(Panel(text, title=title, title_align="left", border_style=style))
    return panels


def render_report(report: RunReport) -> Group:
    """The summary table, then the failing tests' output."""
    return Group(render_summary(report), *render_problems(report))


def render_explanation(comparison: Comparison, cost: str = "") -> Panel:
    """Why the run is red: each failing test as a regression (and its patch), pre-existing or flaky, and
    the tests vanished since the baseline or new in it."""
    colours = {"regression": "red", "preexisting": "yellow", "flaky": "magenta"}
    text = Text()
    for finding in comparison.findings:
        text.append(f"{finding.test}: ", style="bold")
        text.append(finding.line() + "\n", style=colours.get(finding.verdict, ""))
    for line in summary_lines(comparison)[len(comparison.findings) :]:
        text.append(line + "\n")
    if cost:
        text.append(f"cost: {cost}", style="dim")
    text.rstrip()
    return Panel(text if text.plain else Text("nothing to explain"), title="explained", title_align="left")


def explanation_markdown(comparison: Comparison, history: str | None = None) -> str:
    """The explanation under the Markdown summary; history: the service page of the branch's results."""
    lines = ["", "#### Explained", ""]
    lines += [f"- {_html(line)}" for line in summary_lines(comparison)] or ["- nothing to explain"]
    if history:
        lines += ["", f"[Test history]({history})"]
    return "\n".join(lines) + "\n"


# --- Markdown ($GITHUB_STEP_SUMMARY) ----------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def to_markdown(report: RunReport, title: str = "kernel-ci test") -> str:
    """The summary as GitHub-flavoured Markdown: heading with the verdict, the table, the failing tests."""
    icon = ":white_check_mark:" if report.ok else ":x:"
    lines = [f"### {icon} {_md_cell(title)}: {report.verdict}", ""]
    kernel = report.property("kernel.version")
    if kernel:
        requested = report.property("kernel.requested")
        extra = f" (requested {requested})" if requested and requested != kernel else ""
        release = report.property("kernel.release")
        lines.append(f"Kernel **{kernel}**{extra}" + (f", release `{release}`" if release else ""))
        key = report.property("build_key")
        if key:
            lines[-1] += f", build key `{key[:16]}`"
        lines.append("")
    lines += ["| " + " | ".join(COLUMNS) + " |", "|---|---:|---:|---:|---:|---:|"]
    rows, total = table_rows(report)
    for name, *cells in rows:
        lines.append(f"| {_md_cell(name)} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{cell}**" for cell in total) + " | |")
    for suite, case in report.problems():
        message = case.message.strip()
        lines += ["", f"<details><summary>{case.state.upper()} {_html(suite)} :: {_html(case.name)}"]
        lines[-1] += f": {_html(message)}</summary>" if message else "</summary>"
        body = fold_disassembly(case.detail.strip().splitlines())
        if len(body) > PROBLEM_DETAIL_LINES:
            body = [f"[... {len(body) - PROBLEM_DETAIL_LINES} lines cut ...]", *body[-PROBLEM_DETAIL_LINES:]]
        if body:
            lines += ["", "```", *[line.replace("```", "'''") for line in body], "```"]
        lines.append("</details>")
    return "\n".join(lines) + "\n"


def missing_markdown(error: Exception, title: str = "kernel-ci test") -> str:
    return f"### :x: {_md_cell(title)}: no report\n\n{_md_cell(str(error))}\n"
