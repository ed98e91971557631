"""A hostile guest's results share, read by the host: every trick a root guest can leave behind.

The guest runs patch authors' tests as root and writes the results share. These tests craft that share
by hand (symlinks to host files, FIFOs, device nodes, sparse giants, bad names, nesting without end,
XML entities) and check that kernel_ci.report.verdict reads none of the host's other files, never blocks,
never reads
more than its caps, and still writes a well-formed JUnit report that says what was refused.
(tests/e2e/test_guest_attacks.py makes the same attacks from inside a real guest.)
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from junit_check import read_back, suite_properties, suite_text

from kernel_ci.core import proc
from kernel_ci.flow import test as testpipeline
from kernel_ci.guest import qemu
from kernel_ci.guest.payload import PYTEST_ARGV, Plan, PlanSuite
from kernel_ci.guest.protocol import EndKind
from kernel_ci.guest.scanner import MAX_FAULTS, MAX_SUITE_SPANS, ConsoleScanner, scan
from kernel_ci.report import guestfiles, ktap
from kernel_ci.report import verdict as results
from kernel_ci.report.junit import write_junit
from kernel_ci.report.model import GuestEnd, Outcome
from kernel_ci.report.verdict import collect

pytestmark = pytest.mark.timeout(60)  # a FIFO read by the old code blocks forever: fail, do not hang

SECRET = "host-secret-9f1c2e: the guest must never see this"
C_SUITE = PlanSuite("hostile-c", "c", 60, (), ("./x",), "suites/hostile-c", False)
PY_SUITE = PlanSuite("hostile-py", "python", 60, (), (*PYTEST_ARGV, "t.py"), "suites/hostile-py", True)
PLAN = Plan("5.10.223-kci", (C_SUITE, PY_SUITE))
KTAP_OK = "KTAP version 1\n1..1\nok 1 fine\n"
PYTEST_OK = (
    '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="1">'
    '<testcase classname="t" name="test_ok" time="0.1"/></testsuite></testsuites>'
)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A host file outside the results share (stands for /etc/shadow, a CI token, ...)."""
    path = tmp_path / "host" / "secret.txt"
    path.parent.mkdir()
    path.write_text(SECRET + "\n")
    return path


def status(name: str, rc: int = 0) -> str:
    return json.dumps({"name": name, "rc": rc, "seconds": 1.0, "timed_out": False, "module_errors": []})


def suite(results_dir: Path, name: str, *, output: str | None = KTAP_OK, junit: str | None = None) -> Path:
    """A suite directory the way the runner leaves it (the attack then replaces parts of it)."""
    directory = results_dir / name
    (directory / "artifacts").mkdir(parents=True, exist_ok=True)
    (directory / "status.json").write_text(status(name))
    if output is not None:
        (directory / "output.txt").write_text(output)
    if junit is not None:
        (directory / "junit.xml").write_text(junit)
    return directory


def console_text() -> str:
    lines = ["Linux version 5.10.223-kci", "KCI-INIT: ready"]
    for planned in PLAN.suites:
        lines += [
            f"KCI-SUITE-START: {planned.name}",
            f"KCI-SUITE-END: {planned.name} rc=0 seconds=1.00 timed_out=0",
        ]
    return "\n".join([*lines, "KCI-RUNNER: done"]) + "\n"


def collect_and_write(tmp_path: Path) -> tuple[results.RunReport, Path, str]:
    """collect + write_junit; the junit text is checked well-formed (read back by junitparser)."""
    report = collect(PLAN, tmp_path / "results", scan(console_text()), GuestEnd("poweroff"))
    junit = write_junit(report, tmp_path / "out" / "junit.xml")
    read_back(junit)
    return report, junit, junit.read_text()


def cases_of(junit: Path) -> dict[tuple[str, str], object]:
    return {(c.suite, c.name): c for c in read_back(junit)}


def good_python_suite(results_dir: Path) -> None:
    suite(results_dir, PY_SUITE.name, output="1 passed\n", junit=PYTEST_OK)


# --- attacks: the guest points the host at its own files --------------------------------------------


