"""Warm start's host-side rules without a boot (tests/e2e/test_warm_start.py saves and restores for real):
which machine a snapshot belongs to, what the guest is told, and the runner's side of GO on a real pty."""

from __future__ import annotations

import importlib.util
import os
import select
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from kernel_ci.core.paths import GUEST_RUNNER
from kernel_ci.guest import qemu, warmstart


@pytest.fixture()
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[qemu.QemuConfig, Path, Path]:
    monkeypatch.setenv("KERNEL_CI_CACHE", str(tmp_path / "cache"))
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"kernel 1")
    runner = tmp_path / "kci-runner.py"
    runner.write_text("# runner 1\n")
    base = tmp_path / "rootfs.qcow2"
    base.write_bytes(b"image")
    run = tmp_path / "runs" / "one"
    cfg = qemu.QemuConfig(kernel, run / "overlay.qcow2", run / "payload", run / "results", run)
    return cfg, base, runner


def test_a_snapshot_belongs_to_the_machine_not_to_the_run(
    machine: tuple[qemu.QemuConfig, Path, Path],
) -> None:
    cfg, base, runner = machine
    folder = qemu.warm_folder(cfg, base, runner)
    other_run = cfg.run_dir.with_name("two")
    same = replace(
        cfg,
        overlay=other_run / "o.qcow2",
        payload_dir=other_run / "p",
        results_dir=other_run / "r",
        run_dir=other_run,
    )
    assert qemu.warm_folder(same, base, runner) == folder
    assert qemu.warm_folder(replace(cfg, memory="2048M"), base, runner) != folder
    assert qemu.warm_folder(replace(cfg, extra_append=("nokaslr",)), base, runner) != folder
    cfg.kernel.write_bytes(b"kernel 2")
    assert qemu.warm_folder(cfg, base, runner) != folder
    st = cfg.kernel.stat()
    cfg.kernel.write_bytes(b"kernel 3")  # same size, mtime put back: the digest kept per process is not used
    os.utime(cfg.kernel, ns=(st.st_atime_ns, st.st_mtime_ns))
    kernel_3 = qemu.warm_folder(cfg, base, runner)
    assert kernel_3 != folder and kernel_3 == qemu.warm_folder(cfg, base, runner)
    cfg.kernel.write_bytes(b"kernel 1")
    runner.write_text("# runner 2\n")
    assert qemu.warm_folder(cfg, base, runner) != folder
    runner.write_text("# runner 1\n")
    base.write_bytes(b"another image")
    assert qemu.warm_folder(cfg, base, runner) != folder
    base.write_bytes(b"image")
    assert not warmstart.ready(folder)  # nothing saved: a cold boot


def test_the_same_kernel_in_another_output_dir_shares_the_snapshot(
    machine: tuple[qemu.QemuConfig, Path, Path], tmp_path: Path
) -> None:
    """A build restored into another output dir (-o, a CI job's workspace, the bench's) is the same kernel:
    it must not boot cold and save a snapshot of its own."""
    cfg, base, runner = machine
    elsewhere = tmp_path / "other-output" / "build" / "bzImage"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_bytes(cfg.kernel.read_bytes())
    here = qemu.warm_folder(cfg, base, runner)
    assert qemu.warm_folder(replace(cfg, kernel=elsewhere), base, runner) == here
    elsewhere.write_bytes(b"another kernel")
    assert qemu.warm_folder(replace(cfg, kernel=elsewhere), base, runner) != here


def test_only_a_warm_guest_is_told_to_wait(machine: tuple[qemu.QemuConfig, Path, Path]) -> None:
    cfg, base, runner = machine
    assert warmstart.WARM_ARG not in qemu.kernel_append(cfg).split()
    warm = replace(cfg, warm=qemu.warm_folder(cfg, base, runner))
    assert qemu.kernel_append(warm).split()[-1] == warmstart.WARM_ARG


def test_a_half_written_snapshot_is_not_ready(tmp_path: Path) -> None:
    stored = tmp_path / "warm" / "k"
    stored.mkdir(parents=True)
    (stored / warmstart.STATE).write_bytes(b"stream")
    (stored / warmstart.DISK).write_bytes(b"disk")
    assert not warmstart.ready(stored)  # no completion mark: a save that did not finish
    (stored / ".kci-reuse-complete").write_text("")
    assert warmstart.ready(stored)
    (stored / warmstart.DISK).unlink()
    assert not warmstart.ready(stored)


@pytest.mark.parametrize(
    ("info", "status"),
    [
        ("globals:\nstore-global-state: on\nMigration status: completed\ntotal time: 530 ms", "completed"),
        ("Migration status: active\n", "active"),
        ("Migration status: failed (Error)\n", "failed (Error)"),
        ("", ""),
    ],
)
def test_the_migration_status_is_read_from_info_migrate(info: str, status: str) -> None:
    assert warmstart._migration_status(info) == status


def _runner_module():
    spec = importlib.util.spec_from_file_location("kci_runner_warm", GUEST_RUNNER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_runner_waits_for_go_on_its_console_without_echoing_it(capfd: pytest.CaptureFixture[str]) -> None:
    """On a real terminal: the runner says it is ready, ignores other lines, takes the host's clock from
    GO, and the host's typing is not echoed back onto the console (it would end up in console.log)."""
    runner = _runner_module()
    host, guest = os.openpty()
    got: list[int] = []
    waiting = threading.Thread(target=lambda: got.append(runner.wait_for_go(guest)))
    waiting.start()
    deadline = time.monotonic() + 10
    while warmstart.WARM_READY not in capfd.readouterr().out:
        assert time.monotonic() < deadline, "no ready mark"
        time.sleep(0.01)
    os.write(host, b"some noise\n")
    os.write(host, b"KCI-GO notanumber\n")
    os.write(host, warmstart.go_line(1_700_000_000_123_456_789))
    waiting.join(10)
    assert got == [1_700_000_000_123_456_789]
    poller = select.poll()  # not select(): in a long test session the pty's fd can be above 1023
    poller.register(host, select.POLLIN)
    echoed = os.read(host, 4096) if poller.poll(200) else b""
    assert b"KCI-GO" not in echoed and b"noise" not in echoed
    os.close(host)
    os.close(guest)
