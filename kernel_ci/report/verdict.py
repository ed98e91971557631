"""The verdict: turn what the guest left (results dir + console) into one RunReport and one outcome.

Inputs: the plan (plan.json), the results dir (`<suite>/output.txt`, `status.json`, `junit.xml`,
`artifacts/`), the console report (kernel_ci.guest.protocol.ConsoleReport, from the scanner) and how the
guest ended (GuestEnd, from the caller). kernel_ci.report.junit writes the report; render shows it.
Every problem becomes a testcase with an Outcome; the run's outcome is the worst of them.

The results dir is written by the guest, which runs patch authors' tests as root: it is read only through
kernel_ci.report.guestfiles (no symlink followed, regular files only, names checked, every read capped),
and whatever was refused or cut is said in the report. Parsed content is bounded too (testcases per
suite, KTAP depth).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel_ci.guest.protocol import ConsoleReport, EndKind, Fault, Plan, PlanSuite, SuiteSpan
from kernel_ci.report import guestfiles
from kernel_ci.report.junit import JunitError
from kernel_ci.report.junit import parse as parse_junit
from kernel_ci.report.ktap import MAX_DEPTH as KTAP_MAX_DEPTH
from kernel_ci.report.ktap import KtapReport, KtapTest, flatten
from kernel_ci.report.ktap import parse as parse_ktap
from kernel_ci.report.model import Case, CaseState, GuestEnd, Outcome, RunReport, SuiteResult, worst

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
    if end.kind == EndKind.QEMU_FAILED:
        return _Stop(f"QEMU failed: {end.detail}", Outcome.INFRA_FAILURE, "QEMU failed")
    if end.kind == EndKind.HANG:
        return _Stop(f"the guest hung: {end.detail}", Outcome.GUEST_HANG, "the guest hung")
    if end.kind == EndKind.TIMEOUT:
        return _Stop(f"the run timed out: {end.detail}", Outcome.GUEST_HANG, "the run timed out")
    if end.kind == EndKind.BOOT_TIMEOUT:
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
    elif end.kind == EndKind.QEMU_FAILED:
        cases.append(
            _problem("boot", BOOT_SUITE, "error", f"QEMU failed: {end.detail}", tail, Outcome.INFRA_FAILURE)
        )
    elif console.panic is not None:
        message = f"the kernel panicked before init: {console.panic.title}"
        cases.append(_problem("boot", BOOT_SUITE, "failed", message, tail, Outcome.KERNEL_PANIC))
    elif end.kind in (EndKind.BOOT_TIMEOUT, EndKind.TIMEOUT, EndKind.HANG):
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
    properties = {"guest.end": str(end.kind)}
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
    if end.kind in (EndKind.HANG, EndKind.TIMEOUT):
        running = console.running
        target = by_name.get(running.name, boot) if running is not None else boot
        detail = (
            f"--- console (last lines) ---\n{end.console_tail}\n--- sysrq task dump ---\n{end.sysrq_dump}"
        )
        what = "hung" if end.kind == EndKind.HANG else "timed out"
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
        except JunitError as exc:
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
    """pytest's junit.xml, from the bytes already read (a DTD is refused by junit.parse); its cases are
    named under the suite and their output cut to CASE_OUTPUT_LIMIT."""
    cases = [case for testsuite in parse_junit(data, "junit.xml") for case in testsuite.cases]
    for case in cases:
        case.classname = f"{suite}.{case.classname}" if case.classname else suite
        case.name = case.name or "?"
        case.output = _tail(case.output, CASE_OUTPUT_LIMIT)
        case.stderr = _tail(case.stderr, CASE_OUTPUT_LIMIT)
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


# --- several guests, one report ----------------------------------------------------------------------

_STATE_RANK: dict[CaseState, int] = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


def merge_guests(reports: Sequence[RunReport], order: Sequence[str]) -> RunReport:
    """One report of a run whose suites ran in several guests (kernel-ci test --guests): every suite from
    the guest that ran it, in the run's order (order: suite names); one boot suite whose cases are, name
    by name, the worst any guest had (a problem's message says which guest), so that the run's test names
    are those of a run in one guest; the worst outcome; the properties of the worst guest (the one that
    explains the verdict), and `guests`, their number."""
    if len(reports) == 1:
        return reports[0]
    rank = {name: index for index, name in enumerate(order)}
    suites = [s for r in reports for s in r.suites if s.name != BOOT_SUITE]
    suites.sort(key=lambda s: rank.get(s.name, len(rank)))
    boot = _merge_boot([next((s for s in r.suites if s.name == BOOT_SUITE), None) for r in reports])
    known = [r.outcome for r in reports if r.outcome is not None]
    outcome = worst(known) if len(known) == len(reports) else None
    lead = max(reports, key=lambda r: -1 if r.outcome is None else r.outcome.severity)
    properties = {**lead.properties, "guests": str(len(reports))}
    if boot is not None:
        boot.properties = {**boot.properties, "guests": str(len(reports))}
        suites.insert(0, boot)
    return RunReport(outcome, suites, properties)


def _merge_boot(boots: Sequence[SuiteResult | None]) -> SuiteResult | None:
    present = [(number, s) for number, s in enumerate(boots, 1) if s is not None]
    if not present:
        return None
    cases: dict[str, Case] = {}
    for number, suite in present:
        for case in suite.cases:
            held = cases.get(case.name)
            if held is None or (_STATE_RANK[case.state], case.outcome.severity) > (
                _STATE_RANK[held.state],
                held.outcome.severity,
            ):
                message = f"guest {number}: {case.message}" if case.message else case.message
                cases[case.name] = dataclasses.replace(case, message=message)
    worst_guest = max(present, key=lambda item: max((_STATE_RANK[c.state] for c in item[1].cases), default=0))
    merged = SuiteResult(BOOT_SUITE, list(cases.values()), dict(worst_guest[1].properties))
    seconds = [s.seconds for _, s in present if s.seconds is not None]
    merged.seconds = max(seconds) if seconds else None
    merged.output, merged.errors = worst_guest[1].output, worst_guest[1].errors
    return merged
