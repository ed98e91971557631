"""Suites spread over several guests (kernel_ci.guest.placement) and their reports made one
(report.verdict.merge_guests). The real runs are tests/e2e/test_guests.py."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kernel_ci.cli.options import guests_count
from kernel_ci.guest import placement
from kernel_ci.report.junit import parse, write_junit
from kernel_ci.report.model import Case, Outcome, RootfsRef, RunRecord, RunReport, SuiteResult
from kernel_ci.report.verdict import merge_guests

TIMES = {"tracer": 44.0, "kselftest": 22.0, "snapshot": 16.0, "events": 6.0, "py": 3.0, "basics": 2.0}
ORDER = ["basics", "events", "kselftest", "py", "snapshot", "tracer"]


def test_longest_first_onto_the_least_loaded_guest_each_in_the_runs_order() -> None:
    groups = placement.split(ORDER, 2, TIMES)
    assert groups == [["py", "tracer"], ["basics", "events", "kselftest", "snapshot"]]
    loads = [sum(TIMES[n] for n in g) for g in groups]
    assert max(loads) - min(loads) <= 3.0  # 47 and 46 seconds
    assert sorted(n for g in groups for n in g) == sorted(ORDER)  # every suite once


def test_no_empty_guest_and_unknown_suites_count_the_default() -> None:
    assert placement.split(["a", "b"], 4, {}) == [["a"], ["b"]]
    assert placement.split(["a", "b", "c"], 1, TIMES) == [["a", "b", "c"]]
    # an unknown suite counts DEFAULT_SECONDS: 'new' goes beside the 3 s suite, not the 44 s one
    assert placement.split(["tracer", "py", "new"], 2, TIMES) == [["tracer"], ["py", "new"]]


def test_the_split_is_the_same_on_every_run() -> None:
    same = {n: 5.0 for n in ORDER}
    assert placement.split(ORDER, 3, same) == placement.split(list(ORDER), 3, dict(same))


def test_auto_one_guest_per_cpu_within_memory_and_one_for_short_runs() -> None:
    assert placement.auto_guests(ORDER, TIMES, 1024, cpus=2, free_mib=20000) == 2
    assert placement.auto_guests(ORDER, TIMES, 1024, cpus=8, free_mib=20000) == 6  # no more than suites
    assert placement.auto_guests(ORDER, TIMES, 1024, cpus=8, free_mib=2600) == 2  # 1280 MiB a guest
    assert placement.auto_guests(ORDER, TIMES, 1024, cpus=8, free_mib=100) == 1
    assert placement.auto_guests(["py", "basics"], TIMES, 1024, cpus=8) == 1  # 5 s: not worth a boot


def test_guests_option_and_memory_sizes() -> None:
    assert guests_count("auto") is None and guests_count("3") == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match="--guests"):
            guests_count(bad)
    assert placement.memory_mib("1024M") == 1024 and placement.memory_mib("2G") == 2048
    assert placement.memory_mib("512") == 512
    with pytest.raises(placement.GuestsError, match="--memory"):
        placement.memory_mib("lots")


def test_times_are_remembered_and_a_bad_file_is_only_a_lost_hint(tmp_path: Path) -> None:
    path = tmp_path / "suite-times.json"
    placement.record_times(path, {"tracer": 44.0})
    placement.record_times(path, {"py": 3.123})
    assert placement.load_times(path) == {"tracer": 44.0, "py": 3.12}
    path.write_text("{not json")
    assert placement.load_times(path) == {}
    path.write_text('{"a": "x", "b": -1, "c": 2}')
    assert placement.load_times(path) == {"c": 2.0}


def _guest(outcome: Outcome, boot: str, suites: dict[str, str], message: str = "") -> RunReport:
    cases = [Case("boot", "boot", boot, message=message if boot != "passed" else "")]
    cases.append(Case("runner", "boot", "passed"))
    results = [SuiteResult("boot", cases, {"guest.end": "poweroff"}, seconds=1.0)]
    for name, state in suites.items():
        results.append(SuiteResult(name, [Case("t", name, state)], {"suite": name}, seconds=2.0))
    return RunReport(outcome, results, {"guest.end": "poweroff" if boot == "passed" else "hang"})


def test_one_report_with_the_runs_test_names_the_worst_outcome_and_which_guest(tmp_path: Path) -> None:
    first = _guest(Outcome.PASS, "passed", {"py": "passed", "tracer": "passed"})
    second = _guest(Outcome.BOOT_TIMEOUT, "failed", {"basics": "error"}, "no KCI-INIT: ready")
    merged = merge_guests([first, second], ["basics", "py", "tracer"])
    assert [s.name for s in merged.suites] == ["boot", "basics", "py", "tracer"]
    assert merged.outcome is Outcome.BOOT_TIMEOUT
    boot = merged.suites[0]
    assert [c.name for c in boot.cases] == ["boot", "runner"]  # the names a one-guest run has
    assert boot.cases[0].state == "failed" and boot.cases[0].message == "guest 2: no KCI-INIT: ready"
    assert merged.properties["guests"] == "2" and merged.properties["guest.end"] == "hang"
    back = parse(write_junit(merged, tmp_path / "junit.xml").read_bytes())
    assert sorted((s.name, len(s.cases)) for s in back) == [
        ("basics", 1),
        ("boot", 2),
        ("py", 1),
        ("tracer", 1),
    ]


def test_one_guest_is_its_own_report() -> None:
    only = _guest(Outcome.PASS, "passed", {"py": "passed"})
    assert merge_guests([only], ["py"]) is only


def test_a_guest_that_raises_stops_the_others_and_its_error_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """boot_guests' own bookkeeping (the boots are tests/e2e/test_guests.py): guest 2's run raises, guest
    1's sees the stop (as its console feed would) and ends with GuestsStopped; the run raises guest 2's
    error, not the stop it caused in guest 1."""
    import threading
    from types import SimpleNamespace

    from kernel_ci.flow import test as testflow

    seen_stop = threading.Event()

    def fake_boot(run_dir: Path, *args: object, stop: threading.Event, **kwargs: object) -> RunReport:
        if run_dir.name == "guest-2":
            raise RuntimeError("kernel-ci's own failure in guest 2")
        if not stop.wait(timeout=30):
            raise AssertionError("guest 1 was never told to stop")
        seen_stop.set()
        raise testflow.GuestsStopped("guest 1 stopped")

    monkeypatch.setattr(testflow, "boot_and_collect", fake_boot)
    groups = [[SimpleNamespace(name="a")], [SimpleNamespace(name="b")]]
    record = RunRecord("now", "key", "k", {}, "build", RootfsRef("r", "p"), ("a", "b"), {})
    with pytest.raises(RuntimeError, match="guest 2"):
        testflow.boot_guests(tmp_path, groups, tmp_path, tmp_path, [tmp_path, tmp_path], None, None, record)  # type: ignore[arg-type]
    assert seen_stop.is_set()


def test_suite_times_of_runs_with_an_append_are_kept_apart(tmp_path: Path, monkeypatch) -> None:
    """A bench run (--append kci.bench=1) made the tracer suite take minutes; the next plain run must still
    split by the plain runs' times, and the bench's next run by its own."""
    from kernel_ci.core.paths import cache_dir
    from kernel_ci.flow.test import SUITE_TIMES, TestOptions, _hint_suffix, guest_groups
    from kernel_ci.guest.suites import Suite

    monkeypatch.setenv("KERNEL_CI_CACHE", str(tmp_path / "cache"))
    chosen = [Suite(name, "python", 60, (), (), (), (), "", tmp_path / name) for name in ORDER]
    plain = TestOptions(kernel_dir=tmp_path, output=tmp_path / "out", guests=2)
    bench = TestOptions(kernel_dir=tmp_path, output=tmp_path / "out", guests=2, append="kci.bench=1")
    placement.record_times(cache_dir() / SUITE_TIMES, TIMES)
    placement.record_times(cache_dir() / SUITE_TIMES, {"tracer" + _hint_suffix(bench): 300.0})
    names = [[s.name for s in group] for group in guest_groups(chosen, plain)]
    assert names == placement.split(ORDER, 2, TIMES)  # the plain times: tracer shares its guest
    alone = [[s.name for s in group] for group in guest_groups(chosen, bench)]
    assert ["tracer"] not in names and alone == placement.split(ORDER, 2, {"tracer": 300.0})
