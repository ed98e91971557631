"""Results that explain themselves: a run's failing tests set against a baseline, retries and attribution.

A red run says which tests failed; a maintainer asks next whether the series broke them (regression) or
the kernel without it fails too (pre-existing), whether they fail every time (flaky), which patch is to
blame, and what disappeared or appeared. This module answers from data only — the reports of the run, of
its retries, of the baseline and the attribution's findings — so every rule is tested without a kernel;
the flows that produce those reports (flow/attribute.py) are separate.

A test is named "<suite>::<case>": the name a JUnit report gives it, stable across runs of the same suites.

Hand-written because no library classifies test results against a baseline; the record is a plain
dataclass with to_json/from_json (the rule for what stages hand each other), validated on the way in
because a baseline can come from the shared cache service.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kernel_ci.core.errors import ExitCode, InfrastructureError
from kernel_ci.report.model import Case, RunReport

BASELINE_SCHEMA = 1
MAX_BASELINE_TESTS = 20_000  # a baseline with more tests than any suite set holds is refused, not stored
MAX_TEST_NAME = 512

Verdict = Literal["regression", "preexisting", "flaky", "passed", "skipped"]
TestState = Literal["passed", "failed", "skipped"]

# Properties written on a failing testcase of the JUnit report (kernel_ci.report.junit).
PROP_CLASSIFICATION = "kernel_ci.classification"
PROP_BLAMED_PATCH = "kernel_ci.blamed_patch"
PROP_RETRIES = "kernel_ci.retries"


class BaselineError(InfrastructureError, ValueError):
    """A baseline record that is not what this kernel-ci writes (a damaged file or a bad upload to the
    shared cache: never the user's input, so infrastructure); the message says what is wrong."""


def test_id(suite: str, case: str) -> str:
    return f"{suite}::{case}"


def _state(case: Case) -> TestState:
    if case.state in ("failed", "error"):
        return "failed"
    return "skipped" if case.state == "skipped" else "passed"


def test_states(report: RunReport) -> dict[str, TestState]:
    """Every test of a report by id; a repeated id keeps its worst state (a failure is never hidden)."""
    states: dict[str, TestState] = {}
    for suite in report.suites:
        for case in suite.cases:
            name = test_id(suite.name, case.name)
            state = _state(case)
            if states.get(name) != "failed":
                states[name] = state
    return states


def failing(report: RunReport) -> set[str]:
    return {name for name, state in test_states(report).items() if state == "failed"}


def failing_suites(tests: Iterable[str]) -> tuple[str, ...]:
    """The suites to rerun for these tests (a retry and a prefix run only what failed)."""
    return tuple(sorted({name.split("::", 1)[0] for name in tests}))


# --- the baseline record ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """The suites' results on the kernel without the series: what "already broken" means for a run.

    build_key: the build the baseline ran on (the vanilla kernel of the same version, or --tree's base);
    stored beside that build in the local cache and on the service (keyed by it, verified like an entry).
    """

    build_key: str
    kernel: str
    tests: Mapping[str, TestState]
    schema: int = BASELINE_SCHEMA

    @classmethod
    def of(cls, report: RunReport, build_key: str, kernel: str) -> Baseline:
        return cls(build_key, kernel, test_states(report))

    def to_json(self) -> str:
        document = {
            "schema": self.schema,
            "build_key": self.build_key,
            "kernel": self.kernel,
            "tests": dict(sorted(self.tests.items())),
        }
        return json.dumps(document, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "baseline") -> Baseline:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BaselineError(f"{where}: not JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise BaselineError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("schema") != BASELINE_SCHEMA:
            raise BaselineError(
                f"{where}: baseline schema {data.get('schema')!r}, this kernel-ci reads {BASELINE_SCHEMA}"
            )
        unknown = sorted(set(data) - {"schema", "build_key", "kernel", "tests"})
        if unknown:
            raise BaselineError(f"{where}: unknown field(s) {', '.join(unknown)}")
        build_key, kernel = data.get("build_key"), data.get("kernel")
        if not isinstance(build_key, str) or not isinstance(kernel, str):
            raise BaselineError(f"{where}: build_key and kernel must be strings")
        return cls(build_key, kernel, _tests(data.get("tests"), where))


def _tests(value: Any, where: str) -> dict[str, TestState]:
    if not isinstance(value, dict):
        raise BaselineError(f"{where}: tests must be an object of test name -> state")
    if len(value) > MAX_BASELINE_TESTS:
        raise BaselineError(f"{where}: {len(value)} tests, more than the {MAX_BASELINE_TESTS} accepted")
    tests: dict[str, TestState] = {}
    for name, state in value.items():
        if not isinstance(name, str) or not name or len(name) > MAX_TEST_NAME:
            raise BaselineError(f"{where}: a test name is empty or longer than {MAX_TEST_NAME} characters")
        if state not in ("passed", "failed", "skipped"):
            raise BaselineError(f"{where}: test {name[:80]!r} has state {state!r:.40}")
        tests[name] = state
    return tests


# --- retries -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryCount:
    """How a failing test did over the first run and its retries in fresh guests."""

    passed: int
    failed: int

    @property
    def flaky(self) -> bool:
        return self.passed > 0 and self.failed > 0

    def render(self) -> str:
        return f"{self.passed} passed / {self.failed} failed of {self.passed + self.failed} runs"


def count_retries(first: RunReport, retries: Iterable[RunReport]) -> dict[str, RetryCount]:
    """For each test failing in the first run: its passes and failures over all runs.

    A retry runs only the failing suites; a test a retry did not report (its guest died) counts as failed
    there, since it did not pass."""
    tests = failing(first)
    counts = {name: [0, 1] for name in tests}
    for retry in retries:
        states = test_states(retry)
        for name in tests:
            counts[name][0 if states.get(name) == "passed" else 1] += 1
    return {name: RetryCount(passed, failed) for name, (passed, failed) in counts.items()}


# --- the comparison ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One failing test, explained."""

    test: str
    verdict: Verdict
    blamed_patch: str | None = None  # the first patch after which it fails ("series/0002-x.patch")
    retries: RetryCount | None = None

    def line(self) -> str:
        """The sentence that goes into the failure text, the summary and the annotation."""
        words = {
            "regression": "regression of this series",
            "preexisting": "pre-existing: fails on the kernel without the series too",
            "flaky": "flaky",
            "passed": "passed",
            "skipped": "skipped",
        }[self.verdict]
        if self.blamed_patch:
            words += f"; first fails after {self.blamed_patch}"
        if self.retries is not None:
            words += f" ({self.retries.render()})"
        return words


@dataclass(frozen=True)
class Comparison:
    findings: tuple[Finding, ...]  # one per test failing in the run
    vanished: tuple[str, ...] = ()  # in the baseline, absent now
    new: tuple[str, ...] = ()  # absent from the baseline, present now
    baseline_key: str | None = None

    def by_test(self) -> dict[str, Finding]:
        return {finding.test: finding for finding in self.findings}

    def of(self, verdict: Verdict) -> list[Finding]:
        return [f for f in self.findings if f.verdict == verdict]

    def exit_code(self, fail_on_preexisting: bool = False) -> ExitCode:
        """What the test results mean for the run's exit code (the guest outcome decides beyond them).

        A regression fails the run; only flaky tests: FLAKY; only pre-existing failures: PASS unless asked.
        """
        if self.of("regression") or (fail_on_preexisting and self.of("preexisting")):
            return ExitCode.TEST_FAILURE
        if self.of("flaky"):
            return ExitCode.FLAKY
        return ExitCode.PASS

    def to_json(self) -> str:
        return json.dumps(
            {
                "findings": [
                    {
                        "test": f.test,
                        "verdict": f.verdict,
                        "blamed_patch": f.blamed_patch,
                        "retries": None if f.retries is None else [f.retries.passed, f.retries.failed],
                    }
                    for f in self.findings
                ],
                "vanished": list(self.vanished),
                "new": list(self.new),
                "baseline_key": self.baseline_key,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Comparison:
        data = json.loads(text)
        findings = tuple(
            Finding(
                str(item["test"]),
                item["verdict"],
                item.get("blamed_patch"),
                None if item.get("retries") is None else RetryCount(*map(int, item["retries"])),
            )
            for item in data["findings"]
        )
        return cls(findings, tuple(data["vanished"]), tuple(data["new"]), data.get("baseline_key"))


@dataclass
class Evidence:
    """What is known about a run besides its own report; each part is optional."""

    baseline: Baseline | None = None
    retries: dict[str, RetryCount] = field(default_factory=dict)
    blamed: dict[str, str] = field(default_factory=dict)  # test -> first failing patch


def compare(report: RunReport, evidence: Evidence) -> Comparison:
    """Each failing test of report explained: flaky (passed on a retry) first, then pre-existing (the
    baseline fails it too), else a regression; plus the tests vanished from or new since the baseline."""
    states = test_states(report)
    base = evidence.baseline.tests if evidence.baseline is not None else None
    findings = []
    for name in sorted(n for n, s in states.items() if s == "failed"):
        count = evidence.retries.get(name)
        verdict: Verdict
        if count is not None and count.flaky:
            verdict = "flaky"
        elif base is not None and base.get(name) == "failed":
            verdict = "preexisting"
        else:
            verdict = "regression"
        blamed = evidence.blamed.get(name) if verdict == "regression" else None
        findings.append(Finding(name, verdict, blamed, count))
    vanished = tuple(sorted(set(base) - set(states))) if base is not None else ()
    new = tuple(sorted(set(states) - set(base))) if base is not None else ()
    key = evidence.baseline.build_key if evidence.baseline is not None else None
    return Comparison(tuple(findings), vanished, new, key)


def annotate(report: RunReport, comparison: Comparison) -> None:
    """Write the findings into the report's failing cases: properties and a line in the failure text."""
    found = comparison.by_test()
    for suite in report.suites:
        for case in suite.cases:
            finding = found.get(test_id(suite.name, case.name))
            if finding is None or case.state not in ("failed", "error"):
                continue
            case.properties[PROP_CLASSIFICATION] = finding.verdict
            if finding.blamed_patch:
                case.properties[PROP_BLAMED_PATCH] = finding.blamed_patch
            if finding.retries is not None:
                case.properties[PROP_RETRIES] = f"{finding.retries.passed}/{finding.retries.failed}"
            line = f"kernel-ci: {finding.line()}"
            if line not in case.detail:
                case.detail = f"{line}\n{case.detail}" if case.detail else line


def summary_lines(comparison: Comparison) -> list[str]:
    """The comparison in plain sentences, for the summary under the table."""
    lines = [f"{f.test}: {f.line()}" for f in comparison.findings]
    lines += [f"{name}: vanished (in the baseline, not in this run)" for name in comparison.vanished]
    lines += [f"{name}: new (not in the baseline)" for name in comparison.new]
    return lines


def blamed_counts(comparison: Comparison) -> Mapping[str, int]:
    counts: dict[str, int] = {}
    for finding in comparison.findings:
        if finding.blamed_patch:
            counts[finding.blamed_patch] = counts.get(finding.blamed_patch, 0) + 1
    return counts
