"""`kernel-ci bench`: measured figures for the build and boot loop, beside the tools people use today.

Build: cold (empty ccache, empty object tree), ccache-warm clean tree, incremental after touching
kernel/ptrace.c, build-cache hit; beside them tuxmake building the same tree and config (cold, and with a
warm ccache). Guest: rootfs cold and cached, boot-to-first-test and a full smoke run under TCG; beside them
virtme-ng booting the same bzImage to run one command. Cache: `kernel-ci cache bench` (bench/cache.py) as
figures, beside nginx. Results: JSON and a table; aims are shown, never asserted (speed is not a test
verdict).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

from kernel_ci.bench.figures import Figure, figures_from_json, markdown_table, render
from kernel_ci.bench.figures import rewrite_readme as rewrite_readme_section
from kernel_ci.bench.guest import guest_figures
from kernel_ci.cache.store import LocalStore
from kernel_ci.core import proc
from kernel_ci.core.console import console, step, warn
from kernel_ci.core.timing import measure_duration
from kernel_ci.flow.build import BuildRequest, BuildResult, build
from kernel_ci.host import setup as hostsetup

# what tuxmake's --runtime null needs on the host to build the CI config (lz4: the bzImage's compression)
HOST_BUILD_DEPS = [
    "gcc", "make", "flex", "bison", "bc", "libelf-dev", "libssl-dev", "ccache", "cpio", "kmod", "lz4",
]  # fmt: skip


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


ONE_LINE_CHANGE = "kernel/ptrace.c"


def _build(work: Path, kernel: str | None, name: str, *, fresh: bool = False, use_cache: bool) -> BuildResult:
    request = BuildRequest(
        kernel=kernel,
        output=work / "out" / name,
        ccache_dir=work / "ccache",
        fresh=fresh,
        use_cache=use_cache,
    )
    return build(request, store=LocalStore(work / "store"))


@contextlib.contextmanager
def one_line_change(tree: Path, sample: int = 1) -> Iterator[None]:
    """Append one line to kernel/ptrace.c for the block, then put the original file back and touch it (so
    the next build recompiles it and no object of the edit survives). The tree is hard links to the
    pristine source: the edit goes to a new file (the pristine one is never written), and the original
    inode is linked back. The block's builds must not publish: their key says the unedited inputs.
    Each sample's line is its own, so a second sample is a ccache miss as the first was."""
    path = tree / ONE_LINE_CHANGE
    original = path.with_name(path.name + ".kci-bench-orig")
    original.unlink(missing_ok=True)
    os.link(path, original)
    edited = path.with_name(path.name + ".kci-bench-edit")
    edited.write_bytes(path.read_bytes() + f"/* kernel-ci bench: a one-line change ({sample}) */\n".encode())
    edited.replace(path)
    try:
        yield
    finally:
        original.replace(path)
        path.touch()


SAMPLES = 2  # of the warm and the incremental pairs, taken A B B A: a drift of the machine hits both alike


def abba(
    ours: Callable[[int], float], theirs: Callable[[int], float] | None
) -> tuple[list[float], list[float]]:
    """SAMPLES measurements of each, alternating which goes first (this VM's speed drifts by 10% within
    minutes: one pair in one order measures the drift as much as the tools)."""
    mine: list[float] = []
    reference: list[float] = []
    for sample in range(1, SAMPLES + 1):
        first_ours = sample % 2 == 1
        if first_ours:
            mine.append(ours(sample))
        if theirs is not None:
            reference.append(theirs(sample))
        if not first_ours:
            mine.append(ours(sample))
    return mine, reference


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


class Tuxmake:
    """tuxmake on the host (--runtime null: no toolchain image can be pulled here), building the same tree
    with the same config as kernel-ci's cold build, in one build dir (so its rebuilds are incremental)."""

    def __init__(self, work: Path, reference: BuildResult) -> None:
        assert reference.work is not None
        self.work = work
        self.tree = reference.work / "src"
        self.config = reference.output / "config"
        self.env = {
            "KBUILD_BUILD_TIMESTAMP": reference.metadata.kbuild_timestamp,
            "CCACHE_DIR": str(work / "tuxmake-ccache"),
        }
        self.build_dir = work / "tuxmake-build"

    def run(self, *, ccache: bool, fresh: bool) -> float:
        if fresh:
            shutil.rmtree(self.build_dir, ignore_errors=True)
        wrapper = ["--wrapper", "ccache" if ccache else "none"]
        argv = ["tuxmake", "--runtime", "null", "--target-arch", "x86_64", "--toolchain", "gcc",
                "--kconfig", str(self.config), "-C", str(self.tree), "-b", str(self.build_dir),
                "-o", str(self.work / "tuxmake-out"), *wrapper, "kernel", "modules"]  # fmt: skip
        with measure_duration() as took:
            proc.run(argv, env=self.env, keep_output=False, quiet=True)
        return took.seconds


