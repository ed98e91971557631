"""Results that explain themselves (issue 18): classification, baselines, retries, prefix keys, the search."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel_ci.build.plan import PlanError, make_plan
from kernel_ci.core.errors import ExitCode
from kernel_ci.flow.attribute import blame, first_failures
from kernel_ci.report import compare, junit, render
from kernel_ci.report.model import Case, Outcome, RunReport, SuiteResult

FINGERPRINT = "7d13f7fb1ee4cd046c9c404e7bf7ebe4"


def _report(**states: str) -> RunReport:
    """A report from "suite__case"="state" pairs."""
    by_suite: dict[str, list[Case]] = {}
    for key, state in states.items():
        suite, name = key.split("__", 1)
        by_suite.setdefault(suite, []).append(Case(name, suite, state, message=f"{name} {state}"))  # type: ignore[arg-type]
    suites = [SuiteResult(name, cases) for name, cases in by_suite.items()]
    bad = any(c.state == "failed" for s in suites for c in s.cases)
    return RunReport(Outcome.TEST_FAILURE if bad else Outcome.PASS, suites)


# --- classification ---------------------------------------------------------------------------------------


def test_a_failure_the_baseline_has_too_is_preexisting_and_does_not_fail_the_run() -> None:
    run = _report(smoke__a="failed", smoke__b="passed")
    base = compare.Baseline.of(_report(smoke__a="failed", smoke__b="passed"), "k" * 64, "6.1")
    result = compare.compare(run, compare.Evidence(baseline=base))
    assert [f.verdict for f in result.findings] == ["preexisting"]
    assert result.exit_code() == ExitCode.PASS
    assert result.exit_code(fail_on_preexisting=True) == ExitCode.TEST_FAILURE


def test_a_failure_the_baseline_passes_is_a_regression_blamed_on_its_patch() -> None:
    run = _report(smoke__a="failed")
    base = compare.Baseline.of(_report(smoke__a="passed"), "k" * 64, "6.1")
    evidence = compare.Evidence(baseline=base, blamed={"smoke::a": "s/0002-x.patch"})
    result = compare.compare(run, evidence)
    assert result.findings == (compare.Finding("smoke::a", "regression", "s/0002-x.patch"),)
    assert result.exit_code() == ExitCode.TEST_FAILURE
    assert "first fails after s/0002-x.patch" in result.findings[0].line()


def test_vanished_and_new_tests_against_the_baseline() -> None:
    run = _report(smoke__a="passed", smoke__new="passed")
    base = compare.Baseline.of(_report(smoke__a="passed", smoke__gone="passed"), "k" * 64, "6.1")
    result = compare.compare(run, compare.Evidence(baseline=base))
    assert (result.vanished, result.new) == (("smoke::gone",), ("smoke::new",))
    assert "smoke::gone: vanished (in the baseline, not in this run)" in compare.summary_lines(result)


def test_a_test_that_passes_on_a_retry_is_flaky_with_its_counts_and_exits_flaky() -> None:
    first = _report(smoke__a="failed", smoke__b="passed")
    retries = [_report(smoke__a="failed", smoke__b="passed"), _report(smoke__a="passed", smoke__b="passed")]
    counts = compare.count_retries(first, retries)
    assert counts == {"smoke::a": compare.RetryCount(passed=1, failed=2)}
    result = compare.compare(first, compare.Evidence(retries=counts))
    assert result.findings[0].verdict == "flaky"
    assert result.exit_code() == ExitCode.FLAKY
    assert int(ExitCode.FLAKY) not in {int(o) for o in Outcome}  # apart from every guest outcome


def test_a_test_failing_every_retry_is_not_flaky_and_one_missing_from_a_retry_counts_as_failed() -> None:
    first = _report(smoke__a="failed")
    counts = compare.count_retries(first, [_report(other__x="passed"), _report(smoke__a="failed")])
    assert counts["smoke::a"] == compare.RetryCount(0, 3) and not counts["smoke::a"].flaky
    assert compare.compare(first, compare.Evidence(retries=counts)).exit_code() == ExitCode.TEST_FAILURE


def test_only_the_failing_suites_are_rerun() -> None:
    assert compare.failing_suites({"b::x", "a::y", "a::z"}) == ("a", "b")


# --- the baseline record: it crosses a trust boundary (the shared cache) ---------------------------------


def test_a_baseline_round_trips_through_json() -> None:
    base = compare.Baseline.of(_report(smoke__a="failed", smoke__b="skipped"), "k" * 64, "6.1.100")
    assert compare.Baseline.from_json(base.to_json()) == base


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"schema": 99, "build_key": "k", "kernel": "6.1", "tests": {}}',
        '{"schema": 1, "build_key": 5, "kernel": "6.1", "tests": {}}',
        '{"schema": 1, "build_key": "k", "kernel": "6.1", "tests": {"a": "exploded"}}',
        '{"schema": 1, "build_key": "k", "kernel": "6.1", "tests": {"": "passed"}}',
        '{"schema": 1, "build_key": "k", "kernel": "6.1", "tests": []}',
        '{"schema": 1, "build_key": "k", "kernel": "6.1", "tests": {}, "evil": 1}',
        b'{"schema": 1, "build_key": "k", "kernel": "6.1", "tests": {"\xff": "passed"}}',
    ],
)
def test_a_baseline_that_is_not_ours_is_refused_with_a_reason(text: str | bytes) -> None:
    with pytest.raises(compare.BaselineError):
        compare.Baseline.from_json(text)


def test_an_oversized_baseline_is_refused() -> None:
    tests = {f"s::t{i}": "passed" for i in range(compare.MAX_BASELINE_TESTS + 1)}
    big = compare.Baseline("k", "6.1", tests).to_json()  # type: ignore[arg-type]
    with pytest.raises(compare.BaselineError, match="more than"):
        compare.Baseline.from_json(big)


# --- the report carries the answer ----------------------------------------------------------------------


def test_the_junit_report_carries_the_finding_as_a_property_and_a_line_of_the_failure(tmp_path: Path) -> None:
    run = _report(smoke__a="failed", smoke__b="passed")
    result = compare.compare(run, compare.Evidence(blamed={"smoke::a": "ci-smoke/0002-break.patch"}))
    compare.annotate(run, result)
    path = junit.write_junit(run, tmp_path / "junit.xml")
    back = junit.read_report(path)
    case = back.suites[0].cases[0]
    assert case.properties == {
        compare.PROP_CLASSIFICATION: "regression",
        compare.PROP_BLAMED_PATCH: "ci-smoke/0002-break.patch",
    }
    assert "kernel-ci: regression of this series; first fails after ci-smoke/0002-break.patch" in case.detail
    assert back.suites[0].cases[1].properties == {}
    markdown = render.to_markdown(back)
    assert "first fails after ci-smoke/0002-break.patch" in markdown


def test_a_report_without_findings_is_written_as_before() -> None:
    run = _report(smoke__a="failed")
    assert "<properties>" not in junit.to_junit(run).split("<testcase", 1)[1]


# --- prefixes: one definition, each its own key -------------------------------------------------------


def test_every_prefix_of_a_series_is_its_own_build_key_and_the_whole_series_is_the_plan_itself() -> None:
    planned = make_plan(series=["ci-smoke"])
    count = len(planned.series[0].patches)
    plans = [planned.prefix("ci-smoke", n).plan for n in range(count + 1)]
    assert plans[-1] == planned.plan
    keys = {p.build_key("CONFIG_64BIT=y\n", FINGERPRINT) for p in plans}
    assert len(keys) == count + 1
    base = planned.prefix("ci-smoke", 0)
    assert base.plan.series == () and base.plan.patches == () and base.series == ()


def test_a_prefix_past_the_series_or_of_another_series_is_refused() -> None:
    planned = make_plan(series=["ci-smoke"])
    with pytest.raises(PlanError, match="no prefix"):
        planned.prefix("ci-smoke", 99)
    with pytest.raises(PlanError, match="not in this plan"):
        planned.prefix("self-ptrace", 0)


# --- the search: walk a short series, bisect a long one ------------------------------------------------


def _probe_of(breaks: dict[str, int], calls: list[int]):  # type: ignore[no-untyped-def]
    def probe(length: int) -> set[str]:
        calls.append(length)
        return {name for name, n in breaks.items() if length >= n}

    return probe


def test_a_short_series_is_walked_and_names_the_patch_that_broke_the_test() -> None:
    calls: list[int] = []
    found = first_failures(3, {"s::a"}, _probe_of({"s::a": 2}, calls))
    assert found == {"s::a": 2} and calls == [0, 1, 2]
    assert blame(["x/1", "x/2", "x/3"], found) == {"s::a": "x/2"}


def test_a_long_series_is_bisected_in_log_probes_per_test() -> None:
    calls: list[int] = []
    breaks = {"s::a": 13, "s::b": 40, "s::c": 0}
    found = first_failures(64, set(breaks), _probe_of(breaks, calls))
    assert found == breaks
    assert len(set(calls)) <= 3 * 7 and len(calls) == len(set(calls))  # memoised: no prefix twice
    assert blame([f"x/{i}" for i in range(1, 65)], found) == {"s::a": "x/13", "s::b": "x/40"}


def test_in_ci_a_regression_is_annotated_on_the_patch_that_broke_it(tmp_path: Path) -> None:
    from kernel_ci.report import github

    run = _report(smoke__a="failed", smoke__b="failed", smoke__c="failed")
    base = compare.Baseline.of(_report(smoke__b="failed"), "k" * 64, "6.1")
    evidence = compare.Evidence(
        baseline=base,
        blamed={"smoke::a": "ci-smoke/0002-x.patch"},
        retries={"smoke::c": compare.RetryCount(1, 2)},
    )
    lines = github.finding_annotations(
        compare.compare(run, evidence), patches_root=tmp_path / "kernel-patches"
    )
    assert lines[0].startswith("::error file=")
    assert "kernel-patches/ci-smoke/0002-x.patch,line=1,title=kernel-ci%3A smoke%3A%3Aa::" in lines[0]
    assert lines[1].startswith("::notice ") and "pre-existing" in lines[1]
    assert lines[2].startswith("::warning ") and "1 passed / 2 failed of 3 runs" in lines[2]


def test_kernel_ci_attribute_of_a_folder_that_is_no_run_is_a_usage_error(tmp_path: Path) -> None:
    from kernel_ci.cli.main import main

    assert main(["-o", str(tmp_path), "attribute", str(tmp_path)]) == ExitCode.USAGE
    from argparse import Namespace

    from kernel_ci.cli import explain
    from kernel_ci.core.errors import UsageError

    with pytest.raises(UsageError, match="--retries 99"):
        explain.check(Namespace(retries=99))
