"""`kernel-ci`: the command line, a thin layer over the pipeline modules."""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from kernel_ci.cli import options
from kernel_ci.cli.options import SUITE_NO_LONGER_BUILDS, add_build_options, warn_suite_ignored
from kernel_ci.core.console import console
from kernel_ci.core.errors import ExitCode, InfrastructureError, KernelCIError, UsageError
from kernel_ci.core.paths import REPO_ROOT

if TYPE_CHECKING:  # the commands import their stage when run: `kernel-ci --help` loads none
    from kernel_ci.flow.build import BuildResult
    from kernel_ci.report.model import Outcome, RunReport

DEFAULT_OUT = REPO_ROOT / "out"
ERROR_LOG = "kernel-ci-error.log"  # in --output: the traceback of an unexpected exception
_build_request = options.build_request  # the name tests and older callers use


def time_breakdown(durations: Mapping[str, float]) -> str:
    """Where a build's time went, in the order of its steps: "configure 3.1 s, build 180.2 s (...)"."""
    parts = {name: s for name, s in durations.items() if "." not in name}
    inner = {name.partition(".")[2]: s for name, s in durations.items() if name.startswith("build.")}
    shown = []
    for name, seconds in parts.items():
        text = f"{name} {seconds:.1f} s"
        if name == "build" and inner:
            text += " (" + ", ".join(f"{n} {s:.1f} s" for n, s in inner.items()) + ")"
        shown.append(text)
    return "\n".join(shown)


def build_summary(result: BuildResult) -> Table:
    meta = result.metadata
    kernel = meta.kernel
    table = Table(title="kernel build", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    version = kernel.version
    if kernel.requested != version:
        version += f"  (requested {kernel.requested})"
    table.add_row("kernel", f"{version}  release {kernel.release}")
    for note in kernel.fallbacks:
        table.add_row("fallback", f"[yellow]{note}[/]")
    table.add_row("patches", "\n".join(meta.patches) or "none (vanilla)")
    table.add_row("build key", meta.build_key)
    how = "[green]build cache hit[/]" if result.cache_hit else "built"
    table.add_row("time", f"{result.seconds:.1f} s ({how})")
    if meta.durations and not result.cache_hit:
        table.add_row("breakdown", time_breakdown(meta.durations))
    ccache = meta.ccache
    if ccache and not result.cache_hit:
        table.add_row("ccache", f"{ccache.hit_rate:.0%} hits ({ccache.hits} hits, {ccache.misses} misses)")
    table.add_row("toolchain", f"{meta.toolchain.gcc} ({meta.toolchain.image})")
    table.add_row("outputs", str(result.output))
    table.add_row("reproduce", meta.reproduce)
    return table


def cmd_build(args: argparse.Namespace) -> int:
    from kernel_ci.cache.remote import open_store
    from kernel_ci.flow.build import build

    warn_suite_ignored(args)
    options.check_kernel(args.kernel, args.tree)
    settings = options.settings(args)
    request = options.build_request(args, settings.ccache_remote)
    result = build(request, store=open_store(settings))
    console.print(build_summary(result))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from kernel_ci.cache.remote import open_store
    from kernel_ci.flow.test import TestOptions, run_tests

    # the user's mistakes first (exit 2), before minutes of building or booting
    options.check_suites(args.suite)
    if args.kernel_dir is not None:
        options.check_kernel_dir(args.kernel_dir)
    else:
        options.check_kernel(args.kernel, args.tree)
    settings = options.settings(args)
    store = open_store(settings)
    if args.kernel_dir is None:
        from kernel_ci.flow.build import build

        request = options.build_request(args, settings.ccache_remote)
        result = build(request, store=store)
        console.print(build_summary(result))
        kernel_dir = result.output
    else:
        kernel_dir = args.kernel_dir
    test_options = TestOptions(
        kernel_dir=kernel_dir,
        output=args.output,
        suites=args.suite,
        memory=args.memory,
        cpus=args.cpus,
        accel=args.accel,
        append=args.append,
        boot_timeout=args.boot_timeout,
        idle_timeout=args.idle_timeout,
        timeout=args.timeout,
        keep_overlay=args.keep_overlay,
    )
    report = run_tests(test_options)
    from kernel_ci.cache.remote import attach_test_run

    outcome = _outcome_of(report)
    attach_test_run(store, kernel_dir, args.output, outcome.name)  # JUnit + console to the service
    return int(outcome)


def cmd_repro(args: argparse.Namespace) -> int:
    from kernel_ci.flow.test import reproduce

    options.check_run_dir(args.run_dir)
    return int(_outcome_of(reproduce(args.run_dir, interactive=args.interactive)))


def _outcome_of(report: RunReport) -> Outcome:
    """A run always has an outcome (only a report read back from JUnit alone may lack one)."""
    if report.outcome is None:
        raise InfrastructureError("the run ended without an outcome; see its console.log")
    return report.outcome


def cmd_bench(args: argparse.Namespace) -> int:
    from kernel_ci.bench.build import PARTS, rewrite_readme, run_bench

    if args.readme:  # no measuring: the README's table from the last bench.json
        bench_json = args.output / "bench" / "bench.json"
        if not bench_json.is_file():
            raise UsageError(f"no {bench_json}: run `kernel-ci bench` first")
        changed = rewrite_readme(bench_json, REPO_ROOT / "README.md")
        console.print(f"README.md {'rewritten' if changed else 'already up to date'} from {bench_json}")
        return 0
    parts = args.part or PARTS
    run_bench(args.output / "bench", skip_reference=args.skip_reference, kernel=args.kernel, parts=parts)
    return 0


def _add_test_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("test")
    group.add_argument("--kernel-dir", type=Path, help="test this build output dir instead of building")
    group.add_argument("--memory", default="1024M")
    group.add_argument("--cpus", type=int, default=2)
    group.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    group.add_argument("--append", default="", help="extra kernel command line arguments")
    group.add_argument("--boot-timeout", type=float, default=120.0, help="seconds to reach the guest's init")
    group.add_argument(
        "--idle-timeout", type=float, default=120.0, help="seconds without console output = hang"
    )
    group.add_argument("--timeout", type=float, default=1800.0, help="global limit for one guest run")
    group.add_argument("--keep-overlay", action="store_true", help="keep the qcow2 overlay (kept on failure)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kernel-ci", description=__doc__)
    top.add_argument("--output", "-o", type=Path, default=DEFAULT_OUT, help="output dir (default: ./out)")
    sub = top.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="build the kernel (or restore it from the build cache)")
    add_build_options(build)
    build.add_argument("--suite", action="append", help="deprecated, ignored: " + SUITE_NO_LONGER_BUILDS)
    build.set_defaults(func=cmd_build)

    test = sub.add_parser("test", help="build (cached), boot in QEMU, run the guest suites, write JUnit")
    add_build_options(test)
    _add_test_options(test)
    test.add_argument(
        "--suite",
        action="append",
        help="guest suite to run (repeatable; default: all); it does not change the kernel, which carries "
        "every suite's needs",
    )
    test.set_defaults(func=cmd_test)

    repro = sub.add_parser("repro", help="boot the kernel and rootfs of an earlier run again")
    repro.add_argument("run_dir", type=Path)
    repro.add_argument("--interactive", action="store_true", help="attach the console instead of re-running")
    repro.set_defaults(func=cmd_repro)

    bench = sub.add_parser("bench", help="measure build, cache, boot and test times (JSON + table)")
    bench.add_argument("--kernel", default=None)
    bench.add_argument("--skip-reference", action="store_true", help="skip tuxmake and virtme-ng")
    bench.add_argument(
        "--readme", action="store_true", help="only rewrite README.md's performance table from bench.json"
    )
    bench.add_argument(
        "--part", action="append", choices=["build", "guest"], help="only these parts (repeatable)"
    )
    bench.set_defaults(func=cmd_bench)

    from kernel_ci.cli.commands import register

    register(sub)  # key, matrix, summary, patches
    from kernel_ci.cli.bisect import register as register_bisect

    register_bisect(sub)
    from kernel_ci.cache.server.cli import register as register_cache

    cache = register_cache(sub)  # cache serve, cache scrub
    _add_cache_bench(cache)
    return top


