"""Verdicts: turn what the guest left (results dir + console) into one JUnit file and one exit code.

Inputs: the plan (plan.json), the results dir (`<suite>/output.txt`, `status.json`, `junit.xml`,
`artifacts/`), the console report from kernel_ci.guest.scanner and how the guest ended (GuestEnd, from the
caller).
Every problem becomes a testcase with an Outcome; the run's outcome is the worst of them.

The results dir is written by the guest, which runs patch authors' tests as root: it is read only through
kernel_ci.report.guestfiles (no symlink followed, regular files only, names checked, every read capped), and
whatever
was refused or cut is said in the report. Parsed content is bounded too (testcases per suite, KTAP depth).
"""

from __future__ import annotations

import enum
import json
import os
import signal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from junit_xml import TestCase as JunitCase
from junit_xml import TestSuite as JunitSuite
from junit_xml import to_xml_report_string
from junitparser import Error as JunitError
from junitparser import Failure as JunitFailure
from junitparser import JUnitXml, JUnitXmlError
from junitparser import Skipped as JunitSkipped
from junitparser import TestSuite as ParsedSuite
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from kernel_ci.guest.payload import Plan, PlanSuite
from kernel_ci.guest.scanner import ConsoleReport, Fault, SuiteSpan
from kernel_ci.report import guestfiles
from kernel_ci.report.ktap import MAX_DEPTH as KTAP_MAX_DEPTH
from kernel_ci.report.ktap import KtapReport, KtapTest, flatten
from kernel_ci.report.ktap import parse as parse_ktap

OUTPUT_LIMIT = 64 * 1024  # characters of output.txt kept in a suite's system-out
CASE_OUTPUT_LIMIT = 16 * 1024
ARTIFACT_TEXT_LIMIT = 8 * 1024  # artifacts up to this size that decode as UTF-8 are shown inline
ARTIFACT_INLINE_FILES = 20
# What the host reads of the guest's files at most (the guest can leave sparse files of any size).
OUTPUT_READ_LIMIT = 4 * 2**20  # output.txt: its head (KTAP's version and plan come first)
STATUS_READ_LIMIT = 64 * 2**10  # status.json: the runner writes ~200 bytes
JUNIT_READ_LIMIT = 8 * 2**20  # a pytest junit.xml; a bigger one is refused, not cut (cut XML is invalid)
ARTIFACT_MAX_FILES = 1000  # artifacts listed as properties
MAX_CASES_PER_SUITE = 5000  # testcases kept per suite; one failed case says how many more there were
BOOT_SUITE = "boot"


class Outcome(enum.IntEnum):
    """The run's verdict; its value is the exit code (2 is left to argparse usage errors)."""

    PASS = 0
    TEST_FAILURE = 1
    KERNEL_OOPS = 3
    KERNEL_PANIC = 4
    GUEST_HANG = 5
    BOOT_TIMEOUT = 6
    INFRA_FAILURE = 7

    @property
    def severity(self) -> int:
        return _SEVERITY.index(self)


_SEVERITY = (
    Outcome.PASS,
    Outcome.TEST_FAILURE,
    Outcome.KERNEL_OOPS,
    Outcome.BOOT_TIMEOUT,
    Outcome.GUEST_HANG,
    Outcome.KERNEL_PANIC,
    Outcome.INFRA_FAILURE,
)


def worst(outcomes: Iterable[Outcome]) -> Outcome:
    return max(outcomes, key=lambda outcome: outcome.severity, default=Outcome.PASS)


EndKind = Literal["poweroff", "timeout", "hang", "boot_timeout", "qemu_failed"]


@dataclass(frozen=True)
class GuestEnd:
    """How the guest run ended, as the QEMU runner saw it."""

    kind: EndKind
    detail: str = ""
    console_tail: str = ""
    sysrq_dump: str = ""
    console_dropped_bytes: int = 0  # console output past the console.log limit (a flooding guest)


CaseState = Literal["passed", "failed", "error", "skipped"]


@dataclass
class Case:
    name: str
    classname: str
    state: CaseState
    seconds: float | None = None
    message: str = ""  # one line: the failure/error/skip reason
    detail: str = ""  # the failure/error body (trace, console tail)
    output: str = ""  # system-out
    stderr: str = ""  # system-err
    outcome: Outcome = Outcome.PASS  # what this case means for the run


