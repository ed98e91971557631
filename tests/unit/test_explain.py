"""Results that explain themselves (issue 18): classification, baselines, retries, prefix keys, the search."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kernel_ci.build import kconfig
from kernel_ci.build.plan import PlanError, make_plan
from kernel_ci.build.records import RecordError
from kernel_ci.core.errors import ExitCode, UsageError
from kernel_ci.flow.attribute import (
    Context,
    baseline_build,
    blame,
    first_failures,
    prefix_request,
    run_request,
    tree_base,
)
from kernel_ci.flow.build import BuildRequest, plan_request, read_request, request_path
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


def _fragment(tmp_path: Path) -> Path:
    fragment = tmp_path / "user.config"
    fragment.write_text("CONFIG_PRINTK_TIME=y\n")
    return fragment


def test_a_prefix_keeps_every_option_of_the_run_and_without_series_is_the_plan_without_them(
    tmp_path: Path,
) -> None:
    """--fragment, the suites folder, the series before: the prefix is the run's plan with fewer patches;
    the prefix of length 0 of the first series is, field by field, the plan of `--series none` with the
    same options (the baseline), its series' fragments left out with their patches."""
    fragment = _fragment(tmp_path)
    suites_dir = tmp_path / "suites"
    suites_dir.mkdir()
    run = make_plan(series=["ci-smoke", "self-ptrace"], fragments=[fragment], suites_dir=suites_dir)
    assert "CONFIG_PRINTK_TIME=y" in run.plan.kconfig and "CONFIG_CI_SMOKE=y" in run.plan.kconfig
    one = run.prefix("self-ptrace", 1)
    assert one.plan.series == ("ci-smoke", "self-ptrace")
    assert [name for name, _ in one.plan.patches][:2] == [name for name, _ in run.plan.patches][:2]
    assert len(one.plan.patches) == 2
    assert one.plan.kconfig == run.plan.kconfig  # both series' fragments, the user's: unchanged
    assert one.plan.kselftests == run.plan.kselftests and one.plan.modules == run.plan.modules
    without = run.prefix("ci-smoke", 0)
    assert without.plan == make_plan(series=[], fragments=[fragment], suites_dir=suites_dir).plan
    assert "CONFIG_PRINTK_TIME=y" in without.plan.kconfig and "CONFIG_CI_SMOKE" not in without.plan.kconfig
    assert [f.name for f in without.fragments] == ["kconfig/base.config", str(fragment)]
    only_first = run.prefix("self-ptrace", 0)
    assert only_first.plan == make_plan(series=["ci-smoke"], fragments=[fragment], suites_dir=suites_dir).plan


def test_a_series_cut_short_may_lose_its_own_fragment_s_symbols_and_nothing_else() -> None:
    """The symbol a series' fragment asks for may come with a later patch of it: a prefix that lacks it
    builds (a warning); a whole series, or another fragment, that loses a symbol is still an error."""
    run = make_plan(series=["self-ptrace"], suites_dir=None)
    count = len(run.series[0].patches)
    without_self_ptrace = "\n".join(
        f"{symbol}={r.value}" if r.value != kconfig.NOT_SET else f"# {symbol} is not set"
        for symbol, r in run.merged.requests.items()
        if symbol != "CONFIG_SELF_PTRACE"
    )
    errors, _ = run.unmet_needs(without_self_ptrace)
    assert [i.request.symbol for i in errors] == ["CONFIG_SELF_PTRACE"]  # the whole series: an error
    cut = run.prefix("self-ptrace", 1)
    assert cut.tolerated == {"series self-ptrace: self-ptrace.config"}
    errors, tolerated = cut.unmet_needs(without_self_ptrace)
    assert errors == [] and [i.request.symbol for i in tolerated] == ["CONFIG_SELF_PTRACE"]
    without_proc = "\n".join(
        line for line in without_self_ptrace.splitlines() if not line.startswith("CONFIG_PROC_FS=")
    )
    errors, _ = cut.unmet_needs(without_proc)
    assert [i.request.symbol for i in errors] == ["CONFIG_PROC_FS"]  # the base fragment's: still required
    assert run.prefix("self-ptrace", count).tolerated == frozenset()  # the whole series is the run itself


