"""Warm start: a guest restored from a snapshot of the same kernel's earlier boot instead of booted again.

Under TCG a Python suite's first test comes after the boot (~1.5 s), the runner's start and pytest's
import (~3 s); a developer rerunning one edited suite on an unchanged kernel paid all of it every time.
With a warm start, the first run of a kernel boots it with `kci.warm=1` on its command line: the runner
unmounts the 9p shares (QEMU refuses to migrate a guest with one mounted), imports pytest, prints
`KCI-WARM: ready` and waits. The host then saves the guest (a QEMU migration stream into a file, ~80 MB,
~0.5 s), a copy of its disk overlay and the boot's console lines into the cache, and sends `KCI-GO <ns>`
on the console. Later runs of the same kernel, rootfs, runner and machine start QEMU with `-incoming` from
that file (under a second) and send `KCI-GO` as soon as the guest runs: the runner takes the host's clock,
mounts the shares of *this* run and goes on as after a boot, forking its Python suites from the process
that has pytest imported.

What the snapshot holds is the guest before any payload reached it (the shares are unmounted; the plan is
read after GO): no suite's work is in it. The boot's console lines are replayed into each restored run's
console log and scanner, so a WARN or an oops at boot is reported on every run, as on a cold boot.

QEMU's internal snapshots (savevm) live inside the qcow2 they are taken in, and every run needs a fresh
overlay; a migration stream restores into any overlay whose backing chain has the saved disk below it.
This module is the store (one folder per key, written whole, the last few kept) and the two exchanges with
QEMU (save at the ready mark, wait for a restored guest to run); qemu.py decides when.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from kernel_ci.core.errors import InfrastructureError
from kernel_ci.core.files import is_kept, keep_folder
from kernel_ci.core.paths import cache_dir
from kernel_ci.guest import protocol

WARM_ARG = protocol.WARM_ARG  # on the kernel command line: the runner waits for GO (kci-runner.py)
WARM_READY = protocol.WARM_READY
GO_PREFIX = protocol.GO_PREFIX
KEEP = 3  # snapshots kept (~80 MB each): the kernels a developer switches between
STATE = "state"  # the migration stream
DISK = "disk.qcow2"  # the overlay as it was when the stream ended (its backing file is the rootfs image)
BOOT_LOG = "boot.log"  # the console up to WARM_READY
MIGRATE_TIMEOUT = 60.0
RUNNING_TIMEOUT = 30.0

Monitor = Callable[[str], str]  # one human-monitor command -> its reply (qemu.monitor_command)


def folder(parts: Sequence[str]) -> Path:
    """The store folder of a guest made of parts (the QEMU command without its run's paths, the digests
    of the kernel, runner and rootfs image, QEMU's version): one snapshot per distinct machine."""
    key = hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()[:32]
    return cache_dir("warm") / key


def ready(stored: Path) -> bool:
    return is_kept(stored) and (stored / STATE).is_file() and (stored / DISK).is_file()


def boot_lines(stored: Path) -> list[str]:
    return (stored / BOOT_LOG).read_text(errors="replace").splitlines()


def discard(stored: Path) -> None:
    shutil.rmtree(stored, ignore_errors=True)


def go_line(now_ns: int | None = None) -> bytes:
    """What the host types on the guest's console to start a waiting runner: GO and the host's clock."""
    return f"{GO_PREFIX} {time.time_ns() if now_ns is None else now_ns}\n".encode()


def send_go(stdin: IO[bytes] | None) -> None:
    if stdin is None:
        return
    try:
        stdin.write(go_line())
        stdin.flush()
    except OSError:
        pass  # QEMU is gone: its end is the run's verdict


class SaveError(InfrastructureError):
    """The guest could not be saved; the run goes on as a cold boot's."""


_SAVING = threading.Lock()  # the guests of one run boot the same machine at once: one saves it


def save(stored: Path, monitor: Monitor, overlay: Path, boot: Sequence[str]) -> bool:
    """Save the guest waiting at its ready mark into stored (written whole, or not at all) and let it run
    on; False when stored was there already. Raises SaveError with QEMU's words when the migration fails;
    the guest runs on either way."""
    with _SAVING:
        if ready(stored):
            return False
        try:
            keep_folder(stored, lambda staging: _fill(staging, monitor, overlay, boot), KEEP)
        finally:
            monitor("cont")  # after a completed (or failed) migration the guest is paused
    return True


def _fill(staging: Path, monitor: Monitor, overlay: Path, boot: Sequence[str]) -> None:
    staging.mkdir(parents=True)
    try:
        _migrate(staging, monitor, overlay, boot)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # no half snapshot left behind
        raise


def _migrate(staging: Path, monitor: Monitor, overlay: Path, boot: Sequence[str]) -> None:
    target = staging / STATE
    if any(c in str(target) for c in '"\n\\'):
        raise SaveError(f"cannot name {target} in a monitor command")
    reply = monitor(f'migrate "exec:cat > {shlex.quote(str(target))}"')
    if reply:
        raise SaveError(reply)
    deadline = time.monotonic() + MIGRATE_TIMEOUT
    while True:
        status = _migration_status(monitor("info migrate"))
        if status == "completed":
            break
        if status.startswith(("failed", "cancelled")) or time.monotonic() > deadline:  # "failed (why)" too
            raise SaveError(f"migration {status or 'did not complete'}")
        time.sleep(0.05)
    # QEMU flushed and released the disk when the stream ended: this copy is the disk the stream expects.
    shutil.copyfile(overlay, staging / DISK)
    (staging / BOOT_LOG).write_text("".join(f"{line}\n" for line in boot))


def _migration_status(info: str) -> str:
    for line in info.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "Migration status":
            return value.strip()
    return ""


def wait_running(monitor: Monitor, alive: Callable[[], bool], timeout: float = RUNNING_TIMEOUT) -> bool:
    """Whether a QEMU started with -incoming got its guest running (the stream loaded) within timeout."""
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        try:
            if "running" in monitor("info status"):
                return True
        except OSError:
            pass  # the monitor socket is not there yet
        time.sleep(0.05)
    return False