def cmd_cache_bench(args: argparse.Namespace) -> int:
    from kernel_ci.bench.cache import run_cache_bench

    run_cache_bench(
        args.output / "bench", duration=args.duration, connections=args.connections, workers=args.workers
    )
    return 0


def _add_cache_bench(cache: argparse._SubParsersAction) -> None:
    """`cache bench` lives here, not beside `cache serve`: the service (a stage) may not import the bench."""
    bench = cache.add_parser("bench", help="restore time from the service; ccache objects/s vs nginx WebDAV")
    bench.add_argument("--duration", type=float, default=10.0, help="seconds of load per target (wrk)")
    bench.add_argument("--connections", type=int, default=16)
    bench.add_argument(
        "--workers", type=int, default=2, help="service worker processes (nginx: one per core)"
    )
    bench.set_defaults(func=cmd_cache_bench)


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code says what kind of failure it was (core.errors.ExitCode)."""
    args = parser().parse_args(argv)  # a bad option exits 2 here (argparse)
    from kernel_ci.cli.bisect import bisect_exit

    return bisect_exit(args, _run(args))


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except KernelCIError as exc:  # raised on purpose: its message says what to do, its class the exit code
        from kernel_ci.report.github import report

        report(exc, getattr(args, "kernel", None))  # patch file / target / hunk; annotations in a workflow
        console.print("[bold red]error:[/]", Text(str(exc)))
        return int(exc.exit_code)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:  # a bug: never a bare traceback that reads as a test failure (1)
        log = _write_traceback(exc, args.output)
        console.print(
            "[bold red]internal error:[/]",
            Text(f"{type(exc).__name__}: {exc}; traceback in {log}"),
        )
        return int(ExitCode.INFRASTRUCTURE)


def _write_traceback(exc: BaseException, output: Path) -> Path:
    """The traceback in <output>/kernel-ci-error.log, or in a temporary file when --output is not writable."""
    text = "".join(traceback.format_exception(exc))
    try:
        output.mkdir(parents=True, exist_ok=True)
        log = output / ERROR_LOG
        log.write_text(text)
    except OSError:
        with tempfile.NamedTemporaryFile("w", prefix="kernel-ci-error-", suffix=".log", delete=False) as f:
            f.write(text)
        log = Path(f.name)
    return log


if __name__ == "__main__":
    sys.exit(main())
