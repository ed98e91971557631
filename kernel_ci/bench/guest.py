"""The guest half of `kernel-ci bench`: rootfs, boot-to-first-test and smoke runs, beside virtme-ng; and
the cost of tracer.ko's monitoring on an allocation-heavy workload (measured in the guest by the tracer
suite's test_tracer_cost.py, read back from its artifact)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

from kernel_ci.bench.figures import Figure
from kernel_ci.core import proc
from kernel_ci.core.console import step
from kernel_ci.core.timing import measure_duration
from kernel_ci.flow.build import BuildRequest, BuildResult, build
from kernel_ci.flow.test import GUEST_INIT, ROOTFS_RECIPE, TestOptions, run_tests
from kernel_ci.guest import rootfs
from kernel_ci.host import setup as hostsetup
from kernel_ci.report import guestfiles
from kernel_ci.report.model import RunRecord

BOOT_RUNS = 3
COMPARE_RUNS = 5  # boot-to-first-test beside virtme-ng: median of 5 each
VNG_FRAGMENT = Path(__file__).with_name("vng.config")  # what vng needs on top of the CI config
VNG_MARK = "KCI-VNG-FIRST-COMMAND"


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


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}, {os.cpu_count()} CPUs"


def _vng_first_command(bzimage: Path) -> float | str:
    """Seconds from starting vng to its first command's output (the counterpart of our start to the first
    KCI-SUITE-START), or why vng failed."""
    first: list[float] = []
    started = time.monotonic()

    def watch(line: str) -> None:
        if VNG_MARK in line and not first:
            first.append(time.monotonic() - started)

    argv = ["vng", "--verbose", "--run", str(bzimage), "--disable-kvm", "--force-9p", "--", "echo", VNG_MARK]
    result = proc.run(argv, quiet=True, check=False, timeout=300, on_line=watch)
    if result.returncode != 0 or not first:
        # The PyPI wheel's virtme-ng-init (vng's PID 1) is linked against a newer glibc than Debian 12's
        # 2.36 (1.33: GLIBC_2.39): it cannot start and the guest panics. Say so rather than a panic tail.
        why = [line for line in result.output.splitlines() if "GLIBC_" in line or "not syncing" in line]
        return f"vng exit {result.returncode}: " + " | ".join(why[:2] or [result.output[-300:]])
    return first[0]


def _virtme_figures(work: Path) -> list[Figure]:
    """Boot to first test beside virtme-ng, both under TCG on the same bzImage: the CI kernel plus
    vng.config (what vng needs to boot it), median of COMPARE_RUNS each."""
    name = "virtme-ng: boot to first command, TCG, same bzImage"
    if shutil.which("vng") is None:
        return [Figure(name, None, note="virtme-ng not installed (pip install virtme-ng)")]
    if hostsetup.can_install():
        hostsetup.apt_install(["udev", "busybox-static"])  # vng needs udev's files; prints nothing without
    kernel = build(BuildRequest(output=work / "vng-build", fragments=[VNG_FRAGMENT]))
    step(f"bench: boot to first test, kernel-ci and virtme-ng, TCG ({COMPARE_RUNS}x each)")
    ours: list[float] = []
    theirs: list[float] = []
    for index in range(COMPARE_RUNS):
        out = work / f"vng-ours-{index}"
        run_tests(TestOptions(kernel_dir=kernel.output, output=out, accel="tcg", suites=["smoke-c"]))
        seconds = RunRecord.read(out / "latest").first_test_seconds
        if seconds is not None:
            ours.append(seconds)
        took = _vng_first_command(kernel.output / "bzImage")
        if isinstance(took, str):
            return [Figure(name, None, note=took)]
        theirs.append(took)
    load = _load()
    ours_median, theirs_median = statistics.median(ours), statistics.median(theirs)
    return [
        Figure(
            "guest: boot to first test, TCG, vng's bzImage",
            ours_median,
            "<= 0.5x virtme-ng",
            note=f"{ours_median / theirs_median:.2f}x virtme-ng; {load}",
        ),
        Figure(name, theirs_median, note=f"vng --disable-kvm --force-9p; {load}"),
    ]


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
        figures += _virtme_figures(work)
    return figures
