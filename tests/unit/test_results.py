"""Each way a run can end becomes the right JUnit shape and outcome; the file is read back by junitparser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from junit_check import read_back, suite_properties, suite_text
from rich.console import Console

from kernel_ci.core import proc
from kernel_ci.guest.payload import PYTEST_ARGV, Plan, PlanSuite
from kernel_ci.guest.scanner import scan
from kernel_ci.report.junit import write_junit
from kernel_ci.report.model import GuestEnd, Outcome, worst
from kernel_ci.report.render import render_report, render_summary
from kernel_ci.report.verdict import collect

DATA = Path(__file__).parent / "data" / "console"
PLAN = Plan(
    "5.10.223-kci",
    (
        PlanSuite("smoke-c", "c", 60, ("modules/kci_smoke.ko",), ("./smoke-c",), "suites/smoke-c", False),
        PlanSuite("smoke-py", "python", 120, (), (*PYTEST_ARGV, "test_smoke.py"), "suites/smoke-py", True),
    ),
)
PROPS = {"kernel.version": "5.10.223", "build.key": "abc123", "accelerator": "tcg", "patches": "ci-smoke"}

KTAP_PASS = """\
KTAP version 1
1..2
    KTAP version 1
    # Subtest: uname_release
    ok 1 release_matches
ok 1 uname_release # time=0.001s
    KTAP version 1
    # Subtest: proc_ci_smoke
    ok 1 exists
    not ok 2 content # TODO the patch prints a different text
    ok 3 later # SKIP not on this arch
ok 2 proc_ci_smoke # time=0.002s
# Totals: pass:2 fail:0 skip:0
"""

PYTEST_SUITE = """\
import pytest

def test_passes():
    print("hello from the test")

def test_fails():
    assert 1 + 1 == 3, "arithmetic is broken"

@pytest.mark.skip(reason="not today")
def test_skipped():
    pass
