"""The console scanner on 5.10-format captures (tests/unit/data/console/*.log)."""

from __future__ import annotations

from pathlib import Path

from kernel_ci.guest.scanner import (
    ConsoleScanner,
    FaultEnded,
    FaultStarted,
    InitReady,
    RunnerDone,
    SuiteEnded,
    SuiteStarted,
    normalize,
    scan,
)

DATA = Path(__file__).parent / "data" / "console"


def read(name: str) -> str:
    return (DATA / name).read_text()


def test_oops_in_suite_is_one_fault_attributed_to_the_suite():
    report = scan(read("oops_in_suite.log"))
    assert report.kernel_release == "5.10.223-kci"
    assert report.init_ready_line == 8
    assert report.boot_seconds == 1.310002
    assert "Run /sbin/kci-init as init process" in report.boot_tail
    (fault,) = report.faults
    assert fault.kind == "oops"
    assert fault.title == "BUG: kernel NULL pointer dereference, address: 0000000000000000"
    assert fault.suite == "smoke-c"
    assert fault.phase == "suite"
    assert fault.complete
    lines = fault.trace.splitlines()
    assert lines[0] == fault.title
    assert "Oops: 0002 [#1] SMP NOPTI" in lines  # the oops header joins the BUG line's report
    assert lines[-1].startswith("---[ end trace 3a2e5f8c1b7d9e04 ]---")
    assert " proc_reg_write+0x51/0x90" in lines
    assert not any(line.startswith("[smoke-c]") for line in lines)
    assert report.faults_in("smoke-c") == [fault]
    assert report.faults_in("smoke-py") == []


def test_suite_markers_and_runner_done():
    report = scan(read("oops_in_suite.log"))
    spans = [(s.name, s.rc, s.seconds, s.timed_out, s.ended) for s in report.suites]
    assert spans == [("smoke-c", 1, 0.31, False, True), ("smoke-py", 0, 1.2, False, True)]
    assert report.runner_done_line is not None
    assert report.running is None
    assert report.panic is None


def test_warn_kasan_ubsan_and_sleeping_bug():
    report = scan(read("warn_kasan_ubsan.log"))
    kinds = [(f.kind, f.suite, f.phase) for f in report.faults]
    assert kinds == [
        ("ubsan", None, "boot"),
        ("warn", "mm", "suite"),
        ("kasan", "mm", "suite"),
        ("bug", "sched", "suite"),
    ]
    ubsan, warn, kasan, sleeping = report.faults
    assert ubsan.title == "UBSAN: shift-out-of-bounds in drivers/misc/kci_boot.c:17:22"
    assert ubsan.trace.splitlines()[-1].startswith("=====")
    assert warn.title.startswith("WARNING: CPU: 0 PID: 230 at mm/page_alloc.c:4935")
    assert "kci_mm_write+0x41/0x80 [kci_smoke]" in warn.trace
    assert "[mm]" not in warn.trace  # test output interleaved in the trace is not part of it
    assert warn.trace.splitlines()[-1].startswith("---[ end trace")
    assert kasan.title.startswith("BUG: KASAN: slab-out-of-bounds in kci_mm_overflow")
    assert "Memory state around the buggy address:" in kasan.trace
    assert "Disabling lock debugging" not in kasan.trace
    # no end marker: the report ends with its call trace, the next kernel line is not part of it
    assert sleeping.trace.splitlines()[-1] == " vfs_write+0xc1/0x260"
    assert "sched test done" not in sleeping.trace


def test_test_output_saying_bug_is_not_a_kernel_bug():
    report = scan(read("warn_kasan_ubsan.log"))
    assert not any("must not count" in f.trace for f in report.faults)


def test_oops_then_panic_in_a_suite_that_never_ended():
    report = scan(read("panic_in_suite.log"))
    bug, panic = report.faults
    assert bug.kind == "bug"
    assert bug.title == "kernel BUG at drivers/misc/kci_smoke.c:61!"
    assert "invalid opcode: 0000 [#1] SMP NOPTI" in bug.trace
    assert panic.kind == "panic"
    assert panic.title == "Kernel panic - not syncing: Fatal exception"
    assert panic.suite == "smoke-c"
    # the panic carries the report that led to it
    assert "kernel BUG at drivers/misc/kci_smoke.c:61!" in panic.trace
    assert panic.trace.splitlines()[-1].startswith("---[ end Kernel panic - not syncing: Fatal exception")
    assert report.panic is panic
    assert report.running is not None and report.running.name == "smoke-c"
    assert report.suite("smoke-c") is not None and not report.suite("smoke-c").ended