def test_attribution_builds_the_run_s_request_with_a_prefix_and_nothing_else(tmp_path: Path) -> None:
    """flow.attribute's prefix builds derive from the run's BuildRequest (fragments, suites, project,
    ccache and cache options), which plans exactly BuildPlan.prefix of the run's plan."""
    request = BuildRequest(
        series=["ci-smoke", "self-ptrace"],
        fragments=[_fragment(tmp_path)],
        suites_dir=None,
        output=tmp_path / "out" / "build",
        jobs=1,
        use_ccache=False,
        external_modules=False,
    )
    run = plan_request(request)
    for prefix in (("self-ptrace", 2), ("self-ptrace", 0), ("ci-smoke", 0)):
        made = prefix_request(request, prefix, tmp_path / "explain" / "x", "http://127.0.0.1:1/ccache/")
        assert made == replace(
            request,
            prefix=prefix,
            output=tmp_path / "explain" / "x",
            ccache_remote="http://127.0.0.1:1/ccache/",
        )
        assert plan_request(made).plan == run.prefix(*prefix).plan


def test_a_build_request_round_trips_through_its_file_without_the_ccache_remote(tmp_path: Path) -> None:
    fragment = _fragment(tmp_path)
    request = BuildRequest(
        kernel="5.10",
        series=["ci-smoke"],
        fragments=[fragment],
        output=tmp_path / "build",
        jobs=3,
        fresh=True,
        ccache_remote="http://user:secret@127.0.0.1:1/ccache/",
        prefix=("ci-smoke", 0),
    )
    text = request.to_json()
    assert "secret" not in text
    back = BuildRequest.from_json(text)
    assert back == replace(request, ccache_remote=None)
    assert plan_request(back).plan == plan_request(request).plan
    (tmp_path / "build").mkdir()
    assert read_request(tmp_path / "build") is None
    request_path(tmp_path / "build").write_text(text)
    assert read_request(tmp_path / "build") == back
    assert request_path(tmp_path / "build") == tmp_path / "build.request.json"  # beside, never inside


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema": 9}, "schema"),
        ({"jobs": 0}, "jobs"),
        ({"fresh": "yes"}, "fresh"),
        ({"prefix": ["ci-smoke"]}, "prefix"),
        ({"series": [1]}, "series"),
        ({"extra": 1}, "unknown"),
    ],
)
def test_a_damaged_build_request_is_refused(tmp_path: Path, change: dict, message: str) -> None:
    data = json.loads(BuildRequest(output=tmp_path).to_json())
    data.update(change)
    with pytest.raises(RecordError, match=message):
        BuildRequest.from_json(json.dumps(data))


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


# --- which request attribution builds from, and when there is no baseline to build --------------------


def _context(tmp_path: Path, request: BuildRequest | None, recipe_key: str, series: tuple[str, ...]):  # type: ignore[no-untyped-def]
    from tests.unit.test_buildrecords import sample
    from tests.unit.test_report_records import record

    metadata = replace(sample(), recipe_key=recipe_key, series=series)
    run = replace(record(), build_key=metadata.build_key, kernel_dir=str(tmp_path / "build"))
    return Context(tmp_path / "run", run, metadata, _report(), tmp_path, tmp_path / "suites", request)


def test_prefixes_are_built_only_from_the_request_that_built_the_run(tmp_path: Path) -> None:
    request = BuildRequest(series=["ci-smoke"], suites_dir=None, output=tmp_path / "build")
    key = plan_request(request).plan.recipe_key()
    assert run_request(_context(tmp_path, request, key, ("ci-smoke",))) is request
    with pytest.raises(UsageError, match="changed since it was built"):  # a series or fragment edited since
        run_request(_context(tmp_path, request, "5e" * 32, ("ci-smoke",)))
    with pytest.raises(UsageError, match="--no-baseline"):  # an older kernel-ci's output: no request kept
        run_request(_context(tmp_path, None, key, ("ci-smoke",)))


def test_a_vanilla_run_and_a_tree_without_a_base_have_no_baseline(tmp_path: Path) -> None:
    vanilla = BuildRequest(series=[], suites_dir=None, output=tmp_path / "build")
    ctx = _context(tmp_path, vanilla, plan_request(vanilla).plan.recipe_key(), ())
    assert baseline_build(ctx) is None and ctx.cost.builds + ctx.cost.cache_hits == 0
    tree = tmp_path / "linux"
    tree.mkdir()
    assert tree_base(tree, None) is None  # not git, no upstream: no default base (a warning says --base)
    with pytest.raises(UsageError, match="--base"):
        tree_base(tree, "v5.10")