def tuxmake_ready() -> bool:
    if shutil.which("tuxmake") is None:
        return False
    if hostsetup.can_install():
        hostsetup.apt_install(HOST_BUILD_DEPS)
    return True


def build_figures(
    work: Path, kernel: str | None, *, reference: bool, save: Callable[[list[Figure]], object]
) -> list[Figure]:
    """Each kernel-ci figure measured right beside tuxmake's for the same work (cold, ccache-warm,
    incremental), so both see the same load; bench.json is saved after each pair."""
    figures: list[Figure] = []

    def add(figure: Figure) -> None:
        figures.append(figure)
        save(figures)

    step("bench: cold build (empty ccache, empty object tree, no build cache), and tuxmake's, A B B A")
    cold_runs: list[BuildResult] = []

    def cold_build(_sample: int) -> float:
        shutil.rmtree(work / "ccache", ignore_errors=True)  # each sample fills an empty one
        cold_runs.append(_build(work, kernel, "cold", fresh=True, use_cache=False))
        return cold_runs[-1].seconds

    # tuxmake builds the tree and config of kernel-ci's first cold build (abba starts with ours)
    tuxes: list[Tuxmake] = []

    def tux_cold(_sample: int) -> float:
        if not tuxes:
            tuxes.append(Tuxmake(work, cold_runs[0]))
        return tuxes[0].run(ccache=False, fresh=True)

    mine, theirs = abba(cold_build, tux_cold if reference and tuxmake_ready() else None)
    tux = tuxes[0] if tuxes else None
    cold = cold_runs[-1]
    # the kselftests and external modules come from the content-keyed reuse folder (~/.cache/kernel-ci/reuse)
    # as in any build after a machine's first: tuxmake builds neither, so both sides compile the same objects
    add(Figure("build: cold, CI config (fills ccache)", median(mine), "<= 0.95x tuxmake",
               f"median of {len(mine)}, A B B A; kselftests and external modules reused",
               reference=median(theirs),
               reference_name="tuxmake --wrapper none", breakdown=dict(cold.metadata.durations),
               samples=mine, reference_samples=theirs))  # fmt: skip

    step("bench: ccache-warm build of a clean tree (and tuxmake filling, then using, its ccache)")
    if tux:
        add(Figure("tuxmake: fills its ccache (cold, --wrapper ccache)", tux.run(ccache=True, fresh=True)))
    warm_runs: list[BuildResult] = []

    def warm_build(_sample: int) -> float:
        warm_runs.append(_build(work, kernel, "warm", fresh=True, use_cache=False))
        return warm_runs[-1].seconds

    def tux_warm(_sample: int) -> float:
        assert tux is not None
        return tux.run(ccache=True, fresh=True)

    mine, theirs = abba(warm_build, tux_warm if tux else None)
    warm = warm_runs[-1]
    rate = warm.metadata.ccache.hit_rate if warm.metadata.ccache else 0.0
    add(Figure("build: ccache-warm, clean tree", median(mine), "<= 1.0x tuxmake",
               f"ccache {rate:.0%} hits; median of {len(mine)}, A B B A", reference=median(theirs),
               reference_name="tuxmake --wrapper ccache, warm", breakdown=dict(warm.metadata.durations),
               samples=mine, reference_samples=theirs))  # fmt: skip

    step(f"bench: incremental build after a one-line change in {ONE_LINE_CHANGE}")
    assert warm.work is not None
    tree = warm.work / "src"
    incremental_runs: list[BuildResult] = []

    def incremental_build(sample: int) -> float:
        with one_line_change(tree, sample):  # into the warm build's output dir, as a developer's rerun
            incremental_runs.append(_build(work, kernel, "warm", use_cache=False))
        return incremental_runs[-1].seconds

    def tux_incremental(sample: int) -> float:
        assert tux is not None
        with one_line_change(tree, sample):
            return tux.run(ccache=True, fresh=False)

    mine, theirs = abba(incremental_build, tux_incremental if tux else None)
    add(Figure(f"build: incremental, one-line change in {ONE_LINE_CHANGE}", median(mine), "< 10 s",
               f"median of {len(mine)}, A B B A", reference=median(theirs),
               reference_name="tuxmake, same build dir",
               breakdown=dict(incremental_runs[-1].metadata.durations), samples=mine,
               reference_samples=theirs))  # fmt: skip

    step("bench: build cache hit (restored into an empty output dir, then a rerun into the same one)")
    _build(work, kernel, "seed", use_cache=True)
    restore = _build(work, kernel, "hit", use_cache=True)
    add(Figure("build: build-cache hit, restored into an empty output dir", restore.seconds,
               note=_hit_note(restore)))  # fmt: skip
    rerun = _build(work, kernel, "hit", use_cache=True)
    add(Figure("build: build-cache hit, rerun (output dir as the last run left it)", rerun.seconds,
               "<= 0.3 s", _hit_note(rerun)))  # fmt: skip
    return figures


