"""kselftest suites: the manifest language, expected failures, the payload and plan, the report, and the
build helper's pieces that run without Docker (make command line, static-ELF check)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from junit_check import read_back

from kernel_ci.build import kbuild as builder
from kernel_ci.build import kselftest
from kernel_ci.build.plan import suite_needs
from kernel_ci.core import proc
from kernel_ci.core.paths import GUEST_TESTS, SUITE_PATH
from kernel_ci.guest.payload import KSELFTEST_ARGV, PayloadError, Plan, PlanSuite, assemble_payload, read_plan
from kernel_ci.guest.scanner import scan
from kernel_ci.guest.suites import ExpectedFailure, ManifestError, load_suite, load_suites
from kernel_ci.report.junit import write_junit
from kernel_ci.report.model import GuestEnd, Outcome
from kernel_ci.report.verdict import collect

KSELFTEST = 'name = "{name}"\nlanguage = "kselftest"\ntimeout = 60\ntargets = ["ptrace"]\n'
XFAIL = '[[xfail]]\ntest = "ptrace:vmaccess"\ncase = "global.attach"\nkernels = ["5.10"]\nreason = "no fix"\n'


def make_suite(root: Path, name: str, manifest: str, files: dict[str, str] | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "manifest.toml").write_text(manifest)
    for file, text in (files or {}).items():
        (folder / file).write_text(text)
    return folder


# --- manifests ---------------------------------------------------------------------------------------


def test_a_kselftest_suite_loads_with_its_expected_failures(tmp_path):
    make_suite(tmp_path, "k", KSELFTEST.format(name="k"), {"expected-failures.toml": XFAIL})
    (suite,) = load_suites(tmp_path)
    assert (suite.language, suite.targets, suite.sources) == ("kselftest", ("ptrace",), ())
    (xfail,) = suite.expected_failures
    assert xfail == ExpectedFailure("ptrace", "vmaccess", "global.attach", "no fix", ("5.10",))
    assert xfail.testcase == "selftests: ptrace: vmaccess.global.attach"


def test_an_expected_failure_timeout_reaches_the_plan_for_its_kernels_only(tmp_path):
    make_suite(tmp_path, "k", KSELFTEST.format(name="k"), {"expected-failures.toml": XFAIL + "timeout = 4\n"})
    (suite,) = load_suites(tmp_path)
    assert suite.expected_failures[0].timeout == 4.0
    selftests = tmp_path / "kselftest-install"
    (selftests / "kselftest").mkdir(parents=True)
    (selftests / "ptrace").mkdir()
    (selftests / "run_kselftest.sh").write_text("#!/bin/sh\n")
    (selftests / "kselftest-list.txt").write_text("ptrace:vmaccess\n")
    for release, expected in (("5.10.223-kci", (("vmaccess", "global.attach", 4.0),)), ("6.1.1", ())):
        dest = tmp_path / release
        assemble_payload([suite], dest, release, lambda *a: None, {}, kselftest_dir=selftests)
        (planned,) = read_plan(dest / "plan.json").suites
        assert planned.case_timeouts == expected


def test_expected_failures_apply_to_the_listed_kernels_only():
    xfail = ExpectedFailure("ptrace", "vmaccess", "", "why", ("5.10",))
    assert xfail.testcase == "selftests: ptrace: vmaccess"
    assert xfail.applies_to("5.10.223-kci") and xfail.applies_to("5.10") and xfail.applies_to("5.10-rc1")
    assert not xfail.applies_to("5.100.1") and not xfail.applies_to("6.1.176-kci")
    assert ExpectedFailure("ptrace", "vmaccess", "", "why").applies_to("6.1.176-kci")


@pytest.mark.parametrize(
    ("manifest", "xfail", "message"),
    [
        (KSELFTEST.format(name="x").replace('targets = ["ptrace"]\n', ""), None, "needs targets"),
        (KSELFTEST.format(name="x") + 'sources = ["t.c"]\n', None, "has no sources"),
        (KSELFTEST.format(name="x").replace('"ptrace"', '"../net"'), None, "target '../net' is not"),
        (KSELFTEST.format(name="x").replace('"ptrace"', '"/etc"'), None, "target '/etc' is not"),
        (
            'name = "x"\nlanguage = "c"\ntimeout = 5\nsources = ["t.c"]\ntargets = ["ptrace"]\n',
            None,
            "only for",
        ),
        (KSELFTEST.format(name="x"), XFAIL.replace('reason = "no fix"', 'reason = " "'), "needs its reason"),
        (KSELFTEST.format(name="x"), XFAIL.replace("ptrace:vmaccess", "vmaccess"), "collection:binary"),
        (
            KSELFTEST.format(name="x"),
            XFAIL.replace("ptrace:vmaccess", "net:vmaccess"),
            "not one of the suite",
        ),
        (KSELFTEST.format(name="x"), XFAIL + "bug = 1\n", "unknown key.*bug"),
        (KSELFTEST.format(name="x"), XFAIL.replace('["5.10"]', '"5.10"'), "kernels must be a list"),
        (KSELFTEST.format(name="x"), "[xfail]\ntest = 1\n", "array of tables"),
        (
            KSELFTEST.format(name="x"),
            XFAIL.replace('case = "global.attach"\n', "") + "timeout = 5\n",
            "needs a case",
        ),
        (KSELFTEST.format(name="x"), XFAIL + "timeout = 30\n", "between 0 and 30"),
        (KSELFTEST.format(name="x"), XFAIL + "timeout = 0\n", "between 0 and 30"),
        (KSELFTEST.format(name="x"), XFAIL + 'timeout = "5"\n', "between 0 and 30"),
        (KSELFTEST.format(name="x"), XFAIL + "timeout = true\n", "between 0 and 30"),
        (KSELFTEST.format(name="x"), "xfail = [", "not valid TOML"),
    ],
)
def test_bad_kselftest_manifests_are_clear_errors(tmp_path, manifest, xfail, message):
    files = {"t.c": "int main(void) { return 0; }\n"}
    if xfail is not None:
        files["expected-failures.toml"] = xfail
    make_suite(tmp_path, "x", manifest, files)
    with pytest.raises(ManifestError, match=message) as caught:
        load_suites(tmp_path)
    assert "x/" in str(caught.value)


def test_expected_failures_belong_to_kselftest_suites_only(tmp_path):
    manifest = 'name = "c"\nlanguage = "c"\ntimeout = 5\nsources = ["t.c"]\n'
    make_suite(
        tmp_path, "c", manifest, {"t.c": "int main(void) { return 0; }\n", "expected-failures.toml": ""}
    )
    with pytest.raises(ManifestError, match="only kselftest suites have expected failures"):
        load_suites(tmp_path)


def test_the_shipped_ptrace_selftests_suite():
    suite = load_suite(GUEST_TESTS / "kselftest-ptrace")
    assert suite.language == "kselftest" and suite.targets == ("ptrace",)
    assert "CONFIG_POSIX_TIMERS=y" in suite.kconfig  # kselftest_harness's alarm(), the runner's timeout(1)
    assert {x.testcase for x in suite.expected_failures} == {"selftests: ptrace: vmaccess.global.attach"}
    assert all(x.reason for x in suite.expected_failures)
    # the hang is cut short, but long enough that a fixed kernel (the case ends in ~2 s) passes it
    assert [x.timeout for x in suite.expected_failures] == [5.0]
    assert suite_needs(SUITE_PATH, None).kselftests == ("ptrace",)
    chosen = ["smoke-c", "kselftest-ptrace", "ptrace-basics"]
    assert suite_needs(SUITE_PATH, chosen).kselftests == ("ptrace",)
    assert suite_needs(SUITE_PATH, ["smoke-c"]).kselftests == ()


# --- payload and plan --------------------------------------------------------------------------------


def fake_install(root: Path) -> Path:
    """What `make install` of the selftests leaves (the build stage's job): runner, list, binaries."""
    install = root / "kselftest"
    (install / "kselftest").mkdir(parents=True)
    (install / "kselftest" / "runner.sh").write_text("# runner\n")
    (install / "run_kselftest.sh").write_text("#!/bin/sh\n")
    for target, tests in {"ptrace": ["get_syscall_info", "vmaccess"], "timers": ["nanosleep"]}.items():
        (install / target).mkdir()
        for test in tests:
            (install / target / test).write_bytes(b"\x7fELF")
    (install / "kselftest-list.txt").write_text("ptrace:get_syscall_info\nptrace:vmaccess\ntimers:nanosleep")
    return install


def test_payload_ships_the_suites_targets_and_runner(tmp_path):
    make_suite(tmp_path / "suites", "k", KSELFTEST.format(name="k"), {"expected-failures.toml": XFAIL})
    suites = load_suites(tmp_path / "suites")
    install = fake_install(tmp_path)
    dest = tmp_path / "payload"
    assemble_payload(suites, dest, "5.10.223-kci", None, {}, kselftest_dir=install)  # type: ignore[arg-type]
    folder = dest / "suites" / "k"
    assert (folder / "ptrace" / "vmaccess").is_file() and not (folder / "timers").exists()
    assert (folder / "kselftest-list.txt").read_text() == "ptrace:get_syscall_info\nptrace:vmaccess\n"
    assert (folder / "run_kselftest.sh").is_file() and (folder / "kselftest" / "runner.sh").is_file()
    wrapper = (folder / "kci-kselftest.sh").read_text()
    assert "ln -sfn /proc/self/fd/1 /dev/stdout" in wrapper and "exec sh ./run_kselftest.sh" in wrapper
    (planned,) = read_plan(dest / "plan.json").suites
    assert (planned.language, planned.argv, planned.junit) == ("kselftest", KSELFTEST_ARGV, False)
    assert planned.expected_failures == (("selftests: ptrace: vmaccess.global.attach", "no fix"),)
    assert planned.case_timeouts == ()  # no timeout in this list: the harness's own 30 s

    other = tmp_path / "payload-6.1"
    assemble_payload(suites, other, "6.1.176-kci", None, {}, kselftest_dir=install)  # type: ignore[arg-type]
    (planned,) = read_plan(other / "plan.json").suites
    assert planned.expected_failures == ()  # listed for 5.10 only
    assert "expected_failures" not in json.loads((other / "plan.json").read_text())["suites"][0]


def test_payload_without_the_builds_selftests_says_how_to_get_them(tmp_path):
    make_suite(tmp_path / "suites", "k", KSELFTEST.format(name="k"))
    suites = load_suites(tmp_path / "suites")
    with pytest.raises(PayloadError, match=r"no kselftests.*kernel-ci build --suite k"):
        assemble_payload(suites, tmp_path / "p1", "5.10.223-kci", None, {})  # type: ignore[arg-type]
    install = fake_install(tmp_path)
    shutil.rmtree(install / "ptrace")
    with pytest.raises(PayloadError, match="no kselftest target ptrace"):
        assemble_payload(suites, tmp_path / "p2", "5.10", None, {}, kselftest_dir=install)  # type: ignore[arg-type]


# --- the report --------------------------------------------------------------------------------------

RUNNER_OUTPUT = """\
TAP version 13
1..3
# selftests: ptrace: get_syscall_info
# TAP version 13
# 1..1
# # Starting 1 tests from 1 test cases.
# #  RUN           global.get_syscall_info ...
# #            OK  global.get_syscall_info
# ok 1 global.get_syscall_info
# # PASSED: 1 / 1 tests passed.
ok 1 selftests: ptrace: get_syscall_info
# selftests: ptrace: peeksiginfo
# PASS
ok 2 selftests: ptrace: peeksiginfo
# selftests: ptrace: vmaccess
# TAP version 13
# 1..2
# # Starting 2 tests from 1 test cases.
# #  RUN           global.vmaccess ...
# #            OK  global.vmaccess
# ok 1 global.vmaccess
# #  RUN           global.attach ...
# # attach: Test terminated by timeout
# #          FAIL  global.attach
# not ok 2 global.attach
# # FAILED: 1 / 2 tests passed.
# # Totals: pass:1 fail:1 xfail:0 xpass:0 skip:0 error:0
not ok 3 selftests: ptrace: vmaccess # exit=1
"""


def report_for(tmp_path: Path, output: str, expected: tuple[tuple[str, str], ...], *, ended: bool = True):
    name = "kselftest-ptrace"
    planned = PlanSuite(name, "kselftest", 300, (), KSELFTEST_ARGV, f"suites/{name}", False, expected)
    plan = Plan("5.10.223-kci", (planned,))
    results = tmp_path / "results" / name
    results.mkdir(parents=True)
    (results / "output.txt").write_text(output)
    lines = ["[    0.000000] Linux version 5.10.223-kci", "KCI-INIT: ready", f"KCI-SUITE-START: {name}"]
    if ended:
        status = {"name": name, "rc": 0, "seconds": 40.0, "timed_out": False}
        (results / "status.json").write_text(json.dumps(status))
        lines += [f"KCI-SUITE-END: {name} rc=0 seconds=40.00 timed_out=0", "KCI-RUNNER: done"]
    end = GuestEnd("poweroff") if ended else GuestEnd("hang", detail="no output")
    report = collect(plan, tmp_path / "results", scan("\n".join(lines) + "\n"), end, {})
    junit = write_junit(report, tmp_path / "junit.xml")
    return report, {c.name: c for c in read_back(junit) if c.suite == name}


VMACCESS_ATTACH = "selftests: ptrace: vmaccess.global.attach"


def test_an_expected_failure_is_skipped_with_its_reason(tmp_path):
    report, cases = report_for(tmp_path, RUNNER_OUTPUT, ((VMACCESS_ATTACH, "no de_thread fix in 5.10"),))
    assert report.outcome == Outcome.PASS
    assert cases[VMACCESS_ATTACH].state == "skipped"
    assert cases[VMACCESS_ATTACH].message.startswith("expected failure: no de_thread fix in 5.10 (failed")
    assert cases["selftests: ptrace: vmaccess.global.vmaccess"].state == "passed"
    assert cases["selftests: ptrace: get_syscall_info.global.get_syscall_info"].state == "passed"
    assert cases["selftests: ptrace: peeksiginfo"].state == "passed"


def test_without_the_list_the_same_failure_fails_the_run(tmp_path):
    report, cases = report_for(tmp_path, RUNNER_OUTPUT, ())
    assert report.outcome == Outcome.TEST_FAILURE
    assert cases[VMACCESS_ATTACH].state == "failed"


def test_an_expected_failure_that_passes_fails_so_the_list_stays_true(tmp_path):
    fixed = RUNNER_OUTPUT.replace("# not ok 2 global.attach", "# ok 2 global.attach").replace(
        "not ok 3 selftests: ptrace: vmaccess # exit=1", "ok 3 selftests: ptrace: vmaccess"
    )
    report, cases = report_for(tmp_path, fixed, ((VMACCESS_ATTACH, "no fix"),))
    assert report.outcome == Outcome.TEST_FAILURE
    assert cases[VMACCESS_ATTACH].state == "failed"
    assert "unexpectedly passed" in cases[VMACCESS_ATTACH].message


def test_an_expected_failure_that_matches_nothing_fails(tmp_path):
    listed = "selftests: ptrace: vmaccess.global.renamed"
    report, cases = report_for(tmp_path, RUNNER_OUTPUT, ((VMACCESS_ATTACH, "a"), (listed, "b")))
    assert report.outcome == Outcome.TEST_FAILURE
    assert cases[listed].state == "failed" and "no such test ran" in cases[listed].message


def test_a_hang_is_never_turned_into_an_expected_failure(tmp_path):
    cut = RUNNER_OUTPUT[: RUNNER_OUTPUT.index("# # attach: Test terminated")]
    report, cases = report_for(tmp_path, cut, ((VMACCESS_ATTACH, "no fix"),), ended=False)
    assert report.outcome == Outcome.GUEST_HANG
    assert cases["test 3"].state == "error"  # the binary that was running when the guest hung
    assert not any(c.state == "skipped" for c in cases.values())  # nothing hidden as "expected"


# --- build helper ------------------------------------------------------------------------------------


def env(tmp_path: Path, use_ccache: bool = True) -> builder.BuildEnv:
    return builder.BuildEnv("img", tmp_path / "src", tmp_path / "out", tmp_path / "cc", 3, "t", use_ccache)


def test_make_command_builds_statically_with_the_trees_headers(tmp_path):
    argv = kselftest.make_argv(env(tmp_path), ("ptrace", "timers"))
    assert argv[:3] == ["make", "-C", "/build/src/tools/testing/selftests"]
    assert argv[-1] == "install"
    for wanted in (
        "O=/build/out",
        "TARGETS=ptrace timers",
        "FORCE_TARGETS=1",
        "LDFLAGS=-static",
        "USERCFLAGS=-isystem /build/out/kselftest/usr/include",
        "KSFT_INSTALL_PATH=/build/out/kselftest_install",
        "-j3",
        "HOSTCC=ccache gcc",
    ):
        assert wanted in argv
    assert not any(a.startswith(("CC=", "HOSTCC=")) for a in kselftest.make_argv(env(tmp_path, False), ["x"]))
    assert kselftest.normalize_targets(["timers", "ptrace", "timers"]) == ("ptrace", "timers")


def test_unknown_targets_and_no_targets(tmp_path):
    (tmp_path / "src" / "tools/testing/selftests/ptrace").mkdir(parents=True)
    assert kselftest.build_selftests(env(tmp_path), [], tmp_path / "dest") == {}
    with pytest.raises(kselftest.KselftestError, match="ptrace"):
        kselftest.build_selftests(env(tmp_path), ["ptrace"], tmp_path / "dest")  # no Makefile there


def test_static_elf_check(tmp_path):
    source = tmp_path / "t.c"
    source.write_text("int main(void) { return 0; }\n")
    proc.run(["gcc", "-static", "-o", tmp_path / "static", source], quiet=True)
    proc.run(["gcc", "-o", tmp_path / "dynamic", source], quiet=True)
    assert kselftest.is_static_elf(tmp_path / "static")
    assert not kselftest.is_static_elf(tmp_path / "dynamic")
    assert kselftest.is_elf(tmp_path / "static") and not kselftest.is_elf(source)
    elf32 = tmp_path / "elf32"
    elf32.write_bytes(b"\x7fELF" + bytes([1, 1]) + bytes(58) + struct.pack("<H", 0))
    with pytest.raises(kselftest.KselftestError, match="64-bit"):
        kselftest.is_static_elf(elf32)