@dataclass
class SuiteResult:
    name: str
    cases: list[Case]
    properties: dict[str, str] = field(default_factory=dict)
    output: str = ""
    errors: str = ""
    seconds: float | None = None

    def count(self, state: CaseState) -> int:
        return sum(1 for case in self.cases if case.state == state)

    @property
    def bad(self) -> bool:
        return any(case.state in ("failed", "error") for case in self.cases)


@dataclass(frozen=True)
class SuiteRow:
    name: str
    tests: int
    failed: int
    errors: int
    skipped: int
    passed: int
    seconds: float | None


@dataclass
class RunReport:
    outcome: Outcome
    suites: list[SuiteResult]
    properties: dict[str, str] = field(default_factory=dict)

    def count(self, state: CaseState) -> int:
        return sum(suite.count(state) for suite in self.suites)

    @property
    def tests(self) -> int:
        return sum(len(suite.cases) for suite in self.suites)

    @property
    def rows(self) -> list[SuiteRow]:
        return [
            SuiteRow(
                s.name,
                len(s.cases),
                s.count("failed"),
                s.count("error"),
                s.count("skipped"),
                s.count("passed"),
                s.seconds,
            )
            for s in self.suites
        ]

    def problems(self) -> list[tuple[str, Case]]:
        """Failed cases first, then errored ones, each in suite order."""
        found = [(s.name, c) for s in self.suites for c in s.cases if c.state == "failed"]
        return found + [(s.name, c) for s in self.suites for c in s.cases if c.state == "error"]


@dataclass(frozen=True)
class _Stop:
    """Why a suite stopped before its end, and what that means for the run."""

    reason: str
    outcome: Outcome
    not_run: str


# --- collecting --------------------------------------------------------------------------------------


def collect(
    plan: Plan,
    results_dir: Path,
    console: ConsoleReport,
    end: GuestEnd,
    properties: Mapping[str, str] | None = None,
) -> RunReport:
    """Read everything the run left behind into one report (see write_junit and render_report)."""
    props = dict(properties or {})
    run_stop = _run_stop(console, end)
    suites = [_boot_suite(console, end, run_stop)]
    for planned in plan.suites:
        suites.append(_suite(planned, results_dir, console, run_stop))
    _place_run_faults(suites, console, end)
    for suite in suites:
        suite.properties = {**props, **suite.properties}
    outcome = worst(case.outcome for suite in suites for case in suite.cases)
    return RunReport(outcome, suites, props)


def _run_stop(console: ConsoleReport, end: GuestEnd) -> _Stop:
    """Why the guest stopped running suites (used for the suite in progress and those never started)."""
    panic = console.panic
    if panic is not None:
        return _Stop(f"the kernel panicked: {panic.title}", Outcome.KERNEL_PANIC, "the kernel panicked")
    if end.kind == "qemu_failed":
        return _Stop(f"QEMU failed: {end.detail}", Outcome.INFRA_FAILURE, "QEMU failed")
    if end.kind == "hang":
        return _Stop(f"the guest hung: {end.detail}", Outcome.GUEST_HANG, "the guest hung")
    if end.kind == "timeout":
        return _Stop(f"the run timed out: {end.detail}", Outcome.GUEST_HANG, "the run timed out")
    if end.kind == "boot_timeout":
        return _Stop(f"the guest did not boot in time: {end.detail}", Outcome.BOOT_TIMEOUT, "boot timed out")
    if console.runner_error is not None:
        return _Stop(
            f"the runner crashed: {console.runner_error}", Outcome.INFRA_FAILURE, "the runner crashed"
        )
    if console.init_failed:
        return _Stop("the guest runner failed to start", Outcome.INFRA_FAILURE, "the runner failed")
    if console.init_ready_line is None:
        return _Stop(
            "the guest reset before reaching init (no panic message: early crash or triple fault)",
            Outcome.KERNEL_PANIC,
            "the guest reset during boot",
        )
    if console.runner_done_line is None:
        return _Stop(
            "the guest reset or powered off while the runner was running (no panic message)",
            Outcome.KERNEL_PANIC,
            "the guest reset",
        )
    return _Stop("the runner did not run it", Outcome.INFRA_FAILURE, "the runner did not run it")


