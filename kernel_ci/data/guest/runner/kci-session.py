#!/usr/bin/env python3
# kci-session.py: PID 1 of a `kernel-ci run` / `kernel-ci shell` guest, exec'd by kci-init in place of
# kci-runner.py (the payload share carries this file under that name, so kci-init and the cached rootfs
# image are unchanged). Reads /kci/session.json, makes the build's modules visible under /lib/modules,
# runs the one command (its output and status to the results share) or a login shell on the serial
# console, then syncs and reboots: QEMU runs with -no-reboot, so that ends the guest.
import contextlib
import ctypes
import json
import os
import subprocess
import sys
import time

RB_AUTOBOOT = 0x01234567


def reboot() -> None:
    os.sync()
    ctypes.CDLL(None).reboot(RB_AUTOBOOT)
    while True:  # PID 1 must not exit
        time.sleep(3600)


def dev_links() -> None:
    """What udev would create (the guest has none; kci-init leaves it to PID 1's Python, where it costs
    no process): /dev/fd and the standard streams."""
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):  # fmt: skip
        with contextlib.suppress(FileExistsError):
            os.symlink(target, f"/dev/{name}")


def modules() -> None:
    """The build's modules_install output, bind-mounted read-only where modprobe looks."""
    src = "/kci/modules/lib/modules"
    if os.path.isdir(src):
        os.makedirs("/lib/modules", exist_ok=True)
        subprocess.call(["mount", "--bind", "-o", "ro", src, "/lib/modules"])


def run_command(argv: list[str]) -> None:
    stdin_file = "/kci/stdin" if os.path.exists("/kci/stdin") else os.devnull
    print("KCI-SESSION: run", flush=True)
    with (
        open(stdin_file, "rb") as fin,
        open("/kci-results/stdout", "wb") as out,
        open("/kci-results/stderr", "wb") as err,
    ):
        try:
            status = subprocess.call(argv, stdin=fin, stdout=out, stderr=err, cwd="/root")
        except OSError as exc:
            err.write(f"kernel-ci run: cannot run {argv[0]}: {exc}\n".encode())
            status = 127
    if status < 0:  # killed by a signal: the shell's convention
        status = 128 - status
    with open("/kci-results/status.tmp", "w") as f:
        f.write(f"{status}\n")
    os.rename("/kci-results/status.tmp", "/kci-results/status")
    print(f"KCI-SESSION: status {status}", flush=True)


def shell() -> None:
    """bash on ttyS0 as the session leader with it as controlling terminal: job control and Ctrl-C
    (QEMU passes it through: signal=off) reach the guest's foreground job, not kernel-ci."""
    print("KCI-SESSION: shell (exit or Ctrl-D powers the guest off)", flush=True)
    env = dict(os.environ, TERM=os.environ.get("KCI_TERM", "linux"), PS1="kci-guest:\\w# ")
    argv = ["setsid", "--ctty", "--wait", "/bin/bash", "-i"]
    with open("/dev/ttyS0", "r+b", buffering=0) as tty:
        subprocess.call(argv, stdin=tty, stdout=tty, stderr=tty, env=env, cwd="/root")


def main() -> None:
    try:
        dev_links()
        with open("/kci/session.json") as f:
            session = json.load(f)
        modules()
        if session["mode"] == "run":
            run_command(session["argv"])
        else:
            shell()
    except Exception as exc:  # PID 1: report and reboot, never exit (the kernel would panic)
        print(f"KCI-SESSION: failed: {exc}", file=sys.stderr, flush=True)
    reboot()


main()
