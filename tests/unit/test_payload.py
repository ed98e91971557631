"""Suite manifests, the payload, and the C side (lib/ktap + smoke-c) built with the host's gcc -static."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from kernel_ci.core import proc
from kernel_ci.core.paths import GUEST_RUNNER, KTAP_LIB, SUITE_PATH
from kernel_ci.guest.payload import PYTEST_ARGV, PayloadError, assemble_payload, read_plan
from kernel_ci.guest.suites import ManifestError, kconfig_lines, load_suites
from kernel_ci.report.ktap import flatten, parse

CFLAGS = ["-static", "-O2", "-Wall", "-Wextra", "-Werror"]


def gcc_static(src_dir: Path, c_files: list[str], out_binary: Path) -> None:
    """The compile_c a host test uses: the builder container does the same with its own gcc."""
    proc.run(["gcc", *CFLAGS, "-o", out_binary, *c_files], cwd=src_dir, quiet=True)


def is_static_elf(path: Path) -> bool:
    data = path.read_bytes()
    return data[:4] == b"\x7fELF" and b"/lib64/ld-linux" not in data and b"/lib/ld-linux" not in data


# --- manifests ---------------------------------------------------------------------------------------


SMOKE = ["smoke-c", "smoke-py"]


def test_shipped_suites_load():
    suites = {s.name: s for s in load_suites(SUITE_PATH)}
    assert {"smoke-c", "smoke-py"} <= set(suites)
    smoke_c, smoke_py = suites["smoke-c"], suites["smoke-py"]
    assert (smoke_c.language, smoke_c.modules, smoke_c.ship_modules) == ("c", ("kci-smoke",), ())
    assert smoke_c.sources == ("smoke.c",)
    assert (smoke_py.language, smoke_py.modules, smoke_py.ship_modules) == ("python", (), ("kci-smoke",))
    assert smoke_py.all_modules == ("kci-smoke",)
    assert "CONFIG_MODULE_UNLOAD=y" in kconfig_lines([smoke_c, smoke_py])


def test_named_suites_keep_the_given_order_and_unknown_names_fail():
    assert [s.name for s in load_suites(SUITE_PATH, ["smoke-py", "smoke-c"])] == ["smoke-py", "smoke-c"]
    with pytest.raises(ManifestError, match=r"unknown suite.*nope.*available: .*smoke-c, smoke-py"):
        load_suites(SUITE_PATH, ["nope"])


def make_suite(root: Path, name: str, manifest: str, files: dict[str, str] | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "manifest.toml").write_text(manifest)
    for file, text in (files or {"t.c": "int main(void) { return 0; }\n"}).items():
        (folder / file).write_text(text)
    return folder


GOOD = 'name = "{name}"\nlanguage = "c"\ntimeout = 5\nsources = ["t.c"]\n'


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("name = 'x'\nlanguage = ", "not valid TOML"),
        (GOOD.format(name="x") + "modulez = []\n", "unknown key.*modulez"),
        (GOOD.format(name="other"), "must equal the folder name"),
        (GOOD.format(name="x").replace('"c"', '"rust"'), "language must be one of c, python"),
        (GOOD.format(name="x").replace("timeout = 5", "timeout = 0"), "timeout must be a positive"),
        (GOOD.format(name="x").replace("timeout = 5", 'timeout = "5"'), "timeout must be a positive"),
        (GOOD.format(name="x") + 'kconfig = ["CONFIG_FOO"]\n', "kconfig line 'CONFIG_FOO'"),
        (GOOD.format(name="x") + 'kconfig = "CONFIG_FOO=y"\n', "kconfig must be a list of strings"),
        (GOOD.format(name="x").replace('["t.c"]', '["gone.c"]'), "source 'gone.c' does not exist"),
        (GOOD.format(name="x").replace('["t.c"]', '["../t.c"]'), "must be a path inside the suite folder"),
        (GOOD.format(name="x").replace('["t.c"]', "[]"), "at least one file"),
        (GOOD.format(name="x") + 'modules = ["Bad Name"]\n', "module 'Bad Name'"),
    ],
)
def test_bad_manifests_are_clear_errors(tmp_path, manifest, message):
    make_suite(tmp_path, "x", manifest)
    with pytest.raises(ManifestError, match=message) as caught:
        load_suites(tmp_path)
    assert "x/manifest.toml" in str(caught.value)


def test_python_sources_must_be_python(tmp_path):
    manifest = 'name = "p"\nlanguage = "python"\ntimeout = 5\nsources = ["t.c"]\n'
    make_suite(tmp_path, "p", manifest)
    with pytest.raises(ManifestError, match=r"not a \.py file"):
        load_suites(tmp_path)


def test_folder_without_manifest_and_helper_folders(tmp_path):
    for helper in ("lib", "runner", "init"):
        (tmp_path / helper).mkdir()
    make_suite(tmp_path, "ok", GOOD.format(name="ok"))
    assert [s.name for s in load_suites(tmp_path)] == ["ok"]
    (tmp_path / "stray").mkdir()
    with pytest.raises(ManifestError, match=r"stray: no manifest\.toml"):
        load_suites(tmp_path)


def test_kconfig_conflict_between_suites(tmp_path):
    make_suite(tmp_path, "a", GOOD.format(name="a") + 'kconfig = ["CONFIG_KASAN=y", "CONFIG_PROC_FS=y"]\n')
    make_suite(
        tmp_path, "b", GOOD.format(name="b") + 'kconfig = ["CONFIG_PROC_FS=y", "# CONFIG_KASAN is not set"]\n'
    )
    suites = load_suites(tmp_path)
    with pytest.raises(ManifestError, match="suites a and b disagree"):
        kconfig_lines(suites)
    assert kconfig_lines(suites[:1]) == ["CONFIG_KASAN=y", "CONFIG_PROC_FS=y"]


# --- the payload -------------------------------------------------------------------------------------


@pytest.fixture
def fake_ko(tmp_path) -> Path:
    """Module builds are another stage's job; the payload only copies the file it is given."""
    ko = tmp_path / "build" / "kci_smoke.ko"
    ko.parent.mkdir()
    ko.write_bytes(b"\x7fELF not really a module")
    return ko


