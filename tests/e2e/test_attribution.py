"""End to end: red runs explained with real builds and boots (issue 18), in a scratch project.

The project (tmp: `--project DIR`, nothing is written into the checkout) is the checkout's series, suites,
modules and kconfig, plus a three-patch scratch series on top of ci-smoke whose SECOND patch changes what
/proc/ci-smoke reads (the ci-smoke suite's `content` test fails) and whose first and third are harmless, plus
planted Python suites that ask the kernel for nothing (no kconfig: the plan, and every build key, is the
checkout's).

- attribution: `explain` retries the failing suites once in a fresh guest (the content test fails again:
  consistent), runs the kernel without the series (the baseline: /proc/ci-smoke does not exist there, so
  the test does not fail there), and walks the scratch series' prefixes: the report must name patch 2,
  neither the first nor the last.
- flaky: `kernel-ci test --attribute` on a planted test that fails when $KCI_ATTEMPT % 3 == 0 (the run is
  attempt 0, the n-th retry attempt n): it fails the run, passes the first retry, and is reported flaky
  (exit 8, not 1).

Cost, kept low by reuse: the scratch series' prefix 0 is the checkout's CI kernel (a build-cache hit once
any e2e built it); the scratch patches are the same files on every run (fixed commit dates), so the full
kernel, prefix 1 and the baseline (the vanilla kernel with the same options) are hits from the second run
on, and the baseline's result is kept too. Boots run only the failing suites (two small ones). The flaky
test reuses the attribution test's full kernel (a hit) and boots twice (the run and one retry).

Measured on the shared 2-core host (load 5-7, other builds running), first run: the run's kernel ~4.5 min,
then explain: 4 boots, 2 builds compiled (the baseline ~8 min: its config differs, so ccache has little;
prefix 1 ~1.5 min), 1 hit, 611 s; the whole file 15 min. Warm (every build a hit, the baseline's
result kept): explain 3 boots, 0 builds, 3 hits, 23 s; the whole file 135 s (load 5-10).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kernel_ci.build.patches import discover_series
from kernel_ci.cli.main import main
from kernel_ci.cli.result import CommandResult
from kernel_ci.core.errors import ExitCode
from kernel_ci.core.paths import CHECKOUT, Project
from kernel_ci.flow.attribute import explain
from kernel_ci.flow.build import BuildRequest, build
from kernel_ci.flow.test import TestOptions, run_tests
from kernel_ci.report import compare, junit

pytestmark = pytest.mark.slow

SCRATCH = "zz-e2e-attribution"  # sorts after the checkout's series: applied last
CI_SMOKE_C = """// SPDX-License-Identifier: GPL-2.0
/*
 * /proc/ci-smoke: a marker that this kernel was built from a patched tree.
 *
 * A CI pipeline applies its patch series, builds and boots the kernel and
 * reads this file from inside the guest. Its presence, with the expected
 * contents, proves that the series reached the running kernel.
 */

#include <linux/init.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>

static int ci_smoke_show(struct seq_file *m, void *v)
{
\tseq_puts(m, "ci-smoke: patch applied\\n");
\treturn 0;
}

static int __init ci_smoke_init(void)
{
\tif (!proc_create_single("ci-smoke", 0444, NULL, ci_smoke_show))
\t\treturn -ENOMEM;
\treturn 0;
}
device_initcall(ci_smoke_init);
"""
# (subject, old text, new text): patch 2 is the planted regression, patches 1 and 3 harmless
CHANGES = (
    (
        "ci_smoke: note the initcall level",
        "device_initcall(",
        "/* any level after procfs */\ndevice_initcall(",
    ),
    ("ci_smoke: reword the marker", "patch applied\\n", "patch applied (reworded)\\n"),
    (
        "ci_smoke: say why creating the file can fail",
        "\t\treturn -ENOMEM;",
        "\t\treturn -ENOMEM;\t/* its only failure: no memory */",
    ),
)
BROKEN = 1  # index in CHANGES of the planted regression


# Fixed dates: the same commits, so the same patch files, on every run: their builds (the full kernel, the
# prefix 1) are build-cache hits from the second run on, like the baseline and prefix 0.
FIXED_DATE = "2024-07-27T08:40:24+00:00"


def _git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_DATE": FIXED_DATE, "GIT_COMMITTER_DATE": FIXED_DATE}
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)


def _scratch_series(folder: Path, work: Path) -> None:
    """git format-patch files of the CHANGES over ci-smoke's kernel/ci_smoke.c, as a series folder."""
    repo = work / "repo"
    (repo / "kernel").mkdir(parents=True)
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "kernel-ci@example.invalid")
    _git(repo, "config", "user.name", "kernel-ci")
    source = repo / "kernel" / "ci_smoke.c"
    source.write_text(CI_SMOKE_C)
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "base")
    for subject, old, new in CHANGES:
        assert old in source.read_text(), old
        source.write_text(source.read_text().replace(old, new, 1))
        _git(repo, "commit", "-qam", subject)
    folder.mkdir()
    _git(repo, "format-patch", "-q", "--no-signature", f"-{len(CHANGES)}", "-o", str(folder))
    names = sorted(p.name for p in folder.glob("*.patch"))
    (folder / "series").write_text("\n".join(names) + "\n")
    (folder / "README.md").write_text("A scratch series of tests/e2e/test_attribution.py.\n")


# A planted suite run beside ci-smoke: one test broken on every kernel (pre-existing), one only on the
# kernel without ci-smoke (vanished from the run), one only with it (new).
PLANTED = """
import os

PATCHED = os.path.exists("/proc/ci-smoke")


def test_always_broken():
    assert False, "planted: fails on every kernel"


if PATCHED:

    def test_only_with_the_series():
        pass

else:

    def test_only_without_the_series():
        pass
"""


