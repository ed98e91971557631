"""kernel_ci.guest.qemu without a guest kernel: the command line, the accelerator decision, the probe cache,
the
overlay (real qemu-img and qemu-io), the monitor helper and QEMU failing to start (real QEMU)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kernel_ci.guest import qemu

needs_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None, reason="qemu-utils is not installed"
)
needs_qemu = pytest.mark.skipif(shutil.which(qemu.QEMU) is None, reason="qemu-system-x86 is not installed")

PROTOCOL = "console=ttyS0 root=/dev/vda rw rootfstype=ext4 init=/sbin/kci-init panic=-1"


def make_cfg(tmp_path: Path, **changes: object) -> qemu.QemuConfig:
    values: dict[str, object] = {
        "kernel": tmp_path / "bzImage",
        "overlay": tmp_path / "run" / "overlay.qcow2",
        "payload_dir": tmp_path / "payload",
        "results_dir": tmp_path / "results",
        "run_dir": tmp_path / "run",
    }
    values.update(changes)
    return qemu.QemuConfig(**values)  # type: ignore[arg-type]


def option(argv: list[str], name: str) -> list[str]:
    """Every value given to option name."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == name]


def test_build_command_shape(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, extra_append=("kci.debug=1", "loglevel=8"))
    argv = qemu.build_command(cfg)
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert option(argv, "-display") == ["none"]
    assert option(argv, "-machine") == [qemu.MACHINE]
    assert option(argv, "-accel") == ["tcg,thread=single"]
    assert option(argv, "-cpu") == ["max"]
    assert option(argv, "-m") == ["1024M"]
    assert option(argv, "-smp") == ["2,sockets=2,cores=1,threads=1"]
    assert option(argv, "-kernel") == [str(tmp_path / "bzImage")]
    assert option(argv, "-chardev") == ["stdio,id=console,mux=on,signal=off"]
    assert option(argv, "-serial") == ["chardev:console"]
    assert option(argv, "-monitor") == [f"unix:{tmp_path}/run/monitor.sock,server=on,wait=off"]
    assert option(argv, "-drive") == [
        f"file={tmp_path}/run/overlay.qcow2,format=qcow2,if=virtio,cache=unsafe"
    ]
    payload, results = option(argv, "-virtfs")
    assert payload == (
        f"local,path={tmp_path}/payload,mount_tag=kci-payload,security_model=none,readonly=on,id=payload"
    )
    # guest-made files are plain files on the host (no symlink, device, set-id file): see the e2e attacks
    assert results == (
        f"local,path={tmp_path}/results,mount_tag=kci-results,security_model=mapped-xattr,id=results"
    )
    (append,) = option(argv, "-append")
    assert append.startswith(PROTOCOL + " ")
    assert append.endswith(" kci.debug=1 loglevel=8")
    assert "quiet" not in append.split()  # it would hide boot-time WARN traces from the scanner