def test_assemble_payload(tmp_path, fake_ko):
    dest = tmp_path / "payload"
    suites = load_suites(SUITE_PATH, SMOKE)
    assert assemble_payload(suites, dest, "5.10.223-kci", gcc_static, {"kci-smoke": fake_ko}) == dest
    assert (dest / "kci-runner.py").read_bytes() == GUEST_RUNNER.read_bytes()
    assert (dest / "modules" / "kci_smoke.ko").read_bytes() == fake_ko.read_bytes()
    binary = dest / "suites" / "smoke-c" / "smoke-c"
    assert is_static_elf(binary)
    assert binary.stat().st_mode & 0o111
    assert (dest / "suites" / "smoke-py" / "test_smoke.py").is_file()
    plan = read_plan(dest / "plan.json")
    assert plan.kernel_release == "5.10.223-kci"
    assert plan.attempt == 0  # a run; a retry's payload says which (test_a_retry_s_payload_names_its_attempt)
    smoke_c, smoke_py = plan.suites
    assert (smoke_c.argv, smoke_c.workdir, smoke_c.modules, smoke_c.junit) == (
        ("./smoke-c",),
        "suites/smoke-c",
        ("modules/kci_smoke.ko",),
        False,
    )
    assert smoke_py.modules == ()  # shipped, not loaded by the runner
    assert smoke_py.argv == (*PYTEST_ARGV, "test_smoke.py") and "$KCI_JUNIT" in smoke_py.argv
    assert smoke_py.junit is True and smoke_py.timeout == 120
    raw = json.loads((dest / "plan.json").read_text())
    assert raw["suites"][0] == {
        "name": "smoke-c",
        "language": "c",
        "timeout": 60,
        "modules": ["modules/kci_smoke.ko"],
        "argv": ["./smoke-c"],
        "workdir": "suites/smoke-c",
        "junit": False,
    }


