"""The options shared by several subcommands, what they mean as a BuildRequest, and their up-front checks.

A module of its own so that cli.main (the parser, the error handling) and cli.commands (key, matrix,
summary, patches) both use it without importing each other.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from kernel_ci.core import paths
from kernel_ci.core.errors import UsageError
from kernel_ci.core.settings import Settings

if TYPE_CHECKING:  # imported when called: `kernel-ci --help` does not load the build stage
    from kernel_ci.flow.build import BuildRequest


def add_build_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("build")
    group.add_argument(
        "--kernel", help="version or alias from kernel-sources.lock.toml (default: its default)"
    )
    group.add_argument(
        "--series",
        action="append",
        help="patch series under kernel-patches/ (repeatable; default: all, or none with --tree; "
        "'none' for a vanilla kernel)",
    )
    group.add_argument(
        "--tree",
        type=Path,
        help="build YOUR kernel tree (a git checkout or a plain directory) instead of a lock file tarball: "
        "mounted read-only, built out of tree with a persistent object dir, keyed by its content",
    )
    group.add_argument(
        "--patches",
        type=Path,
        help="apply a series from outside, strictly (no fuzz), after any --series: an mbox, what `b4 am` "
        "wrote (.mbx, its cover letter left out) or a directory of git format-patch files",
    )
    group.add_argument(
        "--bisect",
        action="store_true",
        help="exit as `git bisect run` expects (0 good, 1 bad, 125 skip for a build or infrastructure "
        "failure); implied when --tree is in the middle of a git bisect",
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


def project(args: argparse.Namespace) -> paths.Project:
    """The project the command works on: --project, $KERNEL_CI_PROJECT, or found from the current directory
    upwards; a usage error (exit 2) when there is none."""
    return paths.require_project(getattr(args, "project", None))


def output(args: argparse.Namespace) -> Path:
    """-o/--output, else `out/` in the project (wherever the command runs from), else ./out."""
    if args.output is not None:
        return Path(args.output)
    found = paths.find_project(getattr(args, "project", None))
    return found.output if found is not None else Path("out")


def add_machine_options(group: argparse._ArgumentGroup, *, kernel_dir_help: str) -> None:
    """The guest machine's options, one definition for `test`, `run` and `shell`."""
    group.add_argument("--kernel-dir", type=Path, help=kernel_dir_help)
    group.add_argument("--memory", default="1024M", help="the guest's RAM, as QEMU's -m takes it")
    group.add_argument("--cpus", type=int, default=2, help="the guest's vCPUs")
    group.add_argument(
        "--accel",
        choices=["auto", "kvm", "tcg"],
        default="auto",
        help="auto: KVM when a probe boot through it works, else TCG",
    )
    group.add_argument("--append", default="", help="extra kernel command line arguments")
    group.add_argument("--boot-timeout", type=float, default=120.0, help="seconds to reach the guest's init")
    group.add_argument(
        "--gdb",
        action="store_true",
        help="QEMU's gdbstub on 127.0.0.1 (nokaslr); prints a gdb command that loads vmlinux and the gdb "
        "scripts",
    )
    group.add_argument("--gdb-port", type=int, default=1234, help="gdbstub port for --gdb")


def guests_count(value: str) -> int | None:
    """--guests N|auto for argparse: its own words on a bad value (argparse hides a ValueError's)."""
    from kernel_ci.guest import placement

    try:
        return placement.parse_guests(value)
    except placement.GuestsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def settings(args: argparse.Namespace) -> Settings:
    """The run's settings, read once from the flags, the environment and the config file."""
    return Settings.load(
        getattr(args, "cache_url", None),
        trusted_ccache_writes=getattr(args, "trusted_ccache_writes", False),
    )


