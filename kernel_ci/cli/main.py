"""`kernel-ci`: the command line, a thin layer over the pipeline modules."""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from kernel_ci.cli import explain, options
from kernel_ci.cli.options import SUITE_NO_LONGER_BUILDS, add_build_options, warn_suite_ignored
from kernel_ci.core.console import console
from kernel_ci.core.errors import ExitCode, InfrastructureError, KernelCIError, UsageError
from kernel_ci.core.paths import PROJECT_ENV, REPO_ROOT

if TYPE_CHECKING:  # the commands import their stage when run: `kernel-ci --help` loads none
    from kernel_ci.cache.store import BuildStore
    from kernel_ci.cli.result import CommandResult
    from kernel_ci.flow.build import BuildRequest, BuildResult
    from kernel_ci.report.model import Outcome, RunReport

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
    options.check_kernel(args.kernel, args.tree, options.project(args).sources_lock)
    options.check_output(args.output)
    settings = options.settings(args)
    request = options.build_request(args, settings.ccache_remote)
    if args.dry_run:
        return _dry_run(args, request, open_store(settings))
    result = build(request, store=open_store(settings))
    console.print(build_summary(result))
    if args.json_file is not None:
        _build_result(result, options.output(args)).write(args.json_file)
    return 0


def _dry_run(args: argparse.Namespace, request: BuildRequest, store: BuildStore) -> int:
    from kernel_ci.cli.result import CommandResult
    from kernel_ci.flow.build import dry_run

    found = dry_run(request, store)
    if found.cached:
        console.print(f"[green]would restore[/] {found.key[:16]} from the build cache ({found.why})")
    else:
        console.print(found.why)
        console.print(f"would compile {found.key[:16]} (kernel-ci build without --dry-run)")
    if args.json_file is not None:
        CommandResult("build", "PASS", 0, build_key=found.key, cache_hit=found.cached).write(args.json_file)
    return 0


def _build_result(result: BuildResult, output: Path) -> CommandResult:
    from kernel_ci.cli.result import CommandResult

    return CommandResult(
        "build",
        "PASS",
        0,
        build_key=result.key,
        cache_hit=result.cache_hit,
        kernel=result.metadata.kernel.version,
        paths={"output": str(output), "build": str(result.output)},
    )


def cmd_test(args: argparse.Namespace) -> int:
    from kernel_ci.cache.remote import open_store
    from kernel_ci.flow.test import TestOptions, run_tests

    # the user's mistakes first (exit 2), before minutes of building or booting
    project = options.project(args)
    options.check_suites(args.suite, project.suite_path)
    options.check_output(args.output)
    explain.check(args)
    if args.kernel_dir is not None:
        options.check_kernel_dir(args.kernel_dir)
    else:
        options.check_kernel(args.kernel, args.tree, project.sources_lock)
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
        output=options.output(args),
        suites=args.suite,
        suites_dir=project.suite_path,
        modules_dir=project.module_path,
        memory=args.memory,
        cpus=args.cpus,
        accel=args.accel,
        append=args.append,
        boot_timeout=args.boot_timeout,
        idle_timeout=args.idle_timeout,
        timeout=args.timeout,
        keep_overlay=args.keep_overlay,
        gdb_port=args.gdb_port if args.gdb else None,
        guests=args.guests,
        warm_start=not args.cold_boot,
    )
    report = run_tests(test_options)
    from kernel_ci.cache.remote import attach_test_run

    outcome = _outcome_of(report)
    output = options.output(args)
    attach_test_run(store, kernel_dir, output, outcome.name)  # JUnit + console to the service
    code = explain.after_test(args, int(outcome))  # --attribute: retries, baseline, the patch to blame
    if args.json_file is not None:
        _test_result(report, outcome, kernel_dir, output, code).write(args.json_file)
    return code


def _test_result(
    report: RunReport, outcome: Outcome, kernel_dir: Path, output: Path, code: int | None = None
) -> CommandResult:
    """code: the exit code when --attribute changed it (flaky, pre-existing), else the outcome's."""
    from kernel_ci.build.records import BuildMetadata
    from kernel_ci.cli.result import CommandResult, SuiteCounts

    metadata = BuildMetadata.read(kernel_dir)
    counts = [
        SuiteCounts(s.name, s.count("passed"), s.count("failed"), s.count("error"), s.count("skipped"))
        for s in report.suites
    ]
    latest = output / "latest"
    return CommandResult(
        "test",
        outcome.name,
        int(outcome) if code is None else code,
        build_key=metadata.build_key,
        kernel=metadata.kernel.version,
        paths={
            "output": str(output),
            "build": str(kernel_dir),
            "junit": str(output / "junit.xml"),
            "run": str(latest.resolve() if latest.exists() else latest),
        },
        suites=counts,
    )


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
    from kernel_ci.bench.figures import one_bench_at_a_time

    if args.readme:  # no measuring: the README's table from the last bench.json
        bench_json = options.output(args) / "bench" / "bench.json"
        if not bench_json.is_file():
            raise UsageError(f"no {bench_json}: run `kernel-ci bench` first")
        changed = rewrite_readme(bench_json, REPO_ROOT / "README.md")
        console.print(f"README.md {'rewritten' if changed else 'already up to date'} from {bench_json}")
        return 0
    parts = args.part or PARTS
    output = options.output(args) / "bench"
    with one_bench_at_a_time():
        run_bench(output, skip_reference=args.skip_reference, kernel=args.kernel, parts=parts)
    return 0