# A planted suite that fails one attempt in three: the run (attempt 0), then passes on its retries 1 and 2.
FLAKY = """
import os


def test_fails_one_attempt_in_three():
    attempt = int(os.environ["KCI_ATTEMPT"])
    assert attempt % 3 != 0, f"planted: fails on attempt {attempt}"
"""


def _planted(root: Path, name: str, text: str) -> None:
    """A Python suite that asks the kernel for nothing: the build plan stays the checkout's."""
    folder = root / name
    folder.mkdir()
    (folder / "manifest.toml").write_text(
        f'name = "{name}"\nlanguage = "python"\ntimeout = 60\nmodules = []\nkconfig = []\n'
        'sources = ["test_planted.py"]\n'
    )
    (folder / "test_planted.py").write_text(text)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """The checkout's project files, the scratch series and the planted suites, in a temporary directory."""
    root = tmp_path_factory.mktemp("project")
    for folder in ("kernel-patches", "guest-tests", "kernel-modules", "kconfig"):
        shutil.copytree(CHECKOUT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    _scratch_series(root / "kernel-patches" / SCRATCH, tmp_path_factory.mktemp("scratch"))
    _planted(root / "guest-tests", "attr-planted", PLANTED)
    _planted(root / "guest-tests", "attr-flaky", FLAKY)
    return Project(root)


def test_a_red_run_names_the_patch_that_broke_its_test(tmp_path: Path, project: Project) -> None:
    out = tmp_path / "out"
    request = BuildRequest(project=project, suites_dir=project.suite_path, output=out / "build")
    kernel = build(request)
    assert kernel.metadata.series[-1] == SCRATCH
    suites = ["ci-smoke", "attr-planted"]
    options = TestOptions(
        kernel_dir=kernel.output,
        output=out,
        suites=suites,
        suites_dir=project.suite_path,
        modules_dir=project.module_path,
    )
    report = run_tests(options)
    failing = sorted(compare.failing(report))
    broken = [name for name in failing if name.startswith("ci-smoke")]
    always = [name for name in failing if name.startswith("attr-planted")]
    assert broken and all("content" in name for name in broken), failing  # only the reworded marker
    assert len(always) == 1 and "always_broken" in always[0], failing

    started = time.monotonic()
    explained = explain((out / "latest").resolve(), retries=1)
    seconds = time.monotonic() - started
    print(f"attribution cost: {explained.cost.render()} (measured {seconds:.0f} s)")

    findings = explained.comparison.by_test()
    patches = discover_series(project.kernel_patches, [SCRATCH])[0].patch_names()
    assert len(patches) == len(CHANGES)
    culprit = patches[BROKEN]
    for name in broken:
        assert findings[name].verdict == "regression", findings[name]
        assert findings[name].blamed_patch == culprit, findings[name]
        assert findings[name].retries == compare.RetryCount(0, 2)
    assert findings[always[0]].verdict == "preexisting" and findings[always[0]].blamed_patch is None
    assert [v.rsplit("::", 1)[-1].rsplit(".", 1)[-1] for v in explained.comparison.vanished] == [
        "test_only_without_the_series"
    ]
    assert [n.rsplit("::", 1)[-1].rsplit(".", 1)[-1] for n in explained.comparison.new] == [
        "test_only_with_the_series"
    ]
    assert explained.comparison.exit_code() == ExitCode.TEST_FAILURE
    back = junit.read_report((out / "latest").resolve() / "junit.xml")
    case = next(c for s in back.suites for c in s.cases if compare.test_id(s.name, c.name) == broken[0])
    assert case.properties[compare.PROP_BLAMED_PATCH] == culprit
    assert f"first fails after {culprit}" in case.detail
    # built or restored: the baseline and the prefixes 0, 1 and 2 (3 is the run's own kernel)
    assert explained.cost.builds + explained.cost.cache_hits == 4, explained.cost
    # boots: the retry, the prefixes 0, 1 and 2, and the baseline unless its result was kept from before
    assert explained.cost.boots in (4, 5), explained.cost


def test_a_test_that_fails_one_run_in_three_is_reported_flaky(tmp_path: Path, project: Project) -> None:
    out = tmp_path / "out"
    argv = ["--project", str(project.root), "test", "--suite", "attr-flaky", "--attribute", "-o", str(out)]
    code = main([*argv, "--retries", "2", "--no-baseline", "--json", str(tmp_path / "result.json")])
    assert code == ExitCode.FLAKY, code
    run_dir = (out / "latest").resolve()
    explained = compare.Comparison.from_json((run_dir / "explained.json").read_text())
    (finding,) = explained.findings
    assert finding.test.startswith("attr-flaky::") and finding.verdict == "flaky"
    # the run failed (attempt 0), its first retry passed (attempt 1): flaky, so no second retry
    assert finding.retries == compare.RetryCount(1, 1)
    back = junit.read_report(run_dir / "junit.xml")
    (case,) = [c for s in back.suites for c in s.cases if c.state in ("failed", "error")]
    assert case.properties[compare.PROP_CLASSIFICATION] == "flaky"
    assert case.properties[compare.PROP_RETRIES] == "1/1"
    assert "flaky (1 passed / 1 failed of 2 runs)" in case.detail
    result = CommandResult.from_json((tmp_path / "result.json").read_text())
    assert (result.outcome, result.exit_code) == ("TEST_FAILURE", ExitCode.FLAKY)  # the guest's, explained
    assert not (CHECKOUT / "kernel-patches" / SCRATCH).exists()  # nothing written into the checkout