def test_payload_errors(tmp_path, fake_ko):
    suites = load_suites(SUITE_PATH, SMOKE)
    with pytest.raises(PayloadError, match=r"no built \.ko for module folder.*kci-smoke"):
        assemble_payload(suites, tmp_path / "p1", "r", gcc_static, {})
    busy = tmp_path / "p2"
    busy.mkdir()
    (busy / "old").write_text("x")
    with pytest.raises(PayloadError, match="not empty"):
        assemble_payload(suites, busy, "r", gcc_static, {"kci-smoke": fake_ko})
    with pytest.raises(PayloadError, match="does not exist"):
        assemble_payload(suites, tmp_path / "p3", "r", gcc_static, {"kci-smoke": tmp_path / "gone.ko"})


def test_compile_failure_surfaces(tmp_path, fake_ko):
    root = tmp_path / "guest-tests"
    shutil.copytree(KTAP_LIB, root / "lib")
    make_suite(
        root, "broken", GOOD.format(name="broken"), {"t.c": "int main(void) { int unused; return 0; }\n"}
    )
    with pytest.raises(proc.CommandError, match="unused"):
        assemble_payload(load_suites(root), tmp_path / "payload", "r", gcc_static, {})


def test_payload_runs_under_the_runner_on_the_host(tmp_path, fake_ko):
    """smoke-c (packaged) and this repository's ci-smoke built into a payload and run by the runner: on the
    host (no kci_smoke module, no /proc/ci-smoke) those checks must fail, the release check must pass, and
    the artifact must be written."""
    dest = tmp_path / "payload"
    release = proc.capture(["uname", "-r"]).strip()
    chosen = load_suites(SUITE_PATH, ["smoke-c", "ci-smoke"])
    assemble_payload(chosen, dest, release, gcc_static, {"kci-smoke": fake_ko})
    results = tmp_path / "results"
    runner = [sys.executable, str(dest / "kci-runner.py"), "--no-reboot", "--results", str(results)]
    run = proc.run([*runner, "--insmod", "true", "--rmmod", "true", str(dest / "plan.json")], quiet=True)
    assert "KCI-RUNNER: done" in run.output
    status = json.loads((results / "smoke-c" / "status.json").read_text())
    assert status["rc"] == 1 and status["timed_out"] is False
    report = parse((results / "smoke-c" / "output.txt").read_text())
    assert report.errors == [] and report.plan == 3
    checks = {name: test.status for name, test in flatten(report.tests)}
    assert checks == {
        "uname_release.release_matches": "ok",
        "module_loaded.sysfs_entry": "fail",
        "module_loaded.tag_parameter": "skip",
        "artifact.written": "ok",
    }
    assert (results / "smoke-c" / "artifacts" / "smoke-c.txt").read_text() == f"smoke-c ran on {release}\n"
    report = parse((results / "ci-smoke" / "output.txt").read_text())
    checks = {name: test.status for name, test in flatten(report.tests)}
    assert checks["proc_ci_smoke.exists"] == "fail" and checks["proc_ci_smoke.content"] == "skip"


# --- the C harness -----------------------------------------------------------------------------------

HARNESS_PROGRAM = r"""
#include <string.h>
#include "../lib/ktap.h"

KTAP_TEST(passes)
{
	ktap_ok(1 + 1 == 2, "arithmetic %d", 2);
	ktap_diag("a # in a name is replaced");
	ktap_ok(true, "name # with hash");
}

KTAP_TEST(fails)
{
	ktap_diag("strcmp said %d", strcmp("a", "b"));
	ktap_ok(false, "compare");
}

KTAP_TEST(skips)
{
	ktap_skip("needs_hw", "no %s here", "device");
}

KTAP_TEST(nested)
{
	ktap_subtest_begin("inner");
	ktap_plan(2);
	ktap_ok(true, "one");
	ktap_ok(true, "two");
	ktap_subtest_end();
}

static const struct ktap_case cases[] = {
	KTAP_CASE(passes), KTAP_CASE(fails), KTAP_CASE(skips), KTAP_CASE(nested),
};

int main(void)
{
	return ktap_run(cases, KTAP_ARRAY_SIZE(cases));
}
"""