def _boot_suite(console: ConsoleReport, end: GuestEnd, stop: _Stop) -> SuiteResult:
    cases: list[Case] = []
    tail = end.console_tail or console.boot_tail
    if console.init_ready_line is not None:
        cases.append(Case("boot", BOOT_SUITE, "passed", seconds=console.boot_seconds))
    elif end.kind == "qemu_failed":
        cases.append(
            _problem("boot", BOOT_SUITE, "error", f"QEMU failed: {end.detail}", tail, Outcome.INFRA_FAILURE)
        )
    elif console.panic is not None:
        message = f"the kernel panicked before init: {console.panic.title}"
        cases.append(_problem("boot", BOOT_SUITE, "failed", message, tail, Outcome.KERNEL_PANIC))
    elif end.kind in ("boot_timeout", "timeout", "hang"):
        message = f"no KCI-INIT: ready ({end.kind}): {end.detail}".rstrip(": ")
        cases.append(_problem("boot", BOOT_SUITE, "failed", message, tail, Outcome.BOOT_TIMEOUT))
    else:
        cases.append(_problem("boot", BOOT_SUITE, "failed", stop.reason, tail, stop.outcome))
    if console.init_ready_line is not None:
        if console.runner_done_line is not None:
            cases.append(Case("runner", BOOT_SUITE, "passed"))
        elif console.init_failed and console.runner_error is None:
            message = "KCI-INIT: runner failed (payload missing or runner crashed)"
            cases.append(_problem("runner", BOOT_SUITE, "error", message, tail, Outcome.INFRA_FAILURE))
        elif console.running is None:  # no interrupted suite carries the reason: the runner case does
            message = f"the runner did not finish: {stop.reason}"
            cases.append(_problem("runner", BOOT_SUITE, "error", message, tail, stop.outcome))
        else:
            cases.append(Case("runner", BOOT_SUITE, "skipped", message=f"not finished: {stop.not_run}"))
    if end.console_dropped_bytes:
        message = (
            f"the guest flooded the console: {end.console_dropped_bytes} bytes past the console.log limit "
            "were read and scanned but not kept"
        )
        cases.append(_problem("console", BOOT_SUITE, "failed", message, "", Outcome.TEST_FAILURE))
    properties = {"guest.end": end.kind}
    if end.detail:
        properties["guest.end.detail"] = end.detail
    if console.boot_seconds is not None:
        properties["boot.seconds"] = f"{console.boot_seconds:.3f}"
    if console.kernel_release:
        properties["kernel.release.booted"] = console.kernel_release
    return SuiteResult(BOOT_SUITE, cases, properties, seconds=console.boot_seconds)


def _place_run_faults(suites: list[SuiteResult], console: ConsoleReport, end: GuestEnd) -> None:
    """Kernel reports outside any suite, the panic and the hang go to the suite they happened in."""
    by_name = {suite.name: suite for suite in suites}
    boot = by_name[BOOT_SUITE]
    for fault in console.faults:
        target = by_name.get(fault.suite or "", boot)
        if fault.kind == "panic":
            target.cases.append(
                _problem(
                    "kernel: panic", target.name, "error", fault.title, fault.trace, Outcome.KERNEL_PANIC
                )
            )
        elif target is boot:  # the ones inside a suite were added with that suite
            target.cases.append(_oops_case(fault, target.name))
    if end.kind in ("hang", "timeout"):
        running = console.running
        target = by_name.get(running.name, boot) if running is not None else boot
        detail = (
            f"--- console (last lines) ---\n{end.console_tail}\n--- sysrq task dump ---\n{end.sysrq_dump}"
        )
        what = "hung" if end.kind == "hang" else "timed out"
        if console.runner_done_line is not None:
            what += " after KCI-RUNNER: done (it did not power off)"
        target.cases.append(
            _problem(
                f"guest: {end.kind}",
                target.name,
                "error",
                f"the guest {what}: {end.detail}".rstrip(": "),
                detail,
                Outcome.GUEST_HANG,
            )
        )


def _oops_case(fault: Fault, classname: str) -> Case:
    return _problem(
        f"kernel: {fault.title}",
        classname,
        "failed",
        f"{fault.kind}: {fault.title}",
        fault.trace,
        Outcome.KERNEL_OOPS,
    )


