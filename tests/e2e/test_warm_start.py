"""Warm start with real QEMU, the real rootfs, kernel, init and runner: the first run of a machine saves
its booted guest, the next restores it; what a run does never reaches a later one; a snapshot QEMU cannot
load is dropped and the run boots instead.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from kernel_ci.guest import qemu, rootfs, warmstart
from tests.e2e.test_guest_boot import (
    RUNNER,
    accel,
    base_image,
    bzimage,
    guest_config,
    make_payload,
    shell_suite,
)

__all__ = ["accel", "base_image", "bzimage"]  # fixtures, imported for pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# What a suite could try to leave for the runs after it: a file on the root filesystem.
LEAVE_SOMETHING = (
    "if [ -e /root/left-by-an-earlier-run ]; then echo FOUND-EARLIER-RUN; else echo CLEAN-ROOT; fi; "
    "echo evil > /root/left-by-an-earlier-run; sync; "
    'echo "guest-clock=$(date +%s)"; echo "$KCI_SUITE" > "$KCI_ARTIFACTS/name.txt"'
)


@pytest.fixture()
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The snapshots of this test only (the rootfs image stays in the shared cache: its path is known)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("KERNEL_CI_CACHE", str(cache))
    return cache


def warm_run(
    where: Path, kernel: Path, base: rootfs.RootfsImage, how: qemu.Accel, name: str
) -> tuple[qemu.QemuConfig, qemu.GuestRun, str]:
    payload = make_payload(where / "payload", [shell_suite(name, LEAVE_SOMETHING)])
    cfg = guest_config(where, kernel, base, how, payload)
    cfg = replace(cfg, warm=qemu.warm_folder(cfg, base.path, RUNNER))
    run = qemu.run_guest(cfg)
    assert run.end == "poweroff", run.detail
    return cfg, run, run.console_log.read_text()


def test_the_next_run_restores_the_saved_guest_and_sees_nothing_of_the_first(
    tmp_path: Path, bzimage: Path, base_image: rootfs.RootfsImage, accel: qemu.Accel, private_cache: Path
) -> None:
    first_cfg, first, first_console = warm_run(tmp_path / "first", bzimage, base_image, accel, "first")
    assert first_cfg.warm is not None and warmstart.ready(first_cfg.warm)
    assert "-incoming" not in first.command and warmstart.WARM_READY in first_console
    assert "[first] CLEAN-ROOT" in first_console

    before = time.time()
    cfg, run, console = warm_run(tmp_path / "second", bzimage, base_image, accel, "second")
    assert cfg.warm == first_cfg.warm  # the same machine: the same snapshot
    assert "-incoming" in run.command and "-incoming" in (cfg.run_dir / "qemu-cmdline.sh").read_text()
    # the boot is in the log (replayed), then this run's own suite, from this run's payload and results
    assert console.index("Linux version") < console.index(warmstart.WARM_READY) < console.index("[second]")
    assert (cfg.results_dir / "second" / "artifacts" / "name.txt").read_text() == "second\n"
    assert "[second] CLEAN-ROOT" in console  # the first run's file is not in the restored guest's disk
    assert run.boot_seconds is not None and run.first_test_seconds is not None
    # the restored guest took the host's clock (the snapshot's is from the first run)
    clock = int(console.split("[second] guest-clock=")[1].split()[0])
    assert before - 5 <= clock <= time.time() + 5

    # a kept overlay of a restored run is rebased onto the rootfs image: it outlives the snapshot
    qemu.rebase_overlay(cfg.overlay, base_image.path)
    assert cfg.warm is not None
    warmstart.discard(cfg.warm)
    payload = make_payload(tmp_path / "third" / "payload", [shell_suite("third", LEAVE_SOMETHING)])
    third = replace(
        guest_config(tmp_path / "third", bzimage, base_image, accel, payload), overlay=cfg.overlay
    )
    kept = qemu.run_guest(third)
    assert kept.end == "poweroff", kept.detail
    assert "[third] FOUND-EARLIER-RUN" in kept.console_log.read_text()  # the second run's file, kept


def test_a_snapshot_qemu_cannot_load_is_dropped_and_the_run_boots(
    tmp_path: Path, bzimage: Path, base_image: rootfs.RootfsImage, accel: qemu.Accel, private_cache: Path
) -> None:
    cfg, _, _ = warm_run(tmp_path / "first", bzimage, base_image, accel, "first")
    assert cfg.warm is not None
    state = cfg.warm / warmstart.STATE
    with state.open("r+b") as handle:  # a damaged stream: QEMU's load fails part way
        handle.truncate(state.stat().st_size // 3)

    again, run, console = warm_run(tmp_path / "second", bzimage, base_image, accel, "second")
    assert "-incoming" not in run.command  # booted
    assert console.count("Linux version") == 1 and "[second] CLEAN-ROOT" in console
    assert again.warm is not None and warmstart.ready(again.warm)  # and saved a good one again
    _, restored, _ = warm_run(tmp_path / "third", bzimage, base_image, accel, "third")
    assert "-incoming" in restored.command and restored.end == "poweroff"