def test_build_command_is_pure(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    assert qemu.build_command(cfg) == qemu.build_command(cfg)
    assert list(tmp_path.iterdir()) == []


def test_kvm_uses_the_host_cpu(tmp_path: Path) -> None:
    argv = qemu.build_command(make_cfg(tmp_path, accel="kvm", memory="2G", cpus=4))
    assert option(argv, "-accel") == ["kvm"]
    assert option(argv, "-cpu") == ["host"]
    assert option(argv, "-m") == ["2G"]
    assert option(argv, "-smp") == ["4,sockets=4,cores=1,threads=1"]


def test_commas_in_paths_are_doubled(tmp_path: Path) -> None:
    odd = tmp_path / "a,b"
    argv = qemu.build_command(make_cfg(odd, kernel=odd / "bzImage"))
    assert option(argv, "-drive")[0].startswith(f"file={tmp_path}/a,,b/run/overlay.qcow2,format=")
    assert f"path={tmp_path}/a,,b/payload," in option(argv, "-virtfs")[0]
    assert option(argv, "-kernel") == [f"{tmp_path}/a,b/bzImage"]  # a plain argument: no escaping


def test_long_run_dirs_get_a_short_monitor_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    sock = make_cfg(tmp_path, run_dir=deep).monitor_socket
    assert len(str(sock)) < 100
    assert sock.parent == Path("/tmp")
    assert sock == make_cfg(tmp_path, run_dir=deep).monitor_socket
    assert sock != make_cfg(tmp_path, run_dir=deep / "other").monitor_socket


def test_cmdline_script_round_trips(tmp_path: Path) -> None:
    argv = qemu.build_command(make_cfg(tmp_path / "with space", extra_append=("x='quoted'",)))
    script = qemu.cmdline_script(argv)
    assert script.startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n"], input=script.encode(), check=True)
    exec_line = script.split("exec ", 1)[1].replace("\\\n", " ")
    assert shlex.split(exec_line) == argv


@pytest.mark.parametrize(
    ("present", "probe", "choice", "accel", "reason"),
    [
        (True, None, "tcg", "tcg", "requested"),
        (False, None, "tcg", "tcg", "requested"),
        (True, qemu.KvmProbe(False, "boom"), "kvm", "kvm", "requested"),
        (False, None, "auto", "tcg", "/dev/kvm is missing"),
        (True, None, "auto", "tcg", "not probed"),
        (True, qemu.KvmProbe(True, "booted in 0.8 s"), "auto", "kvm", "booted in 0.8 s"),
        (
            True,
            qemu.KvmProbe(False, "KVM internal error"),
            "auto",
            "tcg",
            "KVM probe failed: KVM internal error",
        ),
    ],
)
def test_decide_accelerator(
    present: bool, probe: qemu.KvmProbe | None, choice: str, accel: str, reason: str
) -> None:
    got_accel, got_reason = qemu.decide_accelerator(present, probe, choice)
    assert got_accel == accel
    assert reason in got_reason


def test_decide_accelerator_rejects_impossible_choices() -> None:
    with pytest.raises(qemu.AccelError):
        qemu.decide_accelerator(False, None, "kvm")
    with pytest.raises(ValueError):
        qemu.decide_accelerator(True, None, "hvf")


def test_probe_cache_honours_key_and_ttl(tmp_path: Path) -> None:
    cache = tmp_path / "kvm-probe.json"
    assert qemu._read_probe_cache(cache, "k") is None
    cache.write_text(
        json.dumps({"key": "k", "time": time.time(), "usable": False, "reason": "emulation failure"})
    )
    cached = qemu._read_probe_cache(cache, "k")
    assert cached is not None and not cached.usable and "emulation failure" in cached.reason
    assert qemu._read_probe_cache(cache, "other host") is None
    stale = time.time() - qemu.KVM_PROBE_TTL - 1
    cache.write_text(json.dumps({"key": "k", "time": stale, "usable": True, "reason": "ok"}))
    assert qemu._read_probe_cache(cache, "k") is None
    cache.write_text("{not json")
    assert qemu._read_probe_cache(cache, "k") is None


def test_overdue() -> None:
    cfg = qemu.QemuConfig(
        Path("k"),
        Path("o"),
        Path("p"),
        Path("r"),
        Path("d"),
        boot_timeout=10,
        idle_timeout=5,
        global_timeout=100,
    )
    now = time.monotonic()
    assert qemu._overdue(cfg, now, now, ready=False) is None
    assert qemu._overdue(cfg, now - 11, now, ready=False)[0] == "boot_timeout"  # type: ignore[index]
    assert qemu._overdue(cfg, now - 11, now, ready=True) is None
    assert qemu._overdue(cfg, now - 11, now - 6, ready=True)[0] == "hang"  # type: ignore[index]
    assert qemu._overdue(cfg, now - 11, now - 6, ready=False)[0] == "boot_timeout"  # type: ignore[index]
    assert qemu._overdue(cfg, now - 101, now, ready=True)[0] == "timeout"  # type: ignore[index]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_io(image: Path, command: str) -> str:
    done = subprocess.run(["qemu-io", "-c", command, str(image)], capture_output=True, text=True)
    return done.stdout + done.stderr


def reads(image: Path, pattern: int, offset: str, length: str) -> bool:
    """Whether image holds the byte pattern over [offset, offset+length) (qemu-io verifies it)."""
    out = qemu_io(image, f"read -P {pattern:#x} {offset} {length}")
    assert "read " in out, out  # the read itself ran
    return "Pattern verification failed" not in out


@needs_qemu_img
def test_overlay_takes_the_writes_and_the_base_stays_unchanged(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "8M"], check=True)
    qemu_io(base, "write -P 0x11 0 1M")
    before = sha256(base)

    one = qemu.create_overlay(base, tmp_path / "run1")
    two = qemu.create_overlay(base, tmp_path / "run2")
    assert one == tmp_path / "run1" / "overlay.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(one)], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "qcow2"

    qemu_io(one, "write -P 0xaa 0 64k")
    qemu_io(two, "write -P 0xbb 0 64k")
    assert reads(one, 0xAA, "0", "64k")
    assert reads(two, 0xBB, "0", "64k")
    assert reads(one, 0x11, "64k", "960k")  # the rest still comes from the base
    assert not reads(one, 0x11, "0", "64k")  # the overlay shadows it
    assert sha256(base) == before
    assert reads(base, 0x11, "0", "1M")