def _suite(planned: PlanSuite, results_dir: Path, console: ConsoleReport, run_stop: _Stop) -> SuiteResult:
    name = planned.name
    span = console.suite(name)
    files = _read_suite_files(results_dir, name)
    status, status_error = files.status, files.status_error
    started = span is not None or status is not None or status_error is not None
    ended = (span is not None and span.ended) or status is not None
    result = SuiteResult(name, [], {"language": planned.language, "timeout": str(planned.timeout)})
    if not started:
        result.cases.append(Case(name, name, "skipped", message=f"not run: {run_stop.not_run}"))
        result.properties["state"] = "not run"
        return result
    output = files.output
    result.properties.update(files.properties)
    result.output = files.notes + _tail(output or "", OUTPUT_LIMIT) + files.artifacts
    stop: _Stop | None = None
    if not ended:
        stop = _Stop(f"interrupted: {run_stop.reason}", run_stop.outcome, f"not run: {run_stop.not_run}")
        result.properties["state"] = "interrupted"
    else:
        result.properties["state"] = "ended"
    rc, timed_out, seconds = _status_fields(status, span)
    result.seconds = seconds
    if seconds is not None:
        result.properties["seconds"] = f"{seconds:.3f}"
    if rc is not None:
        result.properties["rc"] = str(rc)
    if timed_out:
        result.properties["timed_out"] = "true"
        stop = _Stop(
            f"suite timed out after {planned.timeout}s", Outcome.TEST_FAILURE, "not run: suite timed out"
        )
    if status_error is not None:
        result.cases.append(
            _problem("results: status.json", name, "failed", status_error, "", Outcome.TEST_FAILURE)
        )
    elif ended and status is None:
        message = "status.json is missing (the results share lost it?)"
        result.cases.append(
            _problem("results: status.json", name, "failed", message, "", Outcome.TEST_FAILURE)
        )
    module_errors = [str(e) for e in (status or {}).get("module_errors", [])]
    if module_errors:
        ran = rc is not None
        message = "module unload failed" if ran else "module load failed: the suite did not run"
        result.cases.append(
            _problem("modules", name, "error", message, "\n".join(module_errors), Outcome.TEST_FAILURE)
        )
        if not ran:
            return _with_oopses(result, console)
    output_problem = files.output_error
    if output_problem is None and output is None and ended and status is not None:
        output_problem = "output.txt is missing"
    if output_problem is not None:
        result.cases.append(
            _problem("results: output.txt", name, "failed", output_problem, "", Outcome.TEST_FAILURE)
        )
    elif planned.language in ("c", "kselftest"):  # KTAP; kselftest's runner prints TAP 13, which it reads
        ktap = parse_ktap(output or "")
        result.errors = "\n".join(f"KTAP: {error}" for error in ktap.errors)
        cases = _c_cases(name, ktap, output or "", rc, stop)
        if planned.expected_failures:
            cases = _expected_failures(name, cases, planned.expected_failures, stop)
            result.properties["expected_failures"] = str(len(planned.expected_failures))
        if ktap.too_deep:
            message = (
                f"KTAP nested deeper than {KTAP_MAX_DEPTH} levels: the deeper lines were kept as output, "
                "not read as results"
            )
            cases.append(_problem("results: KTAP", name, "failed", message, "", Outcome.TEST_FAILURE))
        result.cases += cases
    else:
        result.cases += _python_cases(name, files.junit, files.junit_error, output or "", rc, stop)
    result.cases = _capped(name, result.cases)
    return _with_oopses(result, console)


def _capped(suite: str, cases: list[Case]) -> list[Case]:
    """At most MAX_CASES_PER_SUITE testcases (a guest can print a million result lines); the cut is a
    failed case saying how many there were."""
    if len(cases) <= MAX_CASES_PER_SUITE:
        return cases
    message = f"{len(cases)} test results; only the first {MAX_CASES_PER_SUITE} are in this report"
    kept = cases[:MAX_CASES_PER_SUITE]
    return [*kept, _problem("results: too many tests", suite, "failed", message, "", Outcome.TEST_FAILURE)]


def _with_oopses(result: SuiteResult, console: ConsoleReport) -> SuiteResult:
    for fault in console.faults_in(result.name):
        if fault.kind != "panic":
            result.cases.append(_oops_case(fault, result.name))
    return result


def _status_fields(
    status: dict[str, Any] | None, span: SuiteSpan | None
) -> tuple[int | None, bool, float | None]:
    if status is not None:
        rc = status.get("rc")
        seconds = status.get("seconds")
        return (
            rc if isinstance(rc, int) else None,
            bool(status.get("timed_out")),
            float(seconds) if isinstance(seconds, int | float) else None,
        )
    if span is not None and span.ended:
        return span.rc, span.timed_out, span.seconds
    return None, False, None


