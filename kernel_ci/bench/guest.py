"""The guest half of `kernel-ci bench`: rootfs, boot-to-first-test and smoke runs, beside virtme-ng."""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from kernel_ci.bench.figures import Figure
from kernel_ci.core import proc
from kernel_ci.core.console import step
from kernel_ci.core.timing import Duration, measure_duration
from kernel_ci.flow.build import BuildRequest, BuildResult, build
from kernel_ci.flow.test import GUEST_INIT, ROOTFS_RECIPE, TestOptions, run_tests
from kernel_ci.guest import rootfs
from kernel_ci.host import setup as hostsetup
from kernel_ci.report.model import RunRecord

BOOT_RUNS = 3


def _rootfs_figures(work: Path) -> list[Figure]:
    step("bench: rootfs image, cold (own cache dir) and cached")
    cache = work / "rootfs-cache"  # its own, so that "cold" is cold; passed down, never via the environment
    try:
        with measure_duration() as cold:
            rootfs.ensure_rootfs(ROOTFS_RECIPE, GUEST_INIT, cache=cache)
        with measure_duration() as cached:
            rootfs.ensure_rootfs(ROOTFS_RECIPE, GUEST_INIT, cache=cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return [
        Figure("rootfs: cold (debootstrap + mkfs.ext4 -d)", cold.seconds),
        Figure("rootfs: cached", cached.seconds, "< 1 s"),
    ]


def _smoke_figures(work: Path, kernel: BuildResult) -> list[Figure]:
    step(f"bench: smoke runs under TCG ({BOOT_RUNS}x)")
    first_test: list[float] = []
    full: list[float] = []
    for index in range(BOOT_RUNS):
        with measure_duration() as took:
            run_tests(TestOptions(kernel_dir=kernel.output, output=work / f"smoke-{index}", accel="tcg"))
        full.append(took.seconds)
        seconds = RunRecord.read(work / f"smoke-{index}" / "latest").first_test_seconds
        if seconds is not None:
            first_test.append(seconds)
    figures = [Figure("guest: full smoke run (payload+boot+tests+report)", statistics.median(full))]
    if first_test:
        figures.insert(
            0, Figure("guest: boot-to-first-test, TCG", statistics.median(first_test), "< 3 s, <= vng")
        )
    step("bench: warm `kernel-ci test` (build-cache hit + smoke run)")
    with measure_duration() as warm_run:
        warm = build(BuildRequest(output=work / "warm-build"))
        run_tests(TestOptions(kernel_dir=warm.output, output=work / "warm-test", accel="tcg"))
    figures.append(Figure("kernel test: warm, smoke suites", warm_run.seconds, "< 60 s"))
    return figures


def _virtme_figures(kernel: BuildResult) -> list[Figure]:
    """virtme-ng booting the same bzImage under TCG to run one command (median of BOOT_RUNS)."""
    if shutil.which("vng") is None:
        return [
            Figure(
                "virtme-ng: boot + uname -r, TCG",
                None,
                note="virtme-ng not installed (pip install virtme-ng)",
            )
        ]
    if hostsetup.can_install():
        hostsetup.apt_install(
            ["udev", "busybox-static"]
        )  # vng needs udev's files; prints nothing without them
    step(f"bench: virtme-ng boot + one command under TCG ({BOOT_RUNS}x)")
    times = []
    for _ in range(BOOT_RUNS):
        took = Duration()
        result = proc.run(
            ["vng", "--run", kernel.output / "bzImage", "--disable-kvm", "--force-9p", "--", "uname", "-r"],
            quiet=True,
            check=False,
            timeout=120,
        )
        if result.returncode != 0:
            return [
                Figure("virtme-ng: boot + uname -r, TCG", None, note=f"vng failed: {result.output[-200:]}")
            ]
        times.append(took.stop())
    return [Figure("virtme-ng: boot + uname -r, TCG", statistics.median(times))]


def guest_figures(work: Path, *, skip_reference: bool = False) -> list[Figure]:
    figures = _rootfs_figures(work)
    # The kernel every suite can run on (every build carries their kconfig and kselftests).
    smoke_kernel = build(BuildRequest(output=work / "smoke-build"))
    figures += _smoke_figures(work, smoke_kernel)
    if not skip_reference:
        figures += _virtme_figures(smoke_kernel)
    return figures