def build_request(args: argparse.Namespace, ccache_remote: str | None = None) -> BuildRequest:
    """The build the options ask for. Never the suites: the kernel carries every suite's needs, so that
    `kernel-ci test --suite X` tests the very kernel a full `kernel-ci test` (or `kernel-ci build`) built."""
    from kernel_ci.flow.build import BuildRequest

    where = project(args)
    return BuildRequest(
        project=where,
        suites_dir=where.suite_path,
        kernel=args.kernel,
        series=series(args),
        fragments=args.fragment,
        output=output(args) / "build",
        jobs=args.jobs,
        use_cache=not args.no_cache,
        use_ccache=not args.no_ccache,
        fresh=args.fresh,
        ccache_remote=ccache_remote,
        tree=getattr(args, "tree", None),
        patches=getattr(args, "patches", None),  # (commands without --tree build from the lock file)
    )


def series(args: argparse.Namespace) -> list[str] | None:
    """--series as the pipeline takes it: None = every series; 'none' alone = a vanilla kernel."""
    return None if args.series is None else [s for s in args.series if s != "none"]


SUITE_NO_LONGER_BUILDS = (
    "--suite no longer changes the kernel: every build carries every guest suite's kconfig and kselftests, "
    "so this is the kernel `kernel-ci test` tests; choose the suites to run with `kernel-ci test --suite`"
)


def warn_suite_ignored(args: argparse.Namespace) -> None:
    """`build --suite` / `key --suite` are accepted (scripts that pass them keep working) and ignored."""
    if getattr(args, "suite", None):
        from kernel_ci.core.console import warn

        warn(f"{SUITE_NO_LONGER_BUILDS} (ignored: --suite {' --suite '.join(args.suite)})")


# What a build output directory must hold for `kernel-ci test --kernel-dir` to boot and report it.
KERNEL_DIR_FILES = ("bzImage", "metadata.json")


def check_kernel(version: str | None, tree: Path | None = None, lock: Path = paths.SOURCES_LOCK) -> None:
    """An unknown --kernel is the user's mistake (exit 2), found before Docker or the network is touched."""
    from kernel_ci.build import source

    if tree is not None:
        from kernel_ci.build import tree as usertree

        if version is not None:
            raise UsageError("--kernel and --tree both name the source: give one of them")
        usertree.kernel_version(tree.expanduser().resolve())  # not a kernel tree: exit 2 before building
        return

    source.load_lock(lock).candidates(version)  # raises UnknownVersionError (a UsageError)


def check_output(output: Path) -> None:
    """--output must be a directory this user can create and write, found before minutes of building: as a
    user kernel-ci writes only where that user may (its containers run as the user, and their mounts never
    create a missing directory: kernel_ci.host.docker)."""
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UsageError(f"--output {output}: cannot create it ({reason}); pick a directory you own") from exc
    if not os.access(output, os.W_OK | os.X_OK):
        raise UsageError(f"--output {output}: not writable by you; pick a directory you own")


def check_kernel_dir(kernel_dir: Path) -> None:
    """--kernel-dir must be a build output (kernel-ci build's out/build), not a typo or a source tree."""
    if not kernel_dir.is_dir():
        raise UsageError(f"--kernel-dir {kernel_dir}: no such directory (pass a `kernel-ci build` output)")
    missing = [name for name in KERNEL_DIR_FILES if not (kernel_dir / name).is_file()]
    if missing:
        raise UsageError(
            f"--kernel-dir {kernel_dir}: not a kernel-ci build output (no {', '.join(missing)}); "
            "pass the output directory of `kernel-ci build` (default out/build)"
        )


def check_suites(names: list[str] | None, root: Path | tuple[Path, ...] = paths.SUITE_PATH) -> None:
    """Every --suite names a suite folder (exit 2 otherwise), checked before minutes of building."""
    if names:
        from kernel_ci.guest import suites

        suites.load_suites(root, names)  # raises ManifestError (a UsageError) naming the unknown ones


def check_run_dir(run_dir: Path) -> None:
    """`repro RUN_DIR` takes one run of `kernel-ci test` (out/latest, out/runs/<time>): it holds run.json."""
    if not (run_dir / "run.json").is_file():
        raise UsageError(
            f"{run_dir}: not a kernel-ci test run (no run.json); e.g. out/latest or out/runs/<time>"
        )