# --- C suites: KTAP ----------------------------------------------------------------------------------


def _c_cases(suite: str, report: KtapReport, output: str, rc: int | None, stop: _Stop | None) -> list[Case]:
    if not report.found_ktap:
        if stop is not None:
            return [
                _problem(
                    suite, suite, "error", f"{stop.reason} (no KTAP output yet)", _tail(output), stop.outcome
                )
            ]
        message = f"no KTAP output (exit status {_describe_rc(rc)})"
        return [_problem(suite, suite, "failed", message, _tail(output), Outcome.TEST_FAILURE)]
    tests = list(flatten(report.tests))
    cases = [_ktap_case(suite, name, test, stop) for name, test in tests]
    cases += _missing_cases(suite, report, stop, any(test.incomplete for _, test in tests))
    if stop is None and rc not in (0, None) and not any(c.state in ("failed", "error") for c in cases):
        message = f"exit status {_describe_rc(rc)} although every KTAP result passed"
        cases.append(_problem("exit status", suite, "failed", message, _tail(output), Outcome.TEST_FAILURE))
    return cases


def _ktap_case(suite: str, name: str, test: KtapTest, stop: _Stop | None) -> Case:
    output = _tail(test.output, CASE_OUTPUT_LIMIT)
    case = Case(name, suite, "passed", seconds=test.seconds, output=output)
    if test.status == "fail":
        case.state, case.message, case.detail = "failed", test.reason or _last_diag(test.output), output
        case.outcome = Outcome.TEST_FAILURE
    elif test.status == "skip":
        case.state, case.message = "skipped", test.reason or "SKIP"
    elif test.status == "todo":
        case.state, case.message = "skipped", f"TODO: {test.reason}" if test.reason else "TODO"
    elif test.status == "error":
        case.state, case.detail, case.outcome = "error", output, Outcome.TEST_FAILURE
        case.message = test.reason or "error"
        if test.incomplete and stop is not None:
            case.message, case.outcome = stop.reason, stop.outcome
    return case


def _expected_failures(
    suite: str, cases: list[Case], expected: Sequence[tuple[str, str]], stop: _Stop | None
) -> list[Case]:
    """kselftests listed in the suite's expected-failures.toml: one that failed is reported skipped with
    "expected failure: <reason>" (its output kept); one that passed fails ("unexpectedly passed": the
    list is stale); an entry matching no test fails too, unless the suite was stopped early."""
    reasons = dict(expected)
    seen: set[str] = set()
    for case in cases:
        reason = reasons.get(case.name)
        if reason is None:
            continue
        seen.add(case.name)
        if case.state in ("failed", "error") and case.outcome == Outcome.TEST_FAILURE:
            what = f"{case.state}: {case.message}" if case.message else case.state
            case.output = "\n".join(part for part in (case.output, case.detail) if part)
            case.state, case.message, case.detail = "skipped", f"expected failure: {reason} ({what})", ""
            case.outcome = Outcome.PASS
        elif case.state == "passed":
            case.state, case.outcome = "failed", Outcome.TEST_FAILURE
            case.message = f"unexpectedly passed (expected-failures.toml: {reason}): remove it from the list"
    if stop is None:
        for name, reason in expected:
            if name not in seen:
                message = f"listed as an expected failure ({reason}) but no such test ran"
                cases.append(_problem(name, suite, "failed", message, "", Outcome.TEST_FAILURE))
    return cases


def _last_diag(output: str) -> str:
    """The diagnostic line just before a failed result explains it best (ktap.rst)."""
    for line in reversed(output.splitlines()):
        if line.strip().startswith("#"):
            return line.strip().lstrip("#").strip() or "not ok"
    return "not ok"


def _missing_cases(suite: str, report: KtapReport, stop: _Stop | None, running_known: bool) -> list[Case]:
    """Planned top-level tests with no result: the first is the one running when a suite stopped."""
    cases = []
    for number in range(len(report.tests) + 1, len(report.tests) + report.missing() + 1):
        name = f"test {number}"
        if stop is None:
            message = f"no result line (the plan announced {report.plan} tests)"
            cases.append(_problem(name, suite, "error", message, "", Outcome.TEST_FAILURE))
        elif not running_known:
            running_known = True
            cases.append(_problem(name, suite, "error", stop.reason, _tail(report.trailing), stop.outcome))
        else:
            cases.append(Case(name, suite, "skipped", message=stop.not_run))
    if stop is not None and not running_known:  # no plan to tell what ran: say where it stopped
        cases.append(_problem(suite, suite, "error", stop.reason, _tail(report.trailing), stop.outcome))
    return cases


