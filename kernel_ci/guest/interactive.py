"""A guest to work in: `kernel-ci run -- CMD` and `kernel-ci shell` on the built kernel.

The guest boots the same rootfs image and kci-init as `kernel-ci test`; only the payload differs: it
carries kernel_ci/data/guest/runner/kci-session.py under the runner's name (so neither kci-init nor the cached
image changes), a session.json saying what to run, and the build's installed modules. A run's stdout,
stderr and exit status come back through the results share as plain files; the guest is untrusted, so
what is read back is capped and the status must be a number 0-255, or the run is an infrastructure
failure (exit 7), never a made-up command status.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from kernel_ci.core import proc
from kernel_ci.core.errors import InfrastructureError
from kernel_ci.core.paths import GUEST_DATA
from kernel_ci.guest import qemu
from kernel_ci.guest.protocol import EndKind

SESSION_RUNNER = GUEST_DATA / "runner" / "kci-session.py"
RUNNER_NAME = "kci-runner.py"  # what kci-init execs from the payload share
OUTPUT_LIMIT = 16 * 2**20  # bytes of the command's stdout (and of its stderr) shown on the host


class GuestSessionError(InfrastructureError):
    """The guest did not boot, timed out or died before the command's status came back (exit 7)."""


@dataclass(frozen=True)
class RunResult:
    status: int
    stdout: bytes
    stderr: bytes
    truncated: bool
    seconds: float
    boot_seconds: float | None

    def to_json(self) -> dict[str, object]:
        return {
            "status": self.status,
            "truncated": self.truncated,
            "seconds": round(self.seconds, 3),
            "boot_seconds": None if self.boot_seconds is None else round(self.boot_seconds, 3),
        }


def make_payload(dest: Path, kernel_dir: Path, mode: str, argv: list[str], stdin: bytes | None) -> Path:
    """The read-only payload of a session: runner, session.json, modules, and the command's stdin."""
    if mode not in ("run", "shell"):
        raise ValueError(f"mode must be run or shell, not {mode!r}")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SESSION_RUNNER, dest / RUNNER_NAME)
    (dest / "session.json").write_text(json.dumps({"mode": mode, "argv": argv}) + "\n")
    (dest / "plan.json").write_text("{}\n")  # kci-init passes it to the runner, which ignores it
    modules = kernel_dir / "modules"
    if modules.is_dir():
        shutil.copytree(modules, dest / "modules", symlinks=True)
    if stdin is not None:
        (dest / "stdin").write_bytes(stdin)
    return dest


def read_capped(path: Path, limit: int = OUTPUT_LIMIT) -> tuple[bytes, bool]:
    """At most limit bytes of a file the guest wrote (a plain file: the share is mapped-xattr)."""
    if not path.is_file():
        return b"", False
    with path.open("rb") as f:
        data = f.read(limit + 1)
    return data[:limit], len(data) > limit


def parse_status(text: str) -> int:
    """The guest's status file: one decimal number 0-255, anything else is not a command status."""
    value = text.strip()
    # ASCII digits only: str.isdigit() and int() also take other scripts' digits ("\uff13" is 3)
    if not re.fullmatch(r"[0-9]{1,3}", value) or int(value) > 255:
        raise GuestSessionError(f"the guest wrote a malformed exit status {value[:40]!r}")
    return int(value)


def collect(results_dir: Path, run: qemu.GuestRun) -> RunResult:
    """The command's result, or GuestSessionError naming the infrastructure failure."""
    status_file = results_dir / "status"
    # Only a guest that powered off by itself has a status to report. After a boot timeout, a timeout or a
    # hang, the guest runs on while its stacks are dumped (qemu._sysrq_dump) and may still write one: the
    # run was already declared failed, so that late status would read as the command's (exit 0 for `true`).
    if run.end != EndKind.POWEROFF or not status_file.is_file():
        raise GuestSessionError(
            f"no exit status from the guest ({run.end}: {run.detail.splitlines()[0] if run.detail else ''}); "
            f"console: {run.console_log}"
        )
    raw, _ = read_capped(status_file, 16)
    status = parse_status(raw.decode("ascii", errors="replace"))
    stdout, cut_out = read_capped(results_dir / "stdout")
    stderr, cut_err = read_capped(results_dir / "stderr")
    return RunResult(status, stdout, stderr, cut_out or cut_err, run.seconds, run.boot_seconds)


def session_config(
    bzimage: Path, base_image: Path, payload_dir: Path, run_dir: Path, accel: qemu.Accel, **tuning: object
) -> qemu.QemuConfig:
    overlay = qemu.create_overlay(base_image, run_dir)
    results = run_dir / "results"
    results.mkdir(exist_ok=True)
    return qemu.QemuConfig(
        kernel=bzimage,
        overlay=overlay,
        payload_dir=payload_dir,
        results_dir=results,
        run_dir=run_dir,
        accel=accel,
        **tuning,  # type: ignore[arg-type]  # memory, cpus, extra_append, timeouts: QemuConfig checks names
    )


def run_command(cfg: qemu.QemuConfig, echo_console: bool = False) -> RunResult:
    """Boot, run the session's command, collect its result; the overlay is dropped afterwards."""
    sink = (lambda line: print(line, file=sys.stderr)) if echo_console else None
    try:
        return collect(cfg.results_dir, qemu.run_guest(cfg, on_line=sink))
    finally:
        cfg.overlay.unlink(missing_ok=True)


def gdb_command(vmlinux: Path | None, gdb_script: Path | None, port: int) -> str:
    """The gdb command line that attaches to QEMU's gdbstub on port: vmlinux (the build keeps it as
    vmlinux.xz; the caller unpacks it) and the kernel's gdb scripts (vmlinux-gdb.py: the lx-* commands)."""
    argv = ["gdb", str(vmlinux) if vmlinux is not None else "vmlinux"]
    if gdb_script is not None:
        argv += ["-iex", f"add-auto-load-safe-path {gdb_script.parent}", "-ex", f"source {gdb_script}"]
    argv += ["-ex", f"target remote 127.0.0.1:{port}"]
    return shlex.join(argv)


def interactive_argv(cfg: qemu.QemuConfig) -> list[str]:
    """QEMU's argv for a shell: the console on this terminal; the monitor stays on its socket."""
    return qemu.build_command(cfg)


def attach(cfg: qemu.QemuConfig) -> int:
    """Run QEMU in the foreground on this terminal (it sets the tty raw itself; Ctrl-C goes to the guest,
    Ctrl-A x quits QEMU) and return its exit status once the guest powers off."""
    try:
        return proc.foreground(interactive_argv(cfg))
    finally:
        cfg.overlay.unlink(missing_ok=True)