@needs_qemu_img
def test_overlay_of_a_missing_base_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        qemu.create_overlay(tmp_path / "nope.qcow2", tmp_path / "run")


@needs_qemu
def test_qemu_that_cannot_start_is_reported_not_raised(tmp_path: Path) -> None:
    for name in ("payload", "results"):
        (tmp_path / name).mkdir()
    cfg = make_cfg(tmp_path)  # no bzImage and no overlay exist
    run = qemu.run_guest(cfg)
    assert run.end == "qemu_failed"
    assert run.exit_code not in (0, None)
    assert run.seconds < 30
    assert run.boot_seconds is None
    assert "bzImage" in run.detail or "overlay.qcow2" in run.detail
    assert run.console_log.is_file()
    script = (tmp_path / "run" / "qemu-cmdline.sh").read_text()
    assert shlex.split(script.split("exec ", 1)[1].replace("\\\n", " ")) == run.command


@needs_qemu
def test_monitor_command_talks_to_a_real_monitor(tmp_path: Path) -> None:
    sock = tmp_path / "monitor.sock"
    vm = subprocess.Popen(
        [qemu.QEMU, "-machine", "none", "-nodefaults", "-display", "none",
         "-monitor", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert qemu.monitor_command(sock, "info status") == "VM status: running"
        assert "chardev-send-break" in qemu.monitor_command(sock, "help chardev-send-break")
    finally:
        vm.kill()
        vm.wait()


def test_console_log_is_capped_and_says_so(tmp_path: Path) -> None:
    """A guest flooding the console: console.log stops at the limit with a note; every line is still
    handed on (the scanner must see the markers after the cut), through a bounded queue."""
    read_fd, write_fd = os.pipe()
    log = tmp_path / "console.log"
    limit = 64 * 1024
    with os.fdopen(read_fd, "rb") as stream:
        out = qemu._Console(stream, log, limit)
        assert out.lines.maxsize == qemu.CONSOLE_QUEUE_LINES
        seen = 0
        line = b"A" * 99 + b"\n"
        writer = threading.Thread(target=lambda: _write_lines(write_fd, line, 20_000, b"KCI-RUNNER: done\n"))
        writer.start()
        last = ""
        while (got := out.lines.get(timeout=30)) is not None:
            seen += 1
            last = got
        writer.join()
        out.join(5)
    assert seen == 20_001 and last == "KCI-RUNNER: done"
    assert log.stat().st_size <= limit + 200
    assert log.read_text().splitlines()[-1].startswith("[kernel-ci: console.log cut at")
    assert out.dropped_bytes == (20_000 - limit // 100) * 100 + len("KCI-RUNNER: done\n")


def _write_lines(fd: int, line: bytes, count: int, last: bytes) -> None:
    with os.fdopen(fd, "wb") as pipe:
        for _ in range(count):
            pipe.write(line)
        pipe.write(last)


@pytest.mark.timeout(300)
def test_a_console_flood_of_hundreds_of_megabytes_stays_bounded(tmp_path: Path) -> None:
    """256 MiB through the real console reader at the default cap: console.log stops at 64 MiB, and a
    scanner that falls behind makes the reader wait (bounded queue) instead of buffering the flood."""
    read_fd, write_fd = os.pipe()
    log = tmp_path / "console.log"
    line = b"F" * 1023 + b"\n"
    count = 256 * 1024  # 256 MiB
    with os.fdopen(read_fd, "rb") as stream:
        out = qemu._Console(stream, log)
        writer = threading.Thread(target=lambda: _write_lines(write_fd, line, count, b"KCI-RUNNER: done\n"))
        writer.start()
        time.sleep(2.0)  # the consumer is slow: nothing is taken for a while
        assert out.lines.qsize() <= qemu.CONSOLE_QUEUE_LINES
        seen = 0
        while out.lines.get(timeout=60) is not None:
            seen += 1
        writer.join()
        out.join(5)
    assert seen == count + 1
    assert log.stat().st_size <= qemu.CONSOLE_LOG_LIMIT + 200
    kept = log.stat().st_size - _note(log)
    assert out.dropped_bytes == count * len(line) + len("KCI-RUNNER: done\n") - kept


def _note(log: Path) -> int:
    """The length of the cut note at the end of console.log."""
    with log.open("rb") as handle:
        handle.seek(-200, os.SEEK_END)
        tail = handle.read()
    return len(tail.splitlines(keepends=True)[-1])