# --- Python suites: pytest's junit.xml ---------------------------------------------------------------


def _python_cases(
    suite: str, junit: bytes | None, junit_error: str | None, output: str, rc: int | None, stop: _Stop | None
) -> list[Case]:
    cases: list[Case] = []
    if junit_error is not None:
        return [
            _problem("results: junit.xml", suite, "failed", junit_error, _tail(output), Outcome.TEST_FAILURE)
        ]
    if junit is not None:
        try:
            cases = _read_pytest_junit(suite, junit)
        except (JUnitXmlError, OSError, ValueError, SyntaxError) as exc:
            message = f"junit.xml is malformed: {exc}"
            return [
                _problem("results: junit.xml", suite, "failed", message, _tail(output), Outcome.TEST_FAILURE)
            ]
    if stop is not None:
        message = f"{stop.reason}; the test running then is not in pytest's report"
        cases.append(_problem(suite, suite, "error", message, _tail(output), stop.outcome))
        return cases
    if junit is None:
        message = f"pytest wrote no junit.xml (exit status {_describe_rc(rc)})"
        return [_problem(suite, suite, "failed", message, _tail(output), Outcome.TEST_FAILURE)]
    if rc == 5 or (rc == 0 and not cases):
        cases.append(
            _problem(suite, suite, "failed", "pytest collected no tests", _tail(output), Outcome.TEST_FAILURE)
        )
    elif rc not in (0, 1, None) and not any(c.state in ("failed", "error") for c in cases):
        message = f"pytest exited with status {_describe_rc(rc)}"
        cases.append(_problem("pytest", suite, "failed", message, _tail(output), Outcome.TEST_FAILURE))
    return cases


def _read_pytest_junit(suite: str, data: bytes) -> list[Case]:
    """pytest's junit.xml, from the bytes already read. A DTD is refused: pytest never writes one, and
    entities are how XML pulls in other files or expands a few bytes into gigabytes."""
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise ValueError("it has a <!DOCTYPE>/<!ENTITY> declaration (pytest writes none): refused")
    xml = JUnitXml.fromstring(data)
    parsed: list[ParsedSuite] = [xml] if isinstance(xml, ParsedSuite) else list(xml)
    cases = []
    for testsuite in parsed:
        for testcase in testsuite:
            classname = f"{suite}.{testcase.classname}" if testcase.classname else suite
            case = Case(
                testcase.name or "?",
                classname,
                "passed",
                seconds=testcase.time,
                output=_tail(testcase.system_out or "", CASE_OUTPUT_LIMIT),
                stderr=_tail(testcase.system_err or "", CASE_OUTPUT_LIMIT),
            )
            for item in testcase.result:
                if isinstance(item, JunitError):
                    case.state, case.outcome = "error", Outcome.TEST_FAILURE
                elif isinstance(item, JunitFailure) and case.state != "error":
                    case.state, case.outcome = "failed", Outcome.TEST_FAILURE
                elif isinstance(item, JunitSkipped) and case.state == "passed":
                    case.state = "skipped"
                else:
                    continue
                case.message = item.message or ""
                case.detail = item.text or ""
            cases.append(case)
    return cases


# --- files -------------------------------------------------------------------------------------------


@dataclass
class _SuiteFiles:
    """What the guest left in results/<suite>/, read through kernel_ci.report.guestfiles."""

    status: dict[str, Any] | None = None
    status_error: str | None = None
    output: str | None = None
    output_error: str | None = None
    junit: bytes | None = None
    junit_error: str | None = None
    artifacts: str = ""  # the artifacts' part of the suite's system-out
    notes: str = ""  # what was cut or refused, first in the suite's system-out
    properties: dict[str, str] = field(default_factory=dict)


_NOT_READ = "not read (the host reads only regular files from the guest)"


def _read_suite_files(results_dir: Path, name: str) -> _SuiteFiles:
    files = _SuiteFiles()
    try:
        with guestfiles.open_dir(results_dir, [name]) as fd:
            _read_status(fd, files)
            _read_output(fd, files)
            _read_junit(fd, files)
            _artifacts(fd, results_dir / name / "artifacts", files)
    except FileNotFoundError:
        return files
    except guestfiles.GuestFileError as exc:
        reason = f"the suite's results directory {exc}: nothing in it was read"
        files.status_error = files.output_error = files.junit_error = reason
    except OSError as exc:  # unreadable in some other way: a failed testcase, never a crash
        reason = f"the suite's results directory cannot be read: {exc.strerror}"
        files.status_error = files.output_error = files.junit_error = reason
    return files