def _add_test_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("test")
    options.add_machine_options(group, kernel_dir_help="test this build output dir instead of building")
    group.add_argument(
        "--idle-timeout", type=float, default=120.0, help="seconds without console output = hang"
    )
    group.add_argument("--timeout", type=float, default=1800.0, help="global limit for one guest run")
    group.add_argument("--keep-overlay", action="store_true", help="keep the qcow2 overlay (kept on failure)")
    group.add_argument(
        "--guests",
        type=options.guests_count,
        default=None,
        metavar="N|auto",
        help="boot N guests at once, each running a share of the suites (TCG keeps one host core busy per "
        "guest); auto: one per CPU, within the host's free memory, one for short runs (default: auto)",
    )
    group.add_argument(
        "--cold-boot",
        action="store_true",
        help="boot the kernel every run; by default a kernel's first run saves its booted guest (in the "
        "cache, ~80 MB) and later runs restore it, which skips the boot and pytest's import",
    )


OUTPUT_HELP = "output dir (default: out/ in the project, else ./out)"
PROJECT_HELP = (
    "the project directory: kernel-patches/, guest-tests/, kernel-modules/, kconfig/ "
    f"(default: ${PROJECT_ENV}, else the nearest directory from here upwards that has kernel-patches/ and "
    "guest-tests/)"
)


