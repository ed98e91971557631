"""Real guest boots: the cached Debian 12 rootfs through a qcow2 overlay, a real bzImage under QEMU, the
real kci-init and the real guest runner. Each test boots a guest (TCG: about 2 s to "KCI-INIT: ready").

The kernel comes from $KCI_TEST_BZIMAGE, else from the default build (a build-cache hit once built).
The rootfs image is built on first use (root, debootstrap, about a minute) and cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from kernel_ci.core.paths import CONTAINERS, GUEST_INIT, GUEST_RUNNER
from kernel_ci.guest import qemu, rootfs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUNNER = GUEST_RUNNER


@pytest.fixture(scope="session")
def bzimage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    explicit = os.environ.get("KCI_TEST_BZIMAGE")
    if explicit:
        return Path(explicit)
    from kernel_ci.flow.build import BuildRequest, build

    out = tmp_path_factory.mktemp("guest-boot-build") / "build"
    return build(BuildRequest(output=out)).bzimage


@pytest.fixture(scope="session")
def base_image() -> rootfs.RootfsImage:
    return rootfs.ensure_rootfs(CONTAINERS / "rootfs", GUEST_INIT)


@pytest.fixture(scope="session")
def accel(bzimage: Path) -> qemu.Accel:
    return qemu.choose_accelerator(bzimage)


def make_payload(where: Path, suites: list[dict], *, runner: bool = True) -> Path:
    """A payload folder: the real guest runner and a plan of shell-command suites."""
    where.mkdir(parents=True)
    if runner:
        shutil.copy2(RUNNER, where / "kci-runner.py")
    plan = {"kernel_release": "", "suites": suites}
    (where / "plan.json").write_text(json.dumps(plan))
    return where


def shell_suite(name: str, script: str, timeout: int = 600) -> dict:
    return {"name": name, "language": "c", "timeout": timeout, "modules": [], "workdir": ".",
            "argv": ["/bin/sh", "-c", script], "junit": False}  # fmt: skip


def guest_config(
    tmp_path: Path,
    bzimage: Path,
    base: rootfs.RootfsImage,
    accel: qemu.Accel,
    payload: Path,
    **timeouts: float,
) -> qemu.QemuConfig:
    run_dir = tmp_path / "run"
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    return qemu.QemuConfig(
        kernel=bzimage,
        overlay=qemu.create_overlay(base.path, run_dir),
        payload_dir=payload,
        results_dir=results,
        run_dir=run_dir,
        accel=accel,
        boot_timeout=timeouts.get("boot_timeout", 120.0),
        idle_timeout=timeouts.get("idle_timeout", 60.0),
        global_timeout=timeouts.get("global_timeout", 300.0),
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def test_boot_to_ready_and_power_off(
    tmp_path: Path, bzimage: Path, base_image: rootfs.RootfsImage, accel: qemu.Accel
) -> None:
    script = (
        'echo "cpus=$(nproc)"; cat /proc/cmdline; echo written > "$KCI_ARTIFACTS/proof.txt"; '
        "touch /kci/must-fail && echo PAYLOAD-WRITABLE; "
        "echo scratch > /var/tmp/scratch && echo ROOT-WRITABLE; "
        "cat /sys/devices/system/clocksource/clocksource0/current_clocksource"
    )
    payload = make_payload(tmp_path / "payload", [shell_suite("probe", script)])
    cfg = guest_config(tmp_path, bzimage, base_image, accel, payload)
    seen: list[str] = []
    run = qemu.run_guest(cfg, seen.append)

    assert run.end == "poweroff", run.detail
    assert run.exit_code == 0
    console = run.console_log.read_text()
    assert console.splitlines() == seen
    assert "KCI-INIT: ready" in seen and "KCI-RUNNER: done" in seen
    assert run.boot_seconds is not None and run.first_test_seconds is not None
    assert 0 < run.boot_seconds < run.first_test_seconds < run.seconds
    assert run.boot_seconds < 60
    assert run.sysrq_dump == ""
    # the payload share is read-only, the results share and the root are writable
    assert "PAYLOAD-WRITABLE" not in console and "Read-only file system" in console
    assert "[probe] ROOT-WRITABLE" in seen
    assert (cfg.results_dir / "probe" / "artifacts" / "proof.txt").read_text() == "written\n"
    status = json.loads((cfg.results_dir / "probe" / "status.json").read_text())
    assert status["rc"] == 0 and not status["timed_out"]
    # the kernel got the protocol's command line and both CPUs; it keeps the TSC clocksource (not the
    # 4 ms refined-jiffies one) unless it could not measure the TSC at all (no ACPI/HPET reference, and
    # the PIT calibration fails when the host is busy)
    assert f"[probe] {qemu.kernel_append(cfg)}" in seen
    assert f"[probe] cpus={cfg.cpus}" in seen
    if "could not calculate TSC khz" not in console:
        assert "[probe] tsc" in seen
    # the exact command line was kept, runnable
    script_text = (cfg.run_dir / "qemu-cmdline.sh").read_text()
    assert os.access(cfg.run_dir / "qemu-cmdline.sh", os.X_OK)
    assert qemu.cmdline_script(run.command) == script_text


def test_a_silent_guest_is_a_hang_with_a_sysrq_dump(
    tmp_path: Path, bzimage: Path, base_image: rootfs.RootfsImage, accel: qemu.Accel
) -> None:
    payload = make_payload(
        tmp_path / "payload", [shell_suite("sleeper", "echo going quiet; exec sleep 100000")]
    )
    cfg = guest_config(tmp_path, bzimage, base_image, accel, payload, idle_timeout=5.0)
    run = qemu.run_guest(cfg)

    assert run.end == "hang", run.detail
    assert "no console output for 5 s" in run.detail
    assert run.first_test_seconds is not None
    assert run.seconds < run.first_test_seconds + 5 + qemu.SYSRQ_MAX_SECONDS + 15
    assert run.exit_code is not None  # QEMU was stopped, not left behind
    dump = run.sysrq_dump
    assert "sysrq: Show State" in dump
    assert "task:sleep" in dump  # the suite's process, with its stack
    assert "Call Trace:" in dump
    assert "sysrq: Show backtrace of all active CPUs" in dump
    assert dump.splitlines()[-1] in run.console_log.read_text()  # the dump is in the console log too
    assert "KCI-SUITE-END" not in run.console_log.read_text()


def test_a_kernel_panic_ends_qemu_at_once(
    tmp_path: Path, bzimage: Path, base_image: rootfs.RootfsImage, accel: qemu.Accel
) -> None:
    payload = make_payload(tmp_path / "payload", [shell_suite("crash", "echo c > /proc/sysrq-trigger")])
    cfg = guest_config(tmp_path, bzimage, base_image, accel, payload)
    run = qemu.run_guest(cfg)
    console = run.console_log.read_text()
    assert run.end == "poweroff", run.detail  # panic=-1 + -no-reboot; the console scanner classifies it
    assert "Kernel panic - not syncing" in console
    assert "KCI-SUITE-START: crash" in console and "KCI-SUITE-END" not in console


def test_a_missing_runner_is_reported_and_the_guest_reboots(
    tmp_path: Path, bzimage: Path, base_image: rootfs.RootfsImage, accel: qemu.Accel
) -> None:
    payload = make_payload(tmp_path / "payload", [], runner=False)
    cfg = guest_config(tmp_path, bzimage, base_image, accel, payload)
    run = qemu.run_guest(cfg)
    console = run.console_log.read_text()
    assert run.end == "poweroff", run.detail
    assert "KCI-INIT: ready" in console
    assert "KCI-INIT: runner failed" in console
    assert "Kernel panic" not in console  # PID 1 rebooted, it did not exit


def test_boot_timeout_with_a_dump_of_the_stuck_boot(
    tmp_path: Path, bzimage: Path, base_image: rootfs.RootfsImage, accel: qemu.Accel
) -> None:
    payload = make_payload(tmp_path / "payload", [])
    cfg = guest_config(tmp_path, bzimage, base_image, accel, payload, boot_timeout=8.0)
    cfg = replace(cfg, extra_append=("init=/bin/cat",))  # the last init= wins: PID 1 waits on the console
    run = qemu.run_guest(cfg)
    assert run.end == "boot_timeout", run.detail
    assert "within 8 s" in run.detail
    assert run.boot_seconds is None
    assert run.exit_code is not None
    assert run.seconds < 8 + qemu.SYSRQ_MAX_SECONDS + 15
    assert "sysrq: Show State" in run.sysrq_dump
    assert "task:cat" in run.sysrq_dump


def test_global_timeout_on_a_guest_that_keeps_talking(
    tmp_path: Path, bzimage: Path, base_image: rootfs.RootfsImage, accel: qemu.Accel
) -> None:
    chatter = shell_suite("chatter", "while :; do echo tick; sleep 0.2; done")
    payload = make_payload(tmp_path / "payload", [chatter])
    cfg = guest_config(tmp_path, bzimage, base_image, accel, payload, idle_timeout=3.0, global_timeout=12.0)
    run = qemu.run_guest(cfg)
    assert run.end == "timeout", run.detail
    assert run.console_log.read_text().count("[chatter] tick") > 5
    assert 12.0 <= run.seconds < 12.0 + qemu.SYSRQ_MAX_SECONDS + 15


def test_two_guests_side_by_side_leave_the_base_unchanged(
    tmp_path: Path, bzimage: Path, base_image: rootfs.RootfsImage, accel: qemu.Accel
) -> None:
    before = sha256(base_image.path)
    writer = shell_suite(
        "writer", "dd if=/dev/urandom of=/var/tmp/junk bs=1M count=8 status=none && sync && echo ok"
    )
    runs: dict[str, qemu.GuestRun] = {}

    def boot(name: str) -> None:
        where = tmp_path / name
        payload = make_payload(where / "payload", [writer])
        runs[name] = qemu.run_guest(guest_config(where, bzimage, base_image, accel, payload))

    threads = [threading.Thread(target=boot, args=(name,)) for name in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, run in runs.items():
        assert run.end == "poweroff", (name, run.detail)
        assert "[writer] ok" in run.console_log.read_text()
        assert (tmp_path / name / "run" / "overlay.qcow2").stat().st_size > 8 * 2**20  # the writes went here
    assert len(runs) == 2
    assert sha256(base_image.path) == before


def test_kvm_probe_gives_a_verdict_that_holds(
    tmp_path: Path, bzimage: Path, base_image: rootfs.RootfsImage
) -> None:
    if not qemu.dev_kvm_present():
        pytest.skip("no usable /dev/kvm on this host")
    started = time.monotonic()
    probe = qemu.probe_kvm(bzimage, use_cache=False)
    assert time.monotonic() - started < qemu.KVM_PROBE_TIMEOUT + 10
    assert probe.reason
    accel, _ = qemu.decide_accelerator(True, probe, "auto")
    if not probe.usable:
        assert accel == "tcg"
        return
    # A usable verdict must mean a real guest boots under KVM.
    payload = make_payload(tmp_path / "payload", [])
    cfg = replace(guest_config(tmp_path, bzimage, base_image, "kvm", payload), accel="kvm")
    run = qemu.run_guest(cfg)
    assert run.end == "poweroff", run.detail
    assert run.boot_seconds is not None