def _guest_read(dir_fd: int, name: str, limit: int) -> tuple[guestfiles.GuestFile | None, str | None]:
    """(file, None), (None, None) when absent, or (None, why it was not read)."""
    try:
        return guestfiles.read_at(dir_fd, name, limit), None
    except FileNotFoundError:
        return None, None
    except guestfiles.GuestFileError as exc:
        return None, f"{name} is {exc}: {_NOT_READ}"
    except OSError as exc:
        return None, f"{name} cannot be read: {exc.strerror}"


def _read_status(dir_fd: int, files: _SuiteFiles) -> None:
    got, files.status_error = _guest_read(dir_fd, "status.json", STATUS_READ_LIMIT)
    if got is None:
        return
    if got.truncated:
        files.status_error = f"status.json is larger than {STATUS_READ_LIMIT} bytes ({got.size}): not read"
        return
    try:
        data = json.loads(got.data)
    except ValueError as exc:
        files.status_error = f"status.json is malformed: {exc}"
        return
    if not isinstance(data, dict) or "rc" not in data or "timed_out" not in data:
        files.status_error = "status.json is malformed: not an object with rc and timed_out"
        return
    files.status = data


def _read_output(dir_fd: int, files: _SuiteFiles) -> None:
    got, files.output_error = _guest_read(dir_fd, "output.txt", OUTPUT_READ_LIMIT)
    if got is None:
        return
    files.output = got.text()
    if got.truncated:
        files.properties["output.truncated"] = f"read {len(got.data)} of {got.size} bytes"
        files.notes += (
            f"[kernel-ci: output.txt is {got.size} bytes; only the first {len(got.data)} were read]\n"
        )


def _read_junit(dir_fd: int, files: _SuiteFiles) -> None:
    got, files.junit_error = _guest_read(dir_fd, "junit.xml", JUNIT_READ_LIMIT)
    if got is None:
        return
    if got.truncated:
        files.junit_error = f"junit.xml is larger than {JUNIT_READ_LIMIT} bytes ({got.size}): not read"
        return
    files.junit = got.data


def _artifacts(suite_fd: int, where: Path, files: _SuiteFiles) -> None:
    """List the suite's artifacts as properties (at most ARTIFACT_MAX_FILES); small text ones are shown
    in the suite's system-out. Symlinks, FIFOs, devices and bad names are listed as refused, not read."""
    try:
        fd = guestfiles.open_entry(suite_fd, "artifacts", want_dir=True)
    except FileNotFoundError:
        return
    except guestfiles.GuestFileError as exc:
        files.properties["artifacts.rejected"] = "1"
        files.artifacts = f"\n--- artifacts/ is {exc}: {_NOT_READ} ---"
        return
    except OSError as exc:
        files.properties["artifacts.rejected"] = "1"
        files.artifacts = f"\n--- artifacts/ cannot be read: {exc.strerror} ---"
        return
    try:
        found = guestfiles.walk(fd, max_files=ARTIFACT_MAX_FILES)
        shown = [
            _artifact_line(fd, relative, size, where, files, index)
            for index, (relative, size) in enumerate(found.files)
        ]
    finally:
        os.close(fd)
    shown += [f"--- artifact {line} ---" for line in found.refused]
    shown += [f"--- artifacts: {line} ---" for line in found.cut]
    if found.refused:
        files.properties["artifacts.rejected"] = str(len(found.refused))
    if found.cut:
        files.properties["artifacts.truncated"] = "; ".join(found.cut)
    files.artifacts = ("\n" + "\n".join(shown)) if shown else ""


def _artifact_line(dir_fd: int, relative: str, size: int, where: Path, files: _SuiteFiles, index: int) -> str:
    files.properties[f"artifact:{relative}"] = str(where / relative)
    text = None
    if size <= ARTIFACT_TEXT_LIMIT and index < ARTIFACT_INLINE_FILES:
        try:
            got = guestfiles.read_under(dir_fd, relative.split("/"), ARTIFACT_TEXT_LIMIT)
            text = got.data.decode("utf-8") if not got.truncated else None
        except (OSError, guestfiles.GuestFileError, UnicodeDecodeError):
            text = None
    if text is not None:
        return f"--- artifact {relative} ({size} bytes) ---\n{text.rstrip()}"
    return f"--- artifact {relative} ({size} bytes, not shown) ---"