def test_output_symlink_to_a_host_file_is_not_followed(tmp_path, secret):
    directory = suite(tmp_path / "results", C_SUITE.name, output=None)
    (directory / "output.txt").symlink_to(secret)
    good_python_suite(tmp_path / "results")
    report, junit, text = collect_and_write(tmp_path)
    assert SECRET not in text
    case = cases_of(junit)[(C_SUITE.name, "results: output.txt")]
    assert case.state == "failed" and "symlink" in case.message
    assert report.outcome is Outcome.TEST_FAILURE


def test_artifact_symlinks_to_host_files_and_dirs_are_not_followed(tmp_path, secret):
    directory = suite(tmp_path / "results", C_SUITE.name)
    (directory / "artifacts" / "leak.txt").symlink_to(secret)
    (directory / "artifacts" / "hostdir").symlink_to(secret.parent, target_is_directory=True)
    (directory / "artifacts" / "real.txt").write_text("a real artifact\n")
    good_python_suite(tmp_path / "results")
    _, junit, text = collect_and_write(tmp_path)
    assert SECRET not in text
    assert str(secret) not in text
    props = suite_properties(junit, C_SUITE.name)
    assert "artifact:real.txt" in props and "artifact:leak.txt" not in props
    assert not any(name.startswith("artifact:hostdir") for name in props)
    assert props["artifacts.rejected"] == "2"
    out = suite_text(junit, C_SUITE.name)
    assert "a real artifact" in out
    assert "artifact leak.txt: a symlink, not read" in out


def test_status_and_junit_symlinks_are_not_followed(tmp_path, secret):
    xml_secret = secret.parent / "host.xml"
    xml_secret.write_text(PYTEST_OK.replace("test_ok", SECRET.replace(":", "")))
    directory = suite(tmp_path / "results", PY_SUITE.name, output="1 passed\n")
    (directory / "junit.xml").symlink_to(xml_secret)
    (directory / "status.json").unlink()
    (directory / "status.json").symlink_to(secret)
    suite(tmp_path / "results", C_SUITE.name)
    _, junit, text = collect_and_write(tmp_path)
    assert SECRET.replace(":", "") not in text and SECRET not in text
    cases = cases_of(junit)
    assert "symlink" in cases[(PY_SUITE.name, "results: status.json")].message
    assert "symlink" in cases[(PY_SUITE.name, "results: junit.xml")].message


def test_a_suite_directory_that_is_a_symlink_is_not_entered(tmp_path, secret):
    (secret.parent / "output.txt").write_text(f"KTAP version 1\n1..1\nok 1 {SECRET.replace(':', '')}\n")
    (secret.parent / "status.json").write_text(status(C_SUITE.name))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / C_SUITE.name).symlink_to(secret.parent, target_is_directory=True)
    good_python_suite(tmp_path / "results")
    _, junit, text = collect_and_write(tmp_path)
    assert SECRET.replace(":", "") not in text
    assert "symlink" in cases_of(junit)[(C_SUITE.name, "results: status.json")].message


def test_junit_entities_are_refused(tmp_path, secret):
    """An external entity would pull a host file into the report; a billion-laughs one its memory."""
    xxe = (
        f'<?xml version="1.0"?><!DOCTYPE t [<!ENTITY x SYSTEM "file://{secret}">]>'
        '<testsuites><testsuite name="p"><testcase classname="t" name="leak">'
        "<failure message='x'>&x;</failure></testcase></testsuite></testsuites>"
    )
    suite(tmp_path / "results", PY_SUITE.name, output="", junit=xxe)
    suite(tmp_path / "results", C_SUITE.name)
    _, junit, text = collect_and_write(tmp_path)
    assert SECRET not in text
    case = cases_of(junit)[(PY_SUITE.name, "results: junit.xml")]
    assert case.state == "failed" and "DOCTYPE" in case.message


# --- faults: files that would block or exhaust the host ---------------------------------------------


def test_output_fifo_does_not_block_the_host(tmp_path):
    directory = suite(tmp_path / "results", C_SUITE.name, output=None)
    os.mkfifo(directory / "output.txt")
    os.mkfifo(directory / "status.json.fifo")
    os.mkfifo(directory / "artifacts" / "pipe")
    good_python_suite(tmp_path / "results")
    _, junit, _ = collect_and_write(tmp_path)
    case = cases_of(junit)[(C_SUITE.name, "results: output.txt")]
    assert case.state == "failed" and "FIFO" in case.message
    assert "artifact pipe: a FIFO, not read" in suite_text(junit, C_SUITE.name)


