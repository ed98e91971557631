"""End to end: a red run explained with real builds and boots (issue 18).

A three-patch scratch series on top of ci-smoke whose second patch changes what /proc/ci-smoke reads: the
ci-smoke suite's `content` test fails. `explain` retries it in a fresh guest (it fails again: consistent),
runs the kernel without the series (the baseline: vanilla, where /proc/ci-smoke does not exist, so the
test is not failing there), and walks the series' prefixes: the report must name patch 2.

Cost (warm ccache): the prefixes are the default kconfig with other patches, so each build recompiles one
file; the suite rerun is ci-smoke only.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel_ci.build.patches import discover_series
from kernel_ci.core.errors import ExitCode
from kernel_ci.core.paths import GUEST_TESTS, KERNEL_PATCHES
from kernel_ci.flow.attribute import explain
from kernel_ci.flow.build import BuildRequest, build
from kernel_ci.flow.test import TestOptions, run_tests
from kernel_ci.report import compare, junit

pytestmark = pytest.mark.slow

SCRATCH = "zz-e2e-attribution"  # sorts after the repository's series; removed after the test
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
# (subject, old text, new text): patch 2 is the planted regression
CHANGES = (
    (
        "ci_smoke: say why the file is read-only",
        "static int __init",
        "/* read-only: a marker */\nstatic int __init",
    ),
    ("ci_smoke: reword the marker", "patch applied\\n", "patch applied (reworded)\\n"),
    (
        "ci_smoke: note the initcall level",
        "device_initcall(",
        "/* any level after procfs */\ndevice_initcall(",
    ),
)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def scratch_series(tmp_path: Path) -> Iterator[str]:
    """git format-patch files of three commits over ci-smoke's kernel/ci_smoke.c, as a series folder."""
    repo = tmp_path / "repo"
    (repo / "kernel").mkdir(parents=True)
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "kernel-ci@example.invalid")
    _git(repo, "config", "user.name", "kernel-ci")
    source = repo / "kernel" / "ci_smoke.c"
    source.write_text(CI_SMOKE_C)
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "base")
    for subject, old, new in CHANGES:
        source.write_text(source.read_text().replace(old, new, 1))
        _git(repo, "commit", "-qam", subject)
    folder = KERNEL_PATCHES / SCRATCH
    folder.mkdir()
    try:
        _git(repo, "format-patch", "-q", "-3", "-o", str(folder))
        names = sorted(p.name for p in folder.glob("*.patch"))
        (folder / "series").write_text("\n".join(names) + "\n")
        (folder / "README.md").write_text(
            "A scratch series of tests/e2e/test_attribution.py; removed after it.\n"
        )
        yield SCRATCH
    finally:
        shutil.rmtree(folder)


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


def _suites(root: Path) -> Path:
    """ci-smoke (built with the packaged KTAP library: no lib/ beside it) and the planted suite."""
    shutil.copytree(GUEST_TESTS / "ci-smoke", root / "ci-smoke")
    planted = root / "attr-planted"
    planted.mkdir()
    (planted / "manifest.toml").write_text(
        'name = "attr-planted"\nlanguage = "python"\ntimeout = 60\nmodules = []\n'
        'kconfig = ["CONFIG_PROC_FS=y"]\nsources = ["test_planted.py"]\n'
    )
    (planted / "test_planted.py").write_text(PLANTED)
    return root


def test_a_red_run_names_the_patch_that_broke_its_test(tmp_path: Path, scratch_series: str) -> None:
    out = tmp_path / "out"
    kernel = build(BuildRequest(series=["ci-smoke", scratch_series], output=out / "build"))
    suites_dir = _suites(tmp_path / "suites")
    report = run_tests(TestOptions(kernel_dir=kernel.output, output=out, suites_dir=suites_dir))
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
    second = discover_series(KERNEL_PATCHES, [scratch_series])[0].patch_names()[1]
    for name in broken:
        assert findings[name].verdict == "regression", findings[name]
        assert findings[name].blamed_patch == second, findings[name]
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
    assert case.properties[compare.PROP_BLAMED_PATCH] == second
    assert f"first fails after {second}" in case.detail
    # a prefix already built is a cache hit: the second look costs boots, not builds
    assert explained.cost.boots >= 3
