"""`kernel-ci`: the command line, a thin layer over the pipeline modules."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.table import Table
from rich.text import Text

from kernel_ci.core.console import console
from kernel_ci.core.paths import REPO_ROOT

DEFAULT_OUT = REPO_ROOT / "out"


def _add_build_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("build")
    group.add_argument(
        "--kernel", help="version or alias from kernel-sources.lock.toml (default: its default)"
    )
    group.add_argument(
        "--series",
        action="append",
        help="patch series under kernel-patches/ (repeatable; default: all; 'none' for a vanilla kernel)",
    )
    group.add_argument("--fragment", action="append", type=Path, default=[], help="extra kconfig fragment")
    group.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 2)
    group.add_argument("--no-cache", action="store_true", help="build even if the build cache has this key")
    group.add_argument("--no-ccache", action="store_true", help="compile without ccache")
    group.add_argument("--fresh", action="store_true", help="start from an empty object tree")
    group.add_argument(
        "--cache-url",
        help="shared build cache service (default: $KERNEL_CI_CACHE_URL, else the [cache] config table)",
    )
    group.add_argument(
        "--trusted-ccache-writes",
        action="store_true",
        help="the series is trusted: give the build container the cache's WRITE token for ccache "
        "(default: the read token, so patch code cannot poison the shared ccache)",
    )


def _build_request(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The build the options ask for. Never the suites: the kernel carries every suite's needs, so that
    `kernel-ci test --suite X` tests the very kernel a full `kernel-ci test` (or `kernel-ci build`) built."""
    from kernel_ci.flow.build import BuildRequest

    return BuildRequest(
        kernel=args.kernel,
        series=_series(args),
        fragments=args.fragment,
        output=args.output / "build",
        jobs=args.jobs,
        use_cache=not args.no_cache,
        use_ccache=not args.no_ccache,
        fresh=args.fresh,
    )


def _series(args: argparse.Namespace) -> list[str] | None:
    """--series as the pipeline takes it: None = every series; 'none' alone = a vanilla kernel."""
    return None if args.series is None else [s for s in args.series if s != "none"]


def build_summary(result) -> Table:  # type: ignore[no-untyped-def]
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
    ccache = meta.ccache
    if ccache and not result.cache_hit:
        table.add_row("ccache", f"{ccache.hit_rate:.0%} hits ({ccache.hits} hits, {ccache.misses} misses)")
    table.add_row("toolchain", f"{meta.toolchain.gcc} ({meta.toolchain.image})")
    table.add_row("outputs", str(result.output))
    table.add_row("reproduce", meta.reproduce)
    return table


SUITE_NO_LONGER_BUILDS = (
    "--suite no longer changes the kernel: every build carries every guest suite's kconfig and kselftests, "
    "so this is the kernel `kernel-ci test` tests; choose the suites to run with `kernel-ci test --suite`"
)


def warn_suite_ignored(args: argparse.Namespace) -> None:
    """`build --suite` / `key --suite` are accepted (scripts that pass them keep working) and ignored."""
    if getattr(args, "suite", None):
        from kernel_ci.core.console import warn

        warn(f"{SUITE_NO_LONGER_BUILDS} (ignored: --suite {' --suite '.join(args.suite)})")


def cmd_build(args: argparse.Namespace) -> int:
    from kernel_ci.flow.build import build

    warn_suite_ignored(args)
    request = _build_request(args)
    result = build(request, store=_store(args))
    console.print(build_summary(result))
    return 0


def _store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The build store: the local one, behind the shared cache service when one is configured."""
    from kernel_ci.cache.remote import open_store

    return open_store(args.cache_url, trusted_ccache_writes=args.trusted_ccache_writes)


def cmd_test(args: argparse.Namespace) -> int:
    from kernel_ci.flow.test import TestOptions, run_tests

    store = _store(args)
    if args.kernel_dir is None:
        from kernel_ci.flow.build import build

        request = _build_request(args)
        result = build(request, store=store)
        console.print(build_summary(result))
        kernel_dir = result.output
    else:
        kernel_dir = args.kernel_dir
    options = TestOptions(
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
    report = run_tests(options)
    from kernel_ci.cache.remote import attach_test_run

    attach_test_run(store, kernel_dir, args.output, report.outcome.name)  # JUnit + console to the service
    return int(report.outcome)


def cmd_repro(args: argparse.Namespace) -> int:
    from kernel_ci.flow.test import reproduce

    return int(reproduce(args.run_dir, interactive=args.interactive).outcome)


def cmd_bench(args: argparse.Namespace) -> int:
    from kernel_ci.bench.build import PARTS, run_bench

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
    _add_build_options(build)
    build.add_argument("--suite", action="append", help="deprecated, ignored: " + SUITE_NO_LONGER_BUILDS)
    build.set_defaults(func=cmd_build)

    test = sub.add_parser("test", help="build (cached), boot in QEMU, run the guest suites, write JUnit")
    _add_build_options(test)
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
        "--part", action="append", choices=["build", "guest"], help="only these parts (repeatable)"
    )
    bench.set_defaults(func=cmd_bench)

    from kernel_ci.cli.commands import register

    register(sub, _add_build_options)  # key, matrix, summary, patches
    from kernel_ci.cache.server.cli import register as register_cache

    register_cache(sub)  # cache serve, cache bench
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130
    except Exception as exc:  # every stage raises errors that say what to do: show them plainly
        from kernel_ci.core.errors import BUILD_FAILED_EXIT, user_facing

        if not user_facing(exc):
            raise
        from kernel_ci.report.github import report

        report(exc, getattr(args, "kernel", None))  # patch file / target / hunk; annotations in a workflow
        console.print("[bold red]error:[/]", Text(str(exc)))
        return BUILD_FAILED_EXIT


if __name__ == "__main__":
    sys.exit(main())