def test_sysrq_crash_panic_has_context():
    report = scan(read("sysrq_crash.log"))
    (panic,) = report.faults
    assert panic.kind == "panic"
    assert panic.title == "Kernel panic - not syncing: sysrq triggered crash"
    assert panic.suite == "smoke-py"
    assert "sysrq: Trigger a crash" in panic.trace
    assert "Linux version" not in panic.trace  # context starts at the last marker


def test_panic_during_boot():
    report = scan(read("boot_panic.log"))
    assert report.init_ready_line is None
    (panic,) = report.faults
    assert panic.phase == "boot"
    assert panic.suite is None
    assert "VFS: Cannot open root device" in panic.trace
    assert "Unable to mount root fs" in report.boot_tail


def test_incremental_events():
    scanner = ConsoleScanner()
    events = []
    for line in read("panic_in_suite.log").splitlines():
        events += scanner.feed(line)
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "InitReady",
        "SuiteStarted",
        "FaultStarted",
        "FaultEnded",
        "FaultStarted",
        "FaultEnded",
    ]
    assert isinstance(events[0], InitReady)
    assert isinstance(events[1], SuiteStarted) and events[1].name == "smoke-c"
    started = events[4]
    assert isinstance(started, FaultStarted) and started.kind == "panic" and started.suite == "smoke-c"
    ended = events[5]
    assert isinstance(ended, FaultEnded) and ended.fault.complete
    assert scanner.finish() == []


def test_incremental_suite_end_and_done_events():
    scanner = ConsoleScanner()
    events = []
    for line in read("oops_in_suite.log").splitlines():
        events += scanner.feed(line)
    ends = [e.span for e in events if isinstance(e, SuiteEnded)]
    assert [(s.name, s.rc) for s in ends] == [("smoke-c", 1), ("smoke-py", 0)]
    assert isinstance(events[-1], RunnerDone)


def test_truncated_report_is_kept_incomplete():
    text = read("oops_in_suite.log").splitlines()
    cut = next(i for i, line in enumerate(text) if "Call Trace:" in line)
    scanner = ConsoleScanner()
    for line in text[: cut + 2]:
        scanner.feed(line)
    assert len(scanner.report().faults) == 1  # visible while still open
    (ended,) = scanner.finish()
    assert isinstance(ended, FaultEnded)
    assert not ended.fault.complete
    assert ended.fault.trace.splitlines()[-1] == " proc_reg_write+0x51/0x90"


def test_report_limit_stops_a_runaway_trace():
    scanner = ConsoleScanner()
    scanner.feed("[    1.0] WARNING: CPU: 0 PID: 1 at kernel/foo.c:1 foo+0x1/0x2")
    for i in range(1000):
        scanner.feed(f"[    1.1]  frame_{i}+0x1/0x2")
    scanner.finish()
    (fault,) = scanner.report().faults
    assert not fault.complete
    assert len(fault.trace.splitlines()) <= 400


def test_crlf_ansi_and_printk_caller_prefix():
    assert normalize("[    1.234567] hello\r\n") == (1.234567, "hello")
    assert normalize("[    2.000000][    T1] BUG: x") == (2.0, "BUG: x")
    assert normalize("\x1b[0mKCI-INIT: ready") == (None, "KCI-INIT: ready")


def test_markers_from_suite_output_are_ignored():
    text = "KCI-INIT: ready\nKCI-SUITE-START: a\n[a] KCI-SUITE-END: a rc=0 seconds=1 timed_out=0\n"
    report = scan(text)
    assert report.running is not None and report.running.name == "a"


def test_suite_end_with_timeout_and_not_run():
    text = (
        "KCI-INIT: ready\nKCI-SUITE-START: slow\nKCI-SUITE-END: slow rc=-9 seconds=60.02 timed_out=1\n"
        "KCI-SUITE-START: mods\nKCI-SUITE-END: mods rc=none seconds=0.01 timed_out=0\n"
    )
    slow, mods = scan(text).suites
    assert (slow.rc, slow.seconds, slow.timed_out) == (-9, 60.02, True)
    assert (mods.rc, mods.timed_out) == (None, False)
