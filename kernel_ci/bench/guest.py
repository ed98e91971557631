"""The guest half of `kernel-ci bench`: rootfs, boot-to-first-test and smoke runs, beside virtme-ng; and
the cost of tracer.ko's monitoring on an allocation-heavy workload (measured in the guest by the tracer
suite's test_tracer_cost.py, read back from its artifact)."""

from __future__ import annotations

import json
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
from kernel_ci.report import guestfiles
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


TRACER_COST_RUNS = ("tracer not loaded", "0 monitored", "1 monitored", "16 monitored")


def tracer_cost_figures(cost: dict) -> list[Figure]:
    """tracer-cost.json as figures: the median seconds of one batch per configuration, ns per pair noted."""
    return [
        Figure(
            f"tracer: allocation-heavy batch, {name}",
            statistics.median(cost["seconds"][name]),
            note=f"{cost['ns_per_pair'][name]:,.0f} ns per kmalloc+kfree ({cost['workload']})",
        )
        for name in TRACER_COST_RUNS
    ]


def _tracer_figures(work: Path, kernel: BuildResult) -> list[Figure]:
    step("bench: tracer suite under TCG (cost of monitoring 0, 1, 16 pids)")
    run_tests(TestOptions(kernel_dir=kernel.output, output=work / "tracer", accel="tcg", suites=["tracer"]))
    runs = sorted((work / "tracer").glob("runs/*/results"))
    try:  # the guest wrote it: read it as every guest file is read (no link followed, capped)
        with guestfiles.open_dir(runs[-1]) as results:
            cost = guestfiles.read_under(results, ["tracer", "artifacts", "tracer-cost.json"], 1 << 20)
        return tracer_cost_figures(json.loads(cost.data))
    except (IndexError, OSError, guestfiles.GuestFileError, ValueError, KeyError) as exc:
        note = f"the tracer suite wrote no usable tracer-cost.json ({exc})"
        return [Figure("tracer: allocation-heavy batch", None, note=note)]


def guest_figures(work: Path, *, skip_reference: bool = False) -> list[Figure]:
    figures = _rootfs_figures(work)
    # The kernel every suite can run on (every build carries their kconfig and kselftests).
    smoke_kernel = build(BuildRequest(output=work / "smoke-build"))
    figures += _smoke_figures(work, smoke_kernel)
    figures += _tracer_figures(work, smoke_kernel)
    if not skip_reference:
        figures += _virtme_figures(smoke_kernel)
    return figures
