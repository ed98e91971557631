"""`kernel-ci bench`: measured figures for the build and boot loop, beside the tools people use today.

Build: cold (empty ccache, empty object tree), ccache-warm clean tree, incremental after touching
kernel/ptrace.c, build-cache hit; beside them tuxmake building the same tree and config (cold, and with a
warm ccache). Guest: rootfs cold and cached, boot-to-first-test and a full smoke run under TCG; beside them
virtme-ng booting the same bzImage to run one command. Results: JSON and a table; aims are shown, never
asserted (speed is not a test verdict).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from kernel_ci.bench.figures import Figure, ratio, render
from kernel_ci.bench.guest import guest_figures
from kernel_ci.cache.store import LocalStore
from kernel_ci.core import proc
from kernel_ci.core.console import console, step, warn
from kernel_ci.core.timing import measure_duration
from kernel_ci.flow.build import BuildRequest, BuildResult, build
from kernel_ci.host import setup as hostsetup

HOST_BUILD_DEPS = ["gcc", "make", "flex", "bison", "bc", "libelf-dev", "libssl-dev", "ccache", "cpio", "kmod"]


def machine_description() -> dict[str, str | int]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpus": os.cpu_count() or 0,
        "cpu": cpu,
        "memory_gib": round(mem_kb / 2**20),
        "kernel": platform.release(),
    }


def build_figures(work: Path, kernel: str | None) -> tuple[list[Figure], BuildResult]:
    ccache = work / "ccache"
    store = LocalStore(work / "store")
    out = work / "out"

    step("bench: cold build (empty ccache, empty object tree, no build cache)")
    cold = build(
        BuildRequest(kernel=kernel, output=out / "cold", fresh=True, use_cache=False, ccache_dir=ccache)
    )
    figures = [Figure("build: cold, CI config", cold.seconds, "< 300 s")]

    step("bench: ccache-warm build of a clean tree")
    warm = build(
        BuildRequest(kernel=kernel, output=out / "warm", fresh=True, use_cache=False, ccache_dir=ccache)
    )
    rate = warm.metadata.ccache.hit_rate if warm.metadata.ccache else 0.0
    figures.append(
        Figure("build: ccache-warm, clean tree", warm.seconds, "< 90 s", f"ccache {rate:.0%} hits")
    )

    step("bench: incremental build after touching kernel/ptrace.c")
    assert warm.work is not None
    (warm.work / "src" / "kernel" / "ptrace.c").touch()
    incremental = build(BuildRequest(kernel=kernel, output=out / "incr", use_cache=False, ccache_dir=ccache))
    figures.append(Figure("build: incremental (kernel/ptrace.c touched)", incremental.seconds, "< 30 s"))

    step("bench: build cache hit")
    build(BuildRequest(kernel=kernel, output=out / "seed", use_cache=True, ccache_dir=ccache), store=store)
    hit = build(
        BuildRequest(kernel=kernel, output=out / "hit", use_cache=True, ccache_dir=ccache), store=store
    )
    figures.append(Figure("build: build-cache hit", hit.seconds, "< 5 s", "hit" if hit.cache_hit else "MISS"))
    return figures, cold


def tuxmake_figures(work: Path, reference: BuildResult) -> list[Figure]:
    """tuxmake on the host (--runtime null: no toolchain image can be pulled here), same tree and config."""
    if shutil.which("tuxmake") is None:
        return [Figure("tuxmake: cold", None, note="tuxmake not installed (pip install tuxmake)")]
    if hostsetup.can_install():
        hostsetup.apt_install(HOST_BUILD_DEPS)
    assert reference.work is not None
    tree = reference.work / "src"
    config = reference.output / "config"
    env = {
        "KBUILD_BUILD_TIMESTAMP": reference.metadata.kbuild_timestamp,
        "CCACHE_DIR": str(work / "tuxmake-ccache"),
    }
    figures = []
    for label, extra in (("cold", []), ("ccache-warm #1 (fills ccache)", ["--wrapper", "ccache"]),
                         ("ccache-warm #2", ["--wrapper", "ccache"])):  # fmt: skip
        build_dir = work / "tuxmake-build"
        shutil.rmtree(build_dir, ignore_errors=True)
        argv = ["tuxmake", "--runtime", "null", "--target-arch", "x86_64", "--toolchain", "gcc",
                "--kconfig", str(config), "-C", str(tree), "-b", str(build_dir),
                "-o", str(work / "tuxmake-out"), *extra, "kernel", "modules"]  # fmt: skip
        with measure_duration() as took:
            proc.run(argv, env=env, keep_output=False, quiet=True)
        seconds = took.seconds
        figures.append(Figure(f"tuxmake: {label}", seconds))
    return figures


def _report(figures: list[Figure]) -> dict[str, object]:
    report: dict[str, object] = {
        "machine": machine_description(),
        "load_average": os.getloadavg(),
        "command": " ".join(["kernel-ci", *sys.argv[1:]]) if sys.argv else "kernel-ci bench",
        "figures": [asdict(f) for f in figures],
        "ratios": {
            "cold build / tuxmake cold": ratio(figures, "build: cold, CI config", "tuxmake: cold"),
            "ccache-warm / tuxmake ccache-warm": ratio(
                figures, "build: ccache-warm, clean tree", "tuxmake: ccache-warm #2"
            ),
            "boot-to-first-test / virtme-ng": ratio(
                figures, "guest: boot-to-first-test, TCG", "virtme-ng: boot + uname -r, TCG"
            ),
        },
        "ccache": {"note": "cold uses an empty ccache dir of its own; the user's ccache is not touched"},
    }
    boot = [f.seconds for f in figures if f.name.startswith("guest: boot-to-first-test") and f.seconds]
    if boot:
        report["boot_median"] = statistics.median(boot)
    return report


PARTS = ("build", "guest")


def run_bench(
    output: Path, *, skip_reference: bool = False, kernel: str | None = None, parts: Sequence[str] = PARTS
) -> dict:
    """Measure the parts asked for; bench.json is rewritten after each part, so an interrupted run keeps
    what it measured."""
    output.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=output))
    figures: list[Figure] = []

    def save() -> dict:
        report = _report(figures)
        (output / "bench.json").write_text(json.dumps(report, indent=1))
        return report

    try:
        if "build" in parts:
            build_part, cold = build_figures(work, kernel)
            figures += build_part
            save()
            if not skip_reference:
                step("bench: tuxmake on the same tree and config")
                figures += tuxmake_figures(work, cold)
                save()
        if "guest" in parts:
            figures += guest_figures(work, skip_reference=skip_reference)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        report = save()
    console.print(render(figures))
    console.print(f"ratios: {report['ratios']}")
    console.print(f"JSON: {output / 'bench.json'}")
    if any(f.seconds is None for f in figures):
        warn("some figures could not be measured: see the notes")
    return report