"""


@pytest.fixture(scope="module")
def pytest_junit(tmp_path_factory) -> Path:
    """A junit.xml written by a real pytest run (the same flags the guest uses)."""
    where = tmp_path_factory.mktemp("pytest-run")
    (where / "test_smoke.py").write_text(PYTEST_SUITE)
    junit = where / "junit.xml"
    argv = [a.replace("$KCI_JUNIT", str(junit)) for a in PYTEST_ARGV] + ["test_smoke.py"]
    result = proc.run(argv, cwd=where, quiet=True, check=False)
    assert result.returncode == 1, result.output
    return junit


def suite_dir(results: Path, name: str, *, output: str | None = None, status: dict | None = None) -> Path:
    directory = results / name
    (directory / "artifacts").mkdir(parents=True, exist_ok=True)
    if output is not None:
        (directory / "output.txt").write_text(output)
    if status is not None:
        (directory / "status.json").write_text(json.dumps(status))
    return directory


def status(name: str, rc: int | None = 0, timed_out: bool = False, errors: tuple[str, ...] = ()) -> dict:
    return {"name": name, "rc": rc, "seconds": 1.5, "timed_out": timed_out, "module_errors": list(errors)}


def console(*lines: str, ready: bool = True, done: bool = True) -> str:
    head = [
        "[    0.000000] Linux version 5.10.223-kci (kci@builder) #1 SMP",
        "[    1.250000] Run /sbin/kci-init",
    ]
    body = (["KCI-INIT: ready"] if ready else []) + list(lines) + (["KCI-RUNNER: done"] if done else [])
    return "\n".join(head + body) + "\n"


def start_end(name: str, rc: int | str = 0, timed_out: int = 0) -> list[str]:
    return [f"KCI-SUITE-START: {name}", f"KCI-SUITE-END: {name} rc={rc} seconds=1.50 timed_out={timed_out}"]


def run(tmp_path: Path, console_text: str, end: GuestEnd, plan: Plan = PLAN):
    report = collect(plan, tmp_path / "results", scan(console_text), end, PROPS)
    junit = write_junit(report, tmp_path / "out" / "junit.xml")
    cases = {(c.suite, c.name): c for c in read_back(junit)}
    return report, junit, cases


def passing_results(tmp_path: Path, pytest_junit: Path | None = None) -> None:
    results = tmp_path / "results"
    suite_dir(results, "smoke-c", output=KTAP_PASS, status=status("smoke-c"))
    py = suite_dir(results, "smoke-py", output="..\n2 passed in 0.1s\n", status=status("smoke-py"))
    (py / "artifacts" / "hello.txt").write_text("hello from smoke-py on 5.10.223-kci\n")
    if pytest_junit is not None:
        (py / "junit.xml").write_bytes(pytest_junit.read_bytes())


def test_outcome_codes_and_severity():
    assert [o.value for o in Outcome] == [0, 1, 3, 4, 5, 6, 7]
    assert worst([]) is Outcome.PASS
    assert worst([Outcome.TEST_FAILURE, Outcome.KERNEL_OOPS]) is Outcome.KERNEL_OOPS
    assert worst([Outcome.KERNEL_OOPS, Outcome.BOOT_TIMEOUT]) is Outcome.BOOT_TIMEOUT
    assert worst([Outcome.BOOT_TIMEOUT, Outcome.GUEST_HANG]) is Outcome.GUEST_HANG
    assert worst([Outcome.GUEST_HANG, Outcome.KERNEL_PANIC]) is Outcome.KERNEL_PANIC
    assert worst([Outcome.KERNEL_PANIC, Outcome.INFRA_FAILURE, Outcome.PASS]) is Outcome.INFRA_FAILURE


def test_c_and_python_suites_merge(tmp_path, pytest_junit):
    passing_results(tmp_path, pytest_junit)
    text = console(*start_end("smoke-c"), *start_end("smoke-py", rc=1))
    report, junit, cases = run(tmp_path, text, GuestEnd("poweroff"))
    assert report.outcome is Outcome.TEST_FAILURE
    assert cases[("boot", "boot")].state == "passed"
    assert cases[("boot", "runner")].state == "passed"
    assert cases[("smoke-c", "uname_release.release_matches")].state == "passed"
    todo = cases[("smoke-c", "proc_ci_smoke.content")]
    assert (todo.state, todo.message) == ("skipped", "TODO: the patch prints a different text")
    assert cases[("smoke-c", "proc_ci_smoke.later")].message == "not on this arch"
    failed = cases[("smoke-py", "test_fails")]
    assert failed.state == "failed"
    assert "arithmetic is broken" in failed.message + failed.text
    assert failed.classname == "smoke-py.test_smoke"
    assert cases[("smoke-py", "test_skipped")].state == "skipped"
    passed = cases[("smoke-py", "test_passes")]
    assert passed.state == "passed" and "hello from the test" in passed.system_out
    props = suite_properties(junit, "smoke-py")
    assert props["kernel.version"] == "5.10.223" and props["build.key"] == "abc123"
    assert props["artifact:hello.txt"].endswith("smoke-py/artifacts/hello.txt")
    assert "hello from smoke-py on 5.10.223-kci" in suite_text(junit, "smoke-py")
    assert suite_properties(junit, "boot")["boot.seconds"] == "1.250"


def test_everything_passing_is_pass(tmp_path):
    results = tmp_path / "results"
    suite_dir(results, "smoke-c", output=KTAP_PASS, status=status("smoke-c"))
    plan = Plan("5.10.223-kci", PLAN.suites[:1])
    report, _, cases = run(tmp_path, console(*start_end("smoke-c")), GuestEnd("poweroff"), plan)
    assert report.outcome is Outcome.PASS
    assert {c.state for c in cases.values()} == {"passed", "skipped"}
    assert report.count("failed") == report.count("error") == 0
    assert report.count("passed") == 4  # boot, runner, release_matches, exists


def test_oops_during_a_suite_is_a_failed_case_with_the_trace(tmp_path, pytest_junit):
    passing_results(tmp_path, pytest_junit)
    report, _, cases = run(tmp_path, (DATA / "oops_in_suite.log").read_text(), GuestEnd("poweroff"))
    assert report.outcome is Outcome.KERNEL_OOPS
    oops = cases[("smoke-c", "kernel: BUG: kernel NULL pointer dereference, address: 0000000000000000")]
    assert oops.state == "failed"
    assert "Call Trace:" in oops.text and "---[ end trace" in oops.text
    assert not any(name.startswith("kernel:") for suite, name in cases if suite == "smoke-py")


def test_oops_before_init_goes_to_the_boot_suite(tmp_path):
    suite_dir(tmp_path / "results", "smoke-c", output=KTAP_PASS, status=status("smoke-c"))
    plan = Plan("5.10.223-kci", PLAN.suites[:1])
    text = (DATA / "warn_kasan_ubsan.log").read_text().split("KCI-INIT: ready")[0]
    text += "KCI-INIT: ready\n" + "\n".join(start_end("smoke-c")) + "\nKCI-RUNNER: done\n"
    report, _, cases = run(tmp_path, text, GuestEnd("poweroff"), plan)
    assert report.outcome is Outcome.KERNEL_OOPS
    ubsan = cases[("boot", "kernel: UBSAN: shift-out-of-bounds in drivers/misc/kci_boot.c:17:22")]
    assert ubsan.state == "failed" and "ubsan_epilogue" in ubsan.text


def test_panic_mid_suite(tmp_path):
    partial = "KTAP version 1\n1..3\nok 1 first\n    KTAP version 1\n    # Subtest: crash\n    ok 1 armed\n"
    suite_dir(tmp_path / "results", "smoke-c", output=partial)
    report, _, cases = run(tmp_path, (DATA / "panic_in_suite.log").read_text(), GuestEnd("poweroff"))
    assert report.outcome is Outcome.KERNEL_PANIC
    assert cases[("smoke-c", "first")].state == "passed"
    assert cases[("smoke-c", "crash.armed")].state == "passed"
    running = cases[("smoke-c", "crash")]
    assert running.state == "error"
    assert running.message == "interrupted: the kernel panicked: Kernel panic - not syncing: Fatal exception"
    assert cases[("smoke-c", "test 3")].state == "skipped"
    assert cases[("smoke-c", "test 3")].message == "not run: the kernel panicked"
    panic = cases[("smoke-c", "kernel: panic")]
    assert panic.state == "error" and "kernel BUG at drivers/misc/kci_smoke.c:61!" in panic.text
    assert cases[("smoke-c", "kernel: kernel BUG at drivers/misc/kci_smoke.c:61!")].state == "failed"
    never = cases[("smoke-py", "smoke-py")]
    assert (never.state, never.message) == ("skipped", "not run: the kernel panicked")
    assert cases[("boot", "runner")].state == "skipped"


def test_hang_carries_console_tail_and_sysrq_dump(tmp_path):
    suite_dir(tmp_path / "results", "smoke-c", output="KTAP version 1\n1..2\nok 1 first\n")
    end = GuestEnd(
        "hang",
        detail="no console output for 120 s",
        console_tail="[smoke-c] ok 1 first",
        sysrq_dump="sysrq: Show Blocked State\ntask:smoke-c state:D stack:0 pid:230",
    )
    text = console("KCI-SUITE-START: smoke-c", "[smoke-c] KTAP version 1", "[smoke-c] ok 1 first", done=False)
    report, _, cases = run(tmp_path, text, end)
    assert report.outcome is Outcome.GUEST_HANG
    hang = cases[("smoke-c", "guest: hang")]
    assert hang.state == "error"
    assert "task:smoke-c state:D" in hang.text and "[smoke-c] ok 1 first" in hang.text
    running = cases[("smoke-c", "test 2")]
    assert running.state == "error" and running.message.startswith("interrupted: the guest hung")
    assert cases[("smoke-py", "smoke-py")].message == "not run: the guest hung"


def test_boot_timeout(tmp_path):
    text = console(ready=False, done=False)
    report, _, cases = run(
        tmp_path, text, GuestEnd("boot_timeout", "no KCI-INIT: ready in 120 s", "Run /sbin/kci-init")
    )
    assert report.outcome is Outcome.BOOT_TIMEOUT
    boot = cases[("boot", "boot")]
    assert boot.state == "failed" and "Run /sbin/kci-init" in boot.text
    assert cases[("smoke-c", "smoke-c")].message == "not run: boot timed out"


def test_panic_before_init(tmp_path):
    report, _, cases = run(tmp_path, (DATA / "boot_panic.log").read_text(), GuestEnd("poweroff"))
    assert report.outcome is Outcome.KERNEL_PANIC
    assert cases[("boot", "boot")].state == "failed"
    assert "Unable to mount root fs" in cases[("boot", "boot")].message
    assert cases[("boot", "kernel: panic")].state == "error"
    assert ("boot", "runner") not in cases


def test_qemu_failed_is_infra(tmp_path):
    report, _, cases = run(tmp_path, "", GuestEnd("qemu_failed", "qemu-system-x86_64: -virtfs: no such file"))
    assert report.outcome is Outcome.INFRA_FAILURE
    assert cases[("boot", "boot")].state == "error"
    assert "-virtfs" in cases[("boot", "boot")].message


def test_runner_failed_is_infra(tmp_path):
    text = console("KCI-INIT: runner failed rc=2", done=False)
    report, _, cases = run(tmp_path, text, GuestEnd("poweroff"))
    assert report.outcome is Outcome.INFRA_FAILURE
    assert cases[("boot", "runner")].state == "error"
    assert cases[("smoke-c", "smoke-c")].message == "not run: the runner failed"


def test_c_suite_timeout(tmp_path):
    partial = "KTAP version 1\n1..3\nok 1 first\n# waiting for the device\n"
    suite_dir(
        tmp_path / "results", "smoke-c", output=partial, status=status("smoke-c", rc=-9, timed_out=True)
    )
    plan = Plan("5.10.223-kci", PLAN.suites[:1])
    report, _, cases = run(
        tmp_path, console(*start_end("smoke-c", rc=-9, timed_out=1)), GuestEnd("poweroff"), plan
    )
    assert report.outcome is Outcome.TEST_FAILURE
    running = cases[("smoke-c", "test 2")]
    assert (running.state, running.message) == ("error", "suite timed out after 60s")
    assert "# waiting for the device" in running.text
    assert (cases[("smoke-c", "test 3")].state, cases[("smoke-c", "test 3")].message) == (
        "skipped",
        "not run: suite timed out",
    )


def test_module_load_failure(tmp_path):
    error = "insmod /kci/modules/kci_smoke.ko: exit status 1: Invalid module format"
    suite_dir(tmp_path / "results", "smoke-c", status=status("smoke-c", rc=None, errors=(error,)))
    plan = Plan("5.10.223-kci", PLAN.suites[:1])
    report, _, cases = run(tmp_path, console(*start_end("smoke-c", rc="none")), GuestEnd("poweroff"), plan)
    assert report.outcome is Outcome.TEST_FAILURE
    modules = cases[("smoke-c", "modules")]
    assert modules.state == "error" and "Invalid module format" in modules.text
    assert len([c for c in cases if c[0] == "smoke-c"]) == 1


def test_missing_and_malformed_result_files(tmp_path):
    results = tmp_path / "results"
    suite_dir(results, "smoke-c", output=KTAP_PASS)  # no status.json although the suite ended
    py = suite_dir(results, "smoke-py", output="", status=status("smoke-py", rc=1))
    (py / "junit.xml").write_text("<testsuites><testsuite name='x'><testcase")
    text = console(*start_end("smoke-c"), *start_end("smoke-py", rc=1))
    report, _, cases = run(tmp_path, text, GuestEnd("poweroff"))
    assert report.outcome is Outcome.TEST_FAILURE
    assert cases[("smoke-c", "results: status.json")].state == "failed"
    assert "malformed" in cases[("smoke-py", "results: junit.xml")].message


def test_malformed_status_json(tmp_path):
    directory = suite_dir(tmp_path / "results", "smoke-c", output=KTAP_PASS)
    (directory / "status.json").write_text("{not json")
    plan = Plan("5.10.223-kci", PLAN.suites[:1])
    _, _, cases = run(tmp_path, console(*start_end("smoke-c")), GuestEnd("poweroff"), plan)
    assert "status.json is malformed" in cases[("smoke-c", "results: status.json")].message


def test_c_suite_without_ktap(tmp_path):
    output = "smoke-c: error while loading shared libraries\n"
    suite_dir(tmp_path / "results", "smoke-c", output=output, status=status("smoke-c", rc=127))
    plan = Plan("5.10.223-kci", PLAN.suites[:1])
    report, _, cases = run(tmp_path, console(*start_end("smoke-c", rc=127)), GuestEnd("poweroff"), plan)
    assert report.outcome is Outcome.TEST_FAILURE
    case = cases[("smoke-c", "smoke-c")]
    assert case.state == "failed" and case.message == "no KTAP output (exit status 127)"
    assert "shared libraries" in case.text


def test_missing_planned_tests_and_crash_exit_status(tmp_path):
    output = "KTAP version 1\n1..3\nok 1 a\nok 2 b\n"
    suite_dir(tmp_path / "results", "smoke-c", output=output, status=status("smoke-c", rc=-11))
    plan = Plan("5.10.223-kci", PLAN.suites[:1])
    _, junit, cases = run(tmp_path, console(*start_end("smoke-c", rc=-11)), GuestEnd("poweroff"), plan)
    assert cases[("smoke-c", "test 3")].state == "error"
    assert "plan announced 3 tests" in cases[("smoke-c", "test 3")].message
    assert "KTAP: top level: plan 1..3 but 2 results" in suite_text(junit, "smoke-c", "system-err")


def test_bad_exit_status_with_all_results_passing(tmp_path):
    output = "KTAP version 1\n1..1\nok 1 a\n"
    suite_dir(tmp_path / "results", "smoke-c", output=output, status=status("smoke-c", rc=-11))
    plan = Plan("5.10.223-kci", PLAN.suites[:1])
    _, _, cases = run(tmp_path, console(*start_end("smoke-c", rc=-11)), GuestEnd("poweroff"), plan)
    assert (
        cases[("smoke-c", "exit status")].message
        == "exit status -11 (killed by SIGSEGV) although every KTAP result passed"
    )


def test_python_suite_without_junit(tmp_path):
    suite_dir(
        tmp_path / "results", "smoke-py", output="ImportError: no pytest\n", status=status("smoke-py", rc=1)
    )
    plan = Plan("5.10.223-kci", PLAN.suites[1:])
    _, _, cases = run(tmp_path, console(*start_end("smoke-py", rc=1)), GuestEnd("poweroff"), plan)
    case = cases[("smoke-py", "smoke-py")]
    assert (
        case.state == "failed" and "pytest wrote no junit.xml" in case.message and "ImportError" in case.text
    )


def test_summary_table_and_failing_output_first(tmp_path, pytest_junit):
    passing_results(tmp_path, pytest_junit)
    text = (DATA / "oops_in_suite.log").read_text()
    report, _, _ = run(tmp_path, text, GuestEnd("poweroff"))
    screen = Console(record=True, width=140, force_terminal=False)
    screen.print(render_summary(report))
    table = screen.export_text()
    assert "KERNEL_OOPS (exit 3)" in table
    rows = [line for line in table.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == ["smoke-c", "smoke-py", "boot", "total"]
    smoke_py = next(row for row in rows if "smoke-py" in row)
    assert [cell.strip() for cell in smoke_py.split("│")[2:6]] == ["1", "0", "1", "1"]
    screen = Console(record=True, width=140, force_terminal=False)
    screen.print(render_report(report))
    full = screen.export_text()
    assert full.index("FAILED smoke-c :: kernel: BUG") < full.index("FAILED smoke-py :: test_fails")
    assert "arithmetic is broken" in full
    assert [row.name for row in report.rows] == ["boot", "smoke-c", "smoke-py"]


def test_runner_crash_between_suites_is_infra_not_pass(tmp_path):
    suite_dir(tmp_path / "results", "smoke-c", output=KTAP_PASS, status=status("smoke-c"))
    text = console(*start_end("smoke-c"), "KCI-RUNNER: crashed: KeyError('argv')", done=False)
    report, _, cases = run(tmp_path, text, GuestEnd("poweroff"))
    assert report.outcome is Outcome.INFRA_FAILURE
    runner = cases[("boot", "runner")]
    assert runner.state == "error" and "the runner crashed: KeyError('argv')" in runner.message
    assert cases[("smoke-py", "smoke-py")].message == "not run: the runner crashed"


def test_silent_reset_between_suites(tmp_path):
    suite_dir(tmp_path / "results", "smoke-c", output=KTAP_PASS, status=status("smoke-c"))
    report, _, cases = run(tmp_path, console(*start_end("smoke-c"), done=False), GuestEnd("poweroff"))
    assert report.outcome is Outcome.KERNEL_PANIC
    assert cases[("boot", "runner")].state == "error"
    assert "reset or powered off" in cases[("boot", "runner")].message


def test_no_power_off_after_the_runner_finished(tmp_path):
    suite_dir(tmp_path / "results", "smoke-c", output=KTAP_PASS, status=status("smoke-c"))
    plan = Plan("5.10.223-kci", PLAN.suites[:1])
    end = GuestEnd("timeout", "global limit 1800 s", "KCI-RUNNER: done", "")
    report, _, cases = run(tmp_path, console(*start_end("smoke-c")), end, plan)
    assert report.outcome is Outcome.GUEST_HANG
    stuck = cases[("boot", "guest: timeout")]
    assert stuck.state == "error" and "did not power off" in stuck.message
    assert cases[("smoke-c", "uname_release.release_matches")].state == "passed"
