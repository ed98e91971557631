"""`kernel-ci run -- CMD` and `kernel-ci shell`: the built kernel (the same build cache entry as
`kernel-ci test`) booted on the Debian rootfs with its modules, for one command or an interactive shell.

Exit status of `run`: the command's own (0-255) when it ran; 7 (infrastructure) with an "error:" line on
stderr when the guest did not boot, timed out or returned no status. A command that itself exits 7 is
told apart by that message, or by `--json`, whose "status" is present only when the command ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from kernel_ci.cli import options
from kernel_ci.core.console import console

if TYPE_CHECKING:
    from kernel_ci.guest.qemu import QemuConfig


def _kernel_dir(args: argparse.Namespace) -> Path:
    """--kernel-dir as given, else the build the options ask for (a build cache hit when already built)."""
    if args.kernel_dir is not None:
        options.check_kernel_dir(args.kernel_dir)
        return Path(args.kernel_dir)
    options.check_kernel(args.kernel)
    from kernel_ci.cache.remote import open_store
    from kernel_ci.flow.build import build

    settings = options.settings(args)
    result = build(options.build_request(args, settings.ccache_remote), store=open_store(settings))
    console.log(f"kernel {result.metadata.kernel.release} ({'cache hit' if result.cache_hit else 'built'})")
    return result.output


def _prepare(
    args: argparse.Namespace, mode: str, argv: list[str], stdin: bytes | None
) -> tuple[QemuConfig, Path]:
    from kernel_ci.flow.test import GUEST_INIT, ROOTFS_RECIPE
    from kernel_ci.guest import interactive, qemu, rootfs
    from kernel_ci.host import setup as hostsetup

    kernel_dir = _kernel_dir(args)
    hostsetup.prepare_test_host()
    base = rootfs.ensure_rootfs(ROOTFS_RECIPE, GUEST_INIT)
    runs = args.output / "sessions"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    run_dir = Path(tempfile.mkdtemp(prefix=f"{stamp}-{mode}-", dir=runs))
    payload = interactive.make_payload(run_dir / "payload", kernel_dir, mode, argv, stdin)
    bzimage = kernel_dir / "bzImage"
    accel = qemu.choose_accelerator(bzimage, args.accel)
    append = tuple(args.append.split()) + (("nokaslr",) if args.gdb else ())
    extra = ("-gdb", f"tcp:127.0.0.1:{args.gdb_port}") if args.gdb else ()
    if args.gdb:
        from kernel_ci.build import debuginfo
        from kernel_ci.flow.test import gdb_command

        vmlinux = debuginfo.unpack_vmlinux(kernel_dir, run_dir)
        console.print(f"[bold]gdb[/]: {gdb_command(kernel_dir, vmlinux, args.gdb_port)}", soft_wrap=True)
    cfg = interactive.session_config(
        bzimage, base.path, payload, run_dir, accel,
        memory=args.memory, cpus=args.cpus, extra_append=append,
        boot_timeout=args.boot_timeout, idle_timeout=args.timeout, global_timeout=args.timeout,
        extra_args=extra,
    )  # fmt: skip
    return cfg, kernel_dir


def cmd_run(args: argparse.Namespace) -> int:
    from kernel_ci.guest import interactive

    argv = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        from kernel_ci.core.errors import UsageError

        raise UsageError("kernel-ci run: no command; e.g. kernel-ci run -- uname -r")
    stdin = None if sys.stdin.isatty() else sys.stdin.buffer.read(interactive.OUTPUT_LIMIT)
    return _run(args, argv, stdin)


def _run(args: argparse.Namespace, argv: list[str], stdin: bytes | None) -> int:
    from kernel_ci.guest import interactive

    cfg, _ = _prepare(args, "run", argv, stdin)
    result = interactive.run_command(cfg, echo_console=args.console)
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()
    if result.truncated:
        console.print(f"[yellow]output cut at {interactive.OUTPUT_LIMIT} bytes[/]")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json()) + "\n")
    return result.status


def cmd_shell(args: argparse.Namespace) -> int:
    """A terminal gets the guest's console; piped input runs as a script (`bash -s`), as `run` would."""
    from kernel_ci.guest import interactive

    if not sys.stdin.isatty():
        args.json = None
        return _run(args, ["/bin/bash", "-s"], sys.stdin.buffer.read(interactive.OUTPUT_LIMIT))
    cfg, _ = _prepare(args, "shell", [], None)
    console.print("[bold]guest shell[/]: exit or Ctrl-D powers the guest off; Ctrl-A x kills QEMU")
    interactive.attach(cfg)
    return 0


def _add_guest_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("guest")
    options.add_machine_options(group, kernel_dir_help="boot this build output dir instead of building")
    group.add_argument("--timeout", type=float, default=3600.0, help="limit for the whole guest session")


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="boot the built kernel, run one command in the guest, return its status")
    options.add_build_options(run)
    _add_guest_options(run)
    run.add_argument("--json", type=Path, help="write {status, seconds, ...} here (no status: infra failure)")
    run.add_argument("--console", action="store_true", help="echo the guest console to stderr")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    run.set_defaults(func=cmd_run)

    shell = sub.add_parser("shell", help="boot the built kernel with a root shell on this terminal")
    options.add_build_options(shell)
    _add_guest_options(shell)
    shell.set_defaults(func=cmd_shell, console=False)