def test_device_nodes_are_never_opened(tmp_path):
    """A char device (here the same as /dev/zero, 1:5) as output and as an artifact: reading it would
    never end; opening some devices has side effects, so they are not even opened."""
    directory = suite(tmp_path / "results", C_SUITE.name, output=None)
    os.mknod(directory / "output.txt", stat.S_IFCHR | 0o644, os.makedev(1, 5))
    os.mknod(directory / "artifacts" / "zero", stat.S_IFCHR | 0o644, os.makedev(1, 5))
    (directory / "artifacts" / "zero-link").symlink_to("/dev/zero")
    good_python_suite(tmp_path / "results")
    _, junit, _ = collect_and_write(tmp_path)
    assert "character device" in cases_of(junit)[(C_SUITE.name, "results: output.txt")].message
    out = suite_text(junit, C_SUITE.name)
    assert "artifact zero: a character device, not read" in out
    assert "artifact zero-link: a symlink, not read" in out


def test_a_sparse_giant_output_is_read_up_to_the_cap_and_the_cut_is_said(tmp_path):
    directory = suite(tmp_path / "results", C_SUITE.name)
    with (directory / "output.txt").open("r+b") as handle:
        handle.seek(0, os.SEEK_END)
        handle.write(b"# trailing text\n")
        handle.truncate(64 * 2**30)  # 64 GiB, sparse: costs the guest nothing
    good_python_suite(tmp_path / "results")
    _, junit, _ = collect_and_write(tmp_path)
    props = suite_properties(junit, C_SUITE.name)
    assert props["output.truncated"] == f"read {results.OUTPUT_READ_LIMIT} of {64 * 2**30} bytes"
    assert f"output.txt is {64 * 2**30} bytes; only the first {results.OUTPUT_READ_LIMIT} were read" in (
        suite_text(junit, C_SUITE.name)
    )
    assert cases_of(junit)[(C_SUITE.name, "fine")].state == "passed"


def test_giant_status_and_junit_files_are_refused(tmp_path):
    directory = suite(tmp_path / "results", PY_SUITE.name, output="", junit=PYTEST_OK)
    os.truncate(directory / "status.json", results.STATUS_READ_LIMIT + 1)
    os.truncate(directory / "junit.xml", results.JUNIT_READ_LIMIT + 1)
    suite(tmp_path / "results", C_SUITE.name)
    _, junit, _ = collect_and_write(tmp_path)
    cases = cases_of(junit)
    assert "larger than" in cases[(PY_SUITE.name, "results: status.json")].message
    assert "larger than" in cases[(PY_SUITE.name, "results: junit.xml")].message


def test_ktap_nested_thousands_deep_is_a_failed_well_formed_report(tmp_path):
    depth = 5000
    lines = ["KTAP version 1", "1..1"]
    lines += ["  " * level + "KTAP version 1" for level in range(1, depth)]
    lines += ["  " * level + f"ok 1 level{level}" for level in reversed(range(1, depth))]
    lines.append("ok 1 top")
    suite(tmp_path / "results", C_SUITE.name, output="\n".join(lines) + "\n")
    good_python_suite(tmp_path / "results")
    report, junit, _ = collect_and_write(tmp_path)
    case = cases_of(junit)[(C_SUITE.name, "results: KTAP")]
    assert case.state == "failed" and f"deeper than {ktap.MAX_DEPTH} levels" in case.message
    assert report.outcome is Outcome.TEST_FAILURE


def test_ktap_parser_depth_is_bounded():
    text = "KTAP version 1\n" + "".join("  " * n + "KTAP version 1\n" for n in range(1, 3000))
    report = ktap.parse(text)
    assert report.too_deep
    assert any(f"deeper than {ktap.MAX_DEPTH} levels" in error for error in report.errors)
    assert len(list(ktap.flatten(report.tests))) <= ktap.MAX_DEPTH + 1


def test_a_flood_of_test_results_is_capped(tmp_path):
    count = results.MAX_CASES_PER_SUITE * 3
    body = "".join(f"ok {n} t{n}\n" for n in range(1, count + 1))
    suite(tmp_path / "results", C_SUITE.name, output=f"KTAP version 1\n1..{count}\n{body}")
    good_python_suite(tmp_path / "results")
    report, junit, _ = collect_and_write(tmp_path)
    hostile = next(s for s in report.suites if s.name == C_SUITE.name)
    assert len(hostile.cases) == results.MAX_CASES_PER_SUITE + 1
    case = cases_of(junit)[(C_SUITE.name, "results: too many tests")]
    assert case.state == "failed" and str(count) in case.message