# defaults not worth a help line
_NO_DEFAULT: tuple[object, ...] = (None, False, [], "", argparse.SUPPRESS)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help shows its default, unless the help already says it or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in _NO_DEFAULT:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def _every_parser(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """parser and its subcommands' parsers, depth first."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
                found += _every_parser(child)
    return found


def _conventions(top: argparse.ArgumentParser) -> None:
    """-o/--output and --project also after the subcommand (`kernel-ci test -o DIR --project P`), and
    defaults shown in every help. SUPPRESS as the subcommand's default: an -o or --project given before
    the subcommand is not overwritten by None."""
    for parser in _every_parser(top):
        parser.formatter_class = _HelpFormatter
        for action in parser._actions:
            if action.help is None and action.default not in _NO_DEFAULT:
                action.help = "(default: %(default)s)"  # argparse prints no help line for an empty help
        if parser is not top and "--output" not in parser._option_string_actions:
            parser.add_argument("--output", "-o", type=Path, default=argparse.SUPPRESS, help=OUTPUT_HELP)
        if parser is not top and "--project" not in parser._option_string_actions:
            parser.add_argument("--project", type=Path, default=argparse.SUPPRESS, help=PROJECT_HELP)


def _add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        dest="json_file",
        metavar="FILE",
        type=Path,
        help="also write the result for machines to FILE: outcome, exit code, build key, paths, suite counts",
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kernel-ci", description=__doc__)
    top.add_argument("--output", "-o", type=Path, default=None, help=OUTPUT_HELP)
    top.add_argument("--project", type=Path, default=None, help=PROJECT_HELP)
    sub = top.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="build the kernel (or restore it from the build cache)")
    add_build_options(build)
    build.add_argument(
        "--dry-run",
        action="store_true",
        help="configure and look the build up, then stop: say whether it would be restored from the build "
        "cache or compiled, and on a miss which inputs differ from the nearest cached build",
    )
    build.add_argument("--suite", action="append", help="deprecated, ignored: " + SUITE_NO_LONGER_BUILDS)
    _add_json_option(build)
    build.set_defaults(func=cmd_build)

    test = sub.add_parser("test", help="build (cached), boot in QEMU, run the guest suites, write JUnit")
    add_build_options(test)
    _add_test_options(test)
    explain.add_options(test, on_test=True)
    test.add_argument(
        "--suite",
        action="append",
        help="guest suite to run (repeatable; default: all); it does not change the kernel, which carries "
        "every suite's needs",
    )
    _add_json_option(test)
    test.set_defaults(func=cmd_test)

    repro = sub.add_parser("repro", help="boot the kernel and rootfs of an earlier run again")
    repro.add_argument("run_dir", type=Path)
    repro.add_argument("--interactive", action="store_true", help="attach the console instead of re-running")
    repro.set_defaults(func=cmd_repro)

    bench = sub.add_parser("bench", help="measure build, cache, boot and test times (JSON + table)")
    bench.add_argument(
        "--kernel", default=None, help="version or alias to build (default: the lock file's default)"
    )
    bench.add_argument("--skip-reference", action="store_true", help="skip tuxmake and virtme-ng")
    bench.add_argument(
        "--readme", action="store_true", help="only rewrite README.md's performance table from bench.json"
    )
    bench.add_argument(
        "--part",
        action="append",
        choices=["build", "guest", "cache"],
        help="only these parts (repeatable; default: all three; cache is `kernel-ci cache bench`'s)",
    )
    bench.set_defaults(func=cmd_bench)

    from kernel_ci.cli.commands import register

    register(sub)  # key, matrix, summary, patches
    from kernel_ci.cli.session import register as register_session

    register_session(sub)  # run, shell
    from kernel_ci.cli.bisect import register as register_bisect

    register_bisect(sub)
    from kernel_ci.cli.setuphost import register as register_setup_host

    register_setup_host(sub)  # setup-host
    explain.register(sub)  # attribute
    from kernel_ci.cache.server.cli import register as register_cache

    cache = register_cache(sub)  # cache serve, cache scrub
    _add_cache_bench(cache)
    for name in ("serve", "scrub", "bench"):  # the service's commands need the [server] extra
        command = cache.choices[name]
        command.set_defaults(func=_needs_server(command.get_default("func")))
    _conventions(top)
    return top


SERVER_MODULES = ("starlette", "uvicorn", "boto3", "psycopg")  # pyproject's [server] extra


def _needs_server(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """func, after a check that the service's dependencies are installed: a client install (no [server]
    extra) gets a usage error that says what to install, not an ImportError traceback."""

    def checked(args: argparse.Namespace) -> int:
        missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
        if missing:
            raise UsageError(
                f"the cache service needs {', '.join(missing)}, which a client install leaves out: "
                "pip install 'kernel-ci[server]' (or pipx install 'kernel-ci[server]')"
            )
        return func(args)

    return checked


def cmd_cache_bench(args: argparse.Namespace) -> int:
    from kernel_ci.bench.cache import run_cache_bench
    from kernel_ci.bench.figures import one_bench_at_a_time

    with one_bench_at_a_time():
        run_cache_bench(
            options.output(args) / "bench",
            duration=args.duration,
            connections=args.connections,
            workers=args.workers,
        )
    return 0


def _add_cache_bench(cache: argparse._SubParsersAction) -> None:
    """`cache bench` lives here, not beside `cache serve`: the service (a stage) may not import the bench."""
    bench = cache.add_parser("bench", help="restore time from the service; ccache objects/s vs nginx WebDAV")
    bench.add_argument("--duration", type=float, default=10.0, help="seconds of load per target (wrk)")
    bench.add_argument("--connections", type=int, default=16)
    bench.add_argument(
        "--workers", type=int, default=2, help="worker processes of the service and of nginx (the same)"
    )
    bench.set_defaults(func=cmd_cache_bench)


def raise_open_file_limit() -> None:
    """The soft limit on open files up to the hard one. A user's soft limit is 1024 on Debian, and restoring
    a build entry holds a descriptor per directory of kbuild/ (over a thousand): as a user (not root, whose
    limit is higher) every restore from the shared cache failed with "Too many open files"."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code says what kind of failure it was (core.errors.ExitCode)."""
    args = parser().parse_args(argv)  # a bad option exits 2 here (argparse)
    raise_open_file_limit()
    from kernel_ci.cli.bisect import bisect_exit

    return bisect_exit(args, _run(args))


def _run(args: argparse.Namespace) -> int:
    try:
        args.output = options.output(args)  # resolved once: the commands read args.output
        return int(args.func(args))
    except KernelCIError as exc:  # raised on purpose: its message says what to do, its class the exit code
        from kernel_ci.report.github import report

        report(exc, getattr(args, "kernel", None))  # patch file / target / hunk; annotations in a workflow
        console.print("[bold red]error:[/]", Text(str(exc)))
        _write_error_result(args, exc)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:  # a bug: never a bare traceback that reads as a test failure (1)
        log = _write_traceback(exc, args.output or Path("out"))
        console.print(
            "[bold red]internal error:[/]",
            Text(f"{type(exc).__name__}: {exc}; traceback in {log}"),
        )
        return int(ExitCode.INFRASTRUCTURE)


def _write_error_result(args: argparse.Namespace, exc: KernelCIError) -> None:
    """--json FILE also when the command stopped with an error: a script reads one file either way."""
    path = getattr(args, "json_file", None)
    if path is not None:
        from kernel_ci.cli.result import CommandResult

        code = exc.exit_code
        CommandResult(args.command, code.name, int(code), error=str(exc)).write(path)


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