PLAN_BROKEN_PROGRAM = r"""
#include "../lib/ktap.h"

int main(void)
{
	ktap_plan(3);
	ktap_ok(true, "first");
	ktap_ok(true, "second");
	return ktap_finish();
}
"""


def build_and_run(tmp_path: Path, program: str) -> tuple[int, str]:
    root = tmp_path / "guest-tests"
    shutil.copytree(KTAP_LIB, root / "lib")
    (root / "prog").mkdir()
    (root / "prog" / "prog.c").write_text(program)
    binary = tmp_path / "prog"
    gcc_static(root, ["prog/prog.c", "lib/ktap.c"], binary)
    run = proc.run([binary], quiet=True, check=False)
    return run.returncode, run.output


def test_ktap_harness_output_reads_back(tmp_path):
    rc, output = build_and_run(tmp_path, HARNESS_PROGRAM)
    assert rc == 1  # one check failed
    report = parse(output)
    assert report.errors == [] and report.plan == 4
    top = {t.name: t for t in report.tests}
    assert [t.status for t in report.tests] == ["ok", "fail", "skip", "ok"]
    assert top["passes"].seconds is not None
    assert [t.name for t in top["passes"].subtests] == ["arithmetic 2", "name _ with hash"]
    assert top["fails"].subtests[0].output == "# strcmp said -1"
    assert top["skips"].subtests[0].reason == "no device here"
    assert [(t.name, t.status) for t in top["nested"].subtests[0].subtests] == [("one", "ok"), ("two", "ok")]
    assert output.rstrip().endswith("# Totals: pass:2 fail:1 skip:1")


def test_ktap_harness_plan_mismatch_fails(tmp_path):
    rc, output = build_and_run(tmp_path, PLAN_BROKEN_PROGRAM)
    assert rc == 1
    assert "# planned 3 tests but ran 2" in output
    assert parse(output).missing() == 1


def test_only_a_c_suite_or_an_unbuilt_module_needs_the_toolchain(tmp_path):
    """What decides whether `kernel-ci test` starts Docker at all (tests/e2e/test_no_docker.py runs it)."""
    from kernel_ci.flow.test import needs_toolchain

    by_name = {s.name: s for s in load_suites(SUITE_PATH)}
    kernel_dir = tmp_path / "build"
    assert needs_toolchain([by_name["smoke-c"]], kernel_dir)  # C: compiled in the builder container
    assert needs_toolchain([by_name["smoke-py"]], kernel_dir)  # kci-smoke not built with the kernel
    (kernel_dir / "extmod" / "kci-smoke").mkdir(parents=True)
    (kernel_dir / "extmod" / "kci-smoke" / "kci_smoke.ko").write_bytes(b"\x7fELF")
    assert not needs_toolchain([by_name["smoke-py"], by_name["kselftest-ptrace"]], kernel_dir)
    assert needs_toolchain([by_name["smoke-py"], by_name["smoke-c"]], kernel_dir)


def test_a_retry_s_payload_names_its_attempt(tmp_path, fake_ko):
    suites = load_suites(SUITE_PATH, ["smoke-py"])
    assemble_payload(suites, tmp_path / "payload", "r", gcc_static, {"kci-smoke": fake_ko}, attempt=2)
    assert read_plan(tmp_path / "payload" / "plan.json").attempt == 2
    document = json.loads((tmp_path / "payload" / "plan.json").read_text())
    document["attempt"] = -1
    (tmp_path / "bad.json").write_text(json.dumps(document))
    with pytest.raises(PayloadError, match="attempt"):
        read_plan(tmp_path / "bad.json")