# --- bad inputs: names and shapes the host refuses --------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["bell\x07.txt", "new\nline.txt", "esc\x1b[31m.txt", "tab\t.txt", "del\x7f.txt", b"\xff\xfe.bin"],
)
def test_artifact_names_with_control_characters_are_rejected(tmp_path, name):
    directory = suite(tmp_path / "results", C_SUITE.name)
    raw = name if isinstance(name, bytes) else name.encode()
    with open(os.path.join(os.fsencode(directory / "artifacts"), raw), "wb") as handle:
        handle.write(b"text\n")
    good_python_suite(tmp_path / "results")
    _, junit, _ = collect_and_write(tmp_path)
    props = suite_properties(junit, C_SUITE.name)
    assert props["artifacts.rejected"] == "1"
    assert not any(key.startswith("artifact:") for key in props)
    assert "not printable" in suite_text(junit, C_SUITE.name)


def test_valid_name_rules():
    assert guestfiles.invalid_name("ok-name_1.txt") is None
    assert guestfiles.invalid_name("with space.txt") is None
    for bad in ("", ".", "..", "a/b", "x" * 256, "\x00", "a\udcff"):
        assert guestfiles.invalid_name(bad) is not None, bad


def test_artifact_trees_are_bounded_in_depth_and_count(tmp_path):
    directory = suite(tmp_path / "results", C_SUITE.name)
    deep = directory / "artifacts"
    for level in range(guestfiles.MAX_DEPTH + 10):
        deep = deep / f"d{level}"
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_text("too deep\n")
    many = directory / "artifacts" / "many"
    many.mkdir()
    for n in range(results.ARTIFACT_MAX_FILES + 50):
        (many / f"f{n:05}").write_text("")
    good_python_suite(tmp_path / "results")
    _, junit, _ = collect_and_write(tmp_path)
    props = suite_properties(junit, C_SUITE.name)
    listed = [key for key in props if key.startswith("artifact:")]
    assert len(listed) == results.ARTIFACT_MAX_FILES
    assert "too deep" not in suite_text(junit, C_SUITE.name)
    assert f"deeper than {guestfiles.MAX_DEPTH} levels, not entered" in props["artifacts.truncated"]
    assert f"listed {results.ARTIFACT_MAX_FILES} files; many/f01000" in props["artifacts.truncated"]


# --- console ----------------------------------------------------------------------------------------


def test_a_flood_of_kernel_reports_keeps_a_bounded_number_and_the_panic():
    scanner = ConsoleScanner()
    scanner.feed("KCI-INIT: ready")
    for n in range(MAX_FAULTS * 20):
        scanner.feed(f"WARNING: fake report {n}")
    scanner.feed("Kernel panic - not syncing: the real one")
    scanner.finish()
    report = scanner.report()
    assert len(report.faults) <= MAX_FAULTS + 1
    assert report.dropped_faults >= MAX_FAULTS * 19
    assert report.panic is not None and report.panic.title.endswith("the real one")


def test_a_flood_of_suite_markers_is_bounded():
    scanner = ConsoleScanner()
    scanner.feed("KCI-INIT: ready")
    for n in range(MAX_SUITE_SPANS + 5_000):
        scanner.feed(f"KCI-SUITE-END: fake{n} rc=0 seconds=1.00 timed_out=0")
    report = scanner.report()
    assert len(report.suites) <= MAX_SUITE_SPANS
    assert report.dropped_suites == 5_000


FLOOD_LINES = 200_000  # ~30 MB of console, ~40 MB as Python strings: what an unbounded list would keep


