"""End to end: the built kernel booted under QEMU on the Debian 12 rootfs, real suites, real faults.

The fault suites live in a temporary suites folder (never in guest-tests/, which every run executes): each
loads the deliberately faulting kci-panic module in one mode and the report must say exactly that.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import junitparser
import pytest

from kernel_ci.flow.build import BuildRequest, BuildResult, build
from kernel_ci.flow.test import TestOptions, run_tests
from kernel_ci.report.model import Outcome, RunRecord

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    """The default build (every series, every suite's kconfig): a build-cache hit after the first."""
    out = tmp_path_factory.mktemp("build")
    return build(BuildRequest(output=out / "build"))


def _suite(
    root: Path, name: str, body: str, *, timeout: int = 60, ship: tuple[str, ...] = ("kci-panic",)
) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    modules = ", ".join(f'"{m}"' for m in ship)
    (folder / "manifest.toml").write_text(
        f'name = "{name}"\nlanguage = "python"\ntimeout = {timeout}\nmodules = []\n'
        f'ship_modules = [{modules}]\nkconfig = ["CONFIG_MODULES=y"]\n'
        f'sources = ["test_{name.replace("-", "_")}.py"]\n'
    )
    (folder / f"test_{name.replace('-', '_')}.py").write_text(body)


INSMOD = """
import os, subprocess
from pathlib import Path

def insmod(mode):
    ko = Path(os.environ["KCI_PAYLOAD"]) / "modules" / "kci_panic.ko"
    return subprocess.run(["insmod", str(ko), f"mode={mode}"], capture_output=True, text=True)
"""

PASSING = """
def test_still_runs():
    assert True
"""


def _run(kernel: BuildResult, tmp_path: Path, suites_dir: Path, **options: object) -> tuple[Outcome, Path]:
    """The planted suites in ONE guest (unless asked): these tests are about what a fault does to the
    suites after it in the same guest (several guests: tests/e2e/test_guests.py)."""
    out = tmp_path / "out"
    options.setdefault("guests", 1)
    report = run_tests(TestOptions(kernel_dir=kernel.output, output=out, suites_dir=suites_dir, **options))
    return report.outcome, out


def _cases(junit: Path) -> dict[str, junitparser.TestCase]:
    xml = junitparser.JUnitXml.fromfile(str(junit))
    return {f"{suite.name}/{case.name}": case for suite in xml for case in suite}


def _verdict(case: junitparser.TestCase) -> str:
    return case.result[0].__class__.__name__.lower() if case.result else "passed"


def test_smoke_suites_pass_and_the_report_carries_the_build(kernel: BuildResult, tmp_path: Path) -> None:
    """The packaged smoke suites and this repository's ci-smoke (its series' /proc file) on its build."""
    chosen = ["smoke-c", "smoke-py", "ci-smoke"]
    # one guest: the record of a run in one guest (several: tests/e2e/test_guests.py)
    options = TestOptions(kernel_dir=kernel.output, output=tmp_path / "out", suites=chosen, guests=1)
    report = run_tests(options)
    assert report.outcome == Outcome.PASS
    junit = tmp_path / "out" / "junit.xml"
    xml = junitparser.JUnitXml.fromfile(str(junit))
    suites = {suite.name: suite for suite in xml}
    assert {"boot", "smoke-c", "smoke-py", "ci-smoke"} <= set(suites)
    props = {p.name: p.value for p in suites["smoke-c"].properties()}
    assert props["kernel.version"] == kernel.metadata.kernel.version
    assert props["build_key"] == kernel.key
    assert props["accelerator"] in ("kvm", "tcg")
    assert "ci-smoke/0001-proc-add-proc-ci-smoke.patch" in props["patches"]
    assert suites["smoke-c"].tests >= 3 and suites["smoke-py"].tests >= 3
    assert suites["ci-smoke"].tests == 2 and suites["ci-smoke"].failures == suites["ci-smoke"].skipped == 0
    assert "hello from smoke-py on" in junit.read_text()  # the artifact written in the guest
    run = RunRecord.read(tmp_path / "out" / "latest")
    assert run.build_key == kernel.key and run.qemu_command[0].startswith("qemu-system")
    assert (tmp_path / "out" / "latest" / "console.log").read_text().count("KCI-SUITE-END") == 3
    assert run.overlay is None  # a passing run does not keep its overlay


@pytest.fixture
def suites_dir(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "suites"
    root.mkdir()
    yield root


def test_a_kernel_panic_is_a_result(kernel: BuildResult, tmp_path: Path, suites_dir: Path) -> None:
    _suite(suites_dir, "a-panic", INSMOD + "\ndef test_panics():\n    insmod('panic')\n")
    _suite(suites_dir, "b-after", PASSING, ship=())
    outcome, out = _run(kernel, tmp_path, suites_dir)
    assert outcome == Outcome.KERNEL_PANIC
    cases = _cases(out / "junit.xml")
    panic = [case for name, case in cases.items() if name.startswith("a-panic/kernel")]
    assert panic and _verdict(panic[0]) == "error"
    assert "kci-panic: requested" in junitparser_text(panic[0])
    assert all(_verdict(case) == "skipped" for name, case in cases.items() if name.startswith("b-after/"))
    run = RunRecord.read(out / "latest")
    assert (
        run.exit_code == Outcome.KERNEL_PANIC.value and run.overlay and Path(run.overlay).exists()
    )  # kept on failure


def test_an_oops_fails_its_suite_and_the_run_goes_on(
    kernel: BuildResult, tmp_path: Path, suites_dir: Path
) -> None:
    _suite(suites_dir, "a-oops", INSMOD + "\ndef test_oopses():\n    insmod('oops')\n")
    _suite(suites_dir, "b-after", PASSING, ship=())
    outcome, out = _run(kernel, tmp_path, suites_dir)
    assert outcome == Outcome.KERNEL_OOPS
    cases = _cases(out / "junit.xml")
    oops = [case for name, case in cases.items() if name.startswith("a-oops/kernel")]
    assert oops and _verdict(oops[0]) == "failure"
    assert "kci_panic_init" in junitparser_text(oops[0])  # the call trace is carried
    assert _verdict(cases["b-after/test_still_runs"]) == "passed"


def test_a_hung_suite_is_killed_at_its_timeout_and_the_rest_go_on(
    kernel: BuildResult, tmp_path: Path, suites_dir: Path
) -> None:
    _suite(
        suites_dir, "a-sleeps", "import time\n\ndef test_sleeps():\n    time.sleep(600)\n", timeout=8, ship=()
    )
    _suite(suites_dir, "b-after", PASSING, ship=())
    outcome, out = _run(kernel, tmp_path, suites_dir)
    assert outcome == Outcome.TEST_FAILURE
    cases = _cases(out / "junit.xml")
    sleeper = [case for name, case in cases.items() if name.startswith("a-sleeps/")]
    assert any(_verdict(case) in ("error", "failure") for case in sleeper)
    assert _verdict(cases["b-after/test_still_runs"]) == "passed"


def test_a_silent_guest_is_a_hang_with_a_sysrq_dump(
    kernel: BuildResult, tmp_path: Path, suites_dir: Path
) -> None:
    _suite(suites_dir, "a-lockup", INSMOD + "\ndef test_locks_up():\n    insmod('lockup')\n", timeout=300)
    outcome, out = _run(kernel, tmp_path, suites_dir, cpus=1, idle_timeout=15.0)
    assert outcome == Outcome.GUEST_HANG
    text = (out / "junit.xml").read_text()
    assert "guest: hang" in text
    run = RunRecord.read(out / "latest")
    assert run.guest_end == "hang"


def junitparser_text(case: junitparser.TestCase) -> str:
    parts = [case.system_out or ""]
    for result in case.result:
        parts += [result.message or "", result.text or ""]
    return "\n".join(parts)


def test_every_guest_suite_passes_on_the_default_build(kernel: BuildResult, tmp_path: Path) -> None:
    """What `nox -s kernel test` runs: every series applied, every suite under guest-tests/."""
    report = run_tests(TestOptions(kernel_dir=kernel.output, output=tmp_path / "out"))
    problems = [f"{suite}/{case.name}: {case.message}" for suite, case in report.problems()]
    assert report.outcome == Outcome.PASS, "\n".join(problems)
    ran = set(RunRecord.read(tmp_path / "out" / "latest").suites)
    assert {"smoke-c", "smoke-py", "ci-smoke"} <= ran  # the packaged defaults and the repository's own
