"""End to end: `kernel-ci test --guests N` boots N real guests at once, each running its share of the
suites, and makes one report of them (kernel_ci.guest.placement, report.verdict.merge_guests).

Planted Python suites in a scratch suites folder: one passes, one fails, one panics the kernel. The same
suites in one guest and in two give the same test names and verdicts; a guest that panics takes only its
own suites down, the other guest's suites pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel_ci.core.errors import UsageError
from kernel_ci.core.paths import CONTAINERS, GUEST_INIT
from kernel_ci.flow.test import TestOptions, reproduce, run_tests
from kernel_ci.report.model import Outcome, RunRecord, RunReport

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SUITES = {
    "g-pass": "import os\n\ndef test_uptime_reads():\n    assert os.path.exists('/proc/uptime')\n",
    "g-fail": "def test_planted_failure():\n    assert 1 + 1 == 3, 'planted'\n",
    "g-panic": (
        "import time\n\ndef test_panics_the_kernel():\n"
        "    open('/proc/sysrq-trigger', 'w').write('c')\n    time.sleep(30)\n"
    ),
}


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kernel_ci.flow.build import BuildRequest, build
    from kernel_ci.guest import rootfs

    built = build(BuildRequest(output=tmp_path_factory.mktemp("kernel") / "build"))
    rootfs.ensure_rootfs(CONTAINERS / "rootfs", GUEST_INIT)
    return built.output


@pytest.fixture(scope="module")
def suites_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("suites")
    for name, source in SUITES.items():
        (root / name).mkdir()
        (root / name / "test_planted.py").write_text(source)
        (root / name / "manifest.toml").write_text(
            f'name = "{name}"\nlanguage = "python"\ntimeout = 120\nmodules = []\nkconfig = []\n'
            'sources = ["test_planted.py"]\n'
        )
    return root


def _run(kernel_dir: Path, suites_dir: Path, out: Path, suites: list[str], guests: int) -> RunReport:
    options = TestOptions(
        kernel_dir=kernel_dir, output=out, suites=suites, suites_dir=suites_dir, accel="tcg", guests=guests
    )
    return run_tests(options)


def _states(report: RunReport) -> dict[tuple[str, str], str]:
    return {(s.name, c.name): c.state for s in report.suites for c in s.cases}


def test_two_guests_give_the_report_of_one(kernel_dir: Path, suites_dir: Path, tmp_path: Path) -> None:
    chosen = ["g-pass", "g-fail"]
    one = _run(kernel_dir, suites_dir, tmp_path / "one", chosen, guests=1)
    two = _run(kernel_dir, suites_dir, tmp_path / "two", chosen, guests=2)

    assert one.outcome is two.outcome is Outcome.TEST_FAILURE
    assert _states(one) == _states(two)
    assert _states(two)[("g-pass", "test_uptime_reads")] == "passed"
    assert _states(two)[("g-fail", "test_planted_failure")] == "failed"
    assert two.properties["guests"] == "2" and "guests" not in one.properties

    run_dir = (tmp_path / "two" / "latest").resolve()
    record = RunRecord.read(run_dir)
    assert record.guests == ("guest-1", "guest-2") and record.outcome == "TEST_FAILURE"
    shares = [RunRecord.read(run_dir / name).suites for name in record.guests]
    assert sorted(s for share in shares for s in share) == sorted(chosen)  # each suite in one guest
    assert all(len(share) == 1 for share in shares)
    joined = (run_dir / "console.log").read_text(errors="replace")
    assert "===== kernel-ci: guest-1" in joined and "===== kernel-ci: guest-2" in joined
    assert joined.count("KCI-INIT: ready") >= 2  # both guests' consoles, each booted
    with pytest.raises(UsageError, match="guest-1"):
        reproduce(run_dir)


def test_a_panic_in_one_guest_leaves_the_other_guests_suites(
    kernel_dir: Path, suites_dir: Path, tmp_path: Path
) -> None:
    report = _run(kernel_dir, suites_dir, tmp_path / "out", ["g-pass", "g-panic"], guests=2)

    assert report.outcome is Outcome.KERNEL_PANIC
    states = _states(report)
    assert states[("g-pass", "test_uptime_reads")] == "passed"  # the other guest ran on
    # the panic cut the suite short: its pytest report was never written, the suite's own case says why
    panicked = [state for (suite, _case), state in states.items() if suite == "g-panic"]
    assert panicked and all(state in ("failed", "error") for state in panicked), states
    boot = next(s for s in report.suites if s.name == "boot")
    assert [c.name for c in boot.cases] == ["boot", "runner"]
    assert any(c.message.startswith("guest ") for c in boot.cases if c.state != "passed")