@pytest.mark.parametrize("kept", ["bounded", "unbounded"])
def test_a_console_flood_before_the_warm_ready_mark_costs_no_host_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kept: str
) -> None:
    """The kernel is patch code: on a warm start's first boot it may print without end before the runner's
    ready mark. The boot lines kept for the snapshot stop at BOOT_LINES_KEPT and the rest is read and
    dropped, so the host's memory does not follow the flood. A real process floods a real pipe into the
    console reader and the watcher; "unbounded" (the cap lifted) shows the test sees the difference."""
    if kept == "unbounded":
        monkeypatch.setattr(qemu, "BOOT_LINES_KEPT", 10 * FLOOD_LINES)
    run = tmp_path / "run"
    run.mkdir()
    cfg = qemu.QemuConfig(
        tmp_path / "bzImage", run / "o.qcow2", run / "p", run / "r", run, warm=tmp_path / "warm",
        console_limit=1 << 20,
    )  # fmt: skip
    flood = f"import sys\nfor _ in range({FLOOD_LINES}): sys.stdout.buffer.write(b'k' * 150 + b'\\n')"
    guest = proc.spawn([sys.executable, "-c", flood], stdout=proc.PIPE, stderr=proc.PIPE)
    assert guest.stdout is not None
    tracemalloc.start()
    try:
        out = qemu._Console(guest.stdout, cfg.console_log, cfg.console_limit)
        ended = qemu._watch(cfg, ["flood"], guest, time.monotonic(), None, out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ended.end == EndKind.POWEROFF and out.dropped_bytes > 0
    if kept == "bounded":
        assert peak < 12 * 2**20, f"the watcher held {peak / 2**20:.0f} MiB of a {FLOOD_LINES}-line flood"
    else:
        assert peak > 32 * 2**20, "the unbounded variant must show the growth the bound prevents"


def test_the_console_tail_is_read_from_the_end_only(tmp_path):
    """console.log can be as big as its cap (or, for a log from elsewhere, sparse and huge): the report's
    tail must not read it whole."""
    log = tmp_path / "console.log"
    with log.open("wb") as handle:
        handle.truncate(64 * 2**30)
        handle.seek(0, os.SEEK_END)
        handle.write(b"".join(b"line %d\n" % n for n in range(100)))
    tail = testpipeline._tail(log, lines=3)
    assert tail == "line 97\nline 98\nline 99"


def test_a_guest_symlink_under_mapped_xattr_is_still_called_a_symlink(tmp_path):
    """Under mapped-xattr a guest symlink is a host file holding the target path, its real mode in
    user.virtfs.mode: reported as the symlink it is, not read as the suite's output."""
    directory = suite(tmp_path / "results", C_SUITE.name, output=None)
    mapped = directory / "output.txt"
    mapped.write_text("/etc/shadow")
    os.setxattr(mapped, guestfiles.VIRTFS_MODE_XATTR, (stat.S_IFLNK | 0o777).to_bytes(4, "little"))
    good_python_suite(tmp_path / "results")
    _, junit, _ = collect_and_write(tmp_path)
    case = cases_of(junit)[(C_SUITE.name, "results: output.txt")]
    assert "a symlink (as the guest made it)" in case.message


def test_ktap_results_and_errors_kept_are_bounded():
    count = ktap.MAX_TESTS + 5000
    text = "KTAP version 1\n" + "".join(f"ok {n * 2} t\n" for n in range(1, count + 1))  # every number wrong
    report = ktap.parse(text)
    assert len(report.tests) == ktap.MAX_TESTS
    assert len(report.errors) <= ktap.MAX_ERRORS + 1
    assert report.errors[-1].endswith("more parse errors not listed")


def test_a_flooded_console_is_a_failed_case_in_the_boot_suite(tmp_path):
    suite(tmp_path / "results", C_SUITE.name)
    good_python_suite(tmp_path / "results")
    end = GuestEnd("poweroff", console_dropped_bytes=300 * 2**20)
    report = collect(PLAN, tmp_path / "results", scan(console_text()), end)
    junit = write_junit(report, tmp_path / "junit.xml")
    case = cases_of(junit)[("boot", "console")]
    assert case.state == "failed" and str(300 * 2**20) in case.message
    assert report.outcome is Outcome.TEST_FAILURE


def test_an_artifacts_directory_that_is_a_symlink_is_not_entered(tmp_path, secret):
    directory = suite(tmp_path / "results", C_SUITE.name)
    (directory / "artifacts").rmdir()
    (directory / "artifacts").symlink_to(secret.parent, target_is_directory=True)
    good_python_suite(tmp_path / "results")
    _, junit, text = collect_and_write(tmp_path)
    assert SECRET not in text
    assert "artifacts/ is a symlink" in suite_text(junit, C_SUITE.name)
    assert suite_properties(junit, C_SUITE.name)["artifacts.rejected"] == "1"