# --- helpers -----------------------------------------------------------------------------------------


def _problem(
    name: str, classname: str, state: CaseState, message: str, detail: str, outcome: Outcome
) -> Case:
    return Case(name, classname, state, message=message, detail=detail, outcome=outcome)


def _tail(text: str, limit: int = CASE_OUTPUT_LIMIT) -> str:
    if len(text) <= limit:
        return text
    return f"[... {len(text) - limit} characters cut ...]\n" + text[-limit:]


def _describe_rc(rc: int | None) -> str:
    if rc is None:
        return "unknown"
    if rc < 0:
        try:
            return f"{rc} (killed by {signal.Signals(-rc).name})"
        except ValueError:
            return f"{rc} (killed by signal {-rc})"
    return str(rc)


# --- JUnit -------------------------------------------------------------------------------------------


def to_junit(report: RunReport) -> str:
    """The merged JUnit XML: one <testsuite> per suite (boot first), properties on each."""
    suites = []
    for suite in report.suites:
        cases = []
        for case in suite.cases:
            junit_case = JunitCase(
                case.name,
                classname=case.classname,
                elapsed_sec=case.seconds,
                stdout=case.output or None,
                stderr=case.stderr or None,
            )
            if case.state == "failed":
                junit_case.add_failure_info(
                    message=case.message, output=case.detail or None, failure_type="failure"
                )
            elif case.state == "error":
                junit_case.add_error_info(
                    message=case.message, output=case.detail or None, error_type="error"
                )
            elif case.state == "skipped":
                junit_case.add_skipped_info(message=case.message)
            cases.append(junit_case)
        suites.append(
            JunitSuite(
                suite.name,
                cases,
                properties=dict(suite.properties),
                stdout=suite.output or None,
                stderr=suite.errors or None,
            )
        )
    return to_xml_report_string(suites, prettyprint=True, encoding="utf-8")


def write_junit(report: RunReport, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_junit(report), encoding="utf-8")
    return path


# --- console summary ---------------------------------------------------------------------------------


def render_summary(report: RunReport) -> Table:
    """Per-suite counts, suites with failures first; the outcome and its exit code in the title."""
    style = "bold green" if report.outcome is Outcome.PASS else "bold red"
    table = Table(title=Text(f"{report.outcome.name} (exit {report.outcome.value})", style=style))
    table.add_column("suite")
    table.add_column("failed", justify="right", style="red")
    table.add_column("errors", justify="right", style="red")
    table.add_column("skipped", justify="right", style="yellow")
    table.add_column("passed", justify="right", style="green")
    table.add_column("time", justify="right")
    rows = sorted(report.rows, key=lambda row: (row.failed + row.errors) == 0)
    for row in rows:
        time = f"{row.seconds:.1f}s" if row.seconds is not None else "-"
        table.add_row(
            Text(row.name), str(row.failed), str(row.errors), str(row.skipped), str(row.passed), time
        )
    table.add_section()
    table.add_row(
        Text("total", style="bold"),
        str(report.count("failed")),
        str(report.count("error")),
        str(report.count("skipped")),
        str(report.count("passed")),
        "",
    )
    return table


def render_problems(report: RunReport, max_lines: int = 40) -> list[RenderableType]:
    """One panel per failed (then errored) test: its message and the end of its trace or output."""
    panels: list[RenderableType] = []
    for suite, case in report.problems():
        body = case.detail or case.output
        lines = body.rstrip().splitlines()
        if len(lines) > max_lines:
            lines = [f"[... {len(lines) - max_lines} lines cut ...]", *lines[-max_lines:]]
        text = Text(case.message, style="bold")
        if lines:
            text.append("\n" + "\n".join(lines), style="")
        style = "red" if case.state == "failed" else "magenta"
        title = Text(f"{case.state.upper()} {suite} :: {case.name} [{case.outcome.name}]")
        panels.append(Panel(text, title=title, title_align="left", border_style=style))
    return panels


def render_report(report: RunReport) -> Group:
    """The summary table, then the failing tests' output."""
    return Group(render_summary(report), *render_problems(report))