def _hit_note(result: BuildResult) -> str:
    if not result.cache_hit:
        return "MISS"
    files = sum(1 for p in result.output.rglob("*") if not p.is_dir())
    return f"hit, {files} files"


def _report(figures: list[Figure], started: str) -> dict[str, object]:
    report: dict[str, object] = {
        "machine": machine_description(),
        "load_average": os.getloadavg(),
        "command": " ".join(["kernel-ci", *sys.argv[1:]]) if sys.argv else "kernel-ci bench",
        # when (UTC): machines of this kind drift by 1.5x from day to day, so a table says which run it is
        "started": started,
        "ended": _utc_now(),
        "figures": [asdict(f) for f in figures],
        "ratios": {f.name: f"{f.ratio:.2f}" for f in figures if f.ratio is not None},
        "ccache": {"note": "cold uses an empty ccache dir of its own; the user's ccache is not touched"},
    }
    boot = [f.seconds for f in figures if f.name.startswith("guest: boot-to-first-test") and f.seconds]
    if boot:
        report["boot_median"] = statistics.median(boot)
    return report


def _when(report: dict) -> str:
    """The run's span for the table ("" for a bench.json written before runs recorded it)."""
    started, ended = report.get("started"), report.get("ended")
    if not started:
        return ""
    if ended and ended[:10] == started[:10]:
        return f"{started[:16]}-{ended[11:]}"  # one day: 2026-12-07 22:55-23:25 UTC
    return f"{started} to {ended}" if ended else started


PARTS = ("build", "guest", "cache")


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def rewrite_readme(bench_json: Path, readme: Path) -> bool:
    """README.md's performance table, regenerated from bench_json; True if it changed."""
    report = json.loads(bench_json.read_text())
    table = markdown_table(
        figures_from_json(report), report.get("machine", {}), report.get("command", "?"), _when(report)
    )
    return rewrite_readme_section(readme, table)


def run_bench(
    output: Path, *, skip_reference: bool = False, kernel: str | None = None, parts: Sequence[str] = PARTS
) -> dict:
    """Measure the parts asked for; bench.json is rewritten after each part, so an interrupted run keeps
    what it measured."""
    output = output.absolute()  # its work dir holds the builds' ccache and outputs: bind mounts' sources
    output.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=output))
    figures: list[Figure] = []
    started = _utc_now()

    def save(part: Sequence[Figure] = ()) -> dict:
        """bench.json with the figures so far and those of the part being measured."""
        report = _report([*figures, *part], started)
        (output / "bench.json").write_text(json.dumps(report, indent=1))
        return report

    try:
        if "build" in parts:
            figures += build_figures(
                work,
                kernel,
                reference=not skip_reference,
                save=save,
            )
            save()
        if "guest" in parts:
            figures += guest_figures(work, skip_reference=skip_reference)
            save()
        if "cache" in parts:
            from kernel_ci.bench.cache import cache_figures  # the service's extras: only for this part

            figures += cache_figures(output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        report = save()
    console.print(render(figures))
    console.print(f"ratios: {report['ratios']}")
    console.print(f"JSON: {output / 'bench.json'}")
    if any(f.seconds is None for f in figures):
        warn("some figures could not be measured: see the notes")
    return report
