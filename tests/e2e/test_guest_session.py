"""`kernel-ci run` and `kernel-ci shell` end to end: the real CLI, a real kernel (the default build, a
build-cache hit once any e2e test built it; or $KCI_TEST_KERNEL_DIR), the cached rootfs, QEMU under TCG.
Each boot is about 7-10 s warm."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernel_ci.build.records import BuildMetadata

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    explicit = os.environ.get("KCI_TEST_KERNEL_DIR")
    if explicit:
        return Path(explicit)
    from kernel_ci.flow.build import BuildRequest, build

    return build(BuildRequest(output=tmp_path_factory.mktemp("session-build") / "build")).output


def kci(tmp_path: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "kernel_ci.cli.main", "-o", str(tmp_path), *args]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=300)


def test_run_prints_the_release(kernel_dir: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    done = kci(tmp_path, "run", "--kernel-dir", str(kernel_dir), "--", "uname", "-r")
    print(f"kernel-ci run -- uname -r: {time.monotonic() - started:.1f} s, load {os.getloadavg()[0]:.1f}")
    assert done.returncode == 0, done.stderr
    assert done.stdout == BuildMetadata.read(kernel_dir).kernel.release + "\n"


def test_run_returns_the_command_status_and_both_streams(kernel_dir: Path, tmp_path: Path) -> None:
    script = "echo to-out; echo to-err >&2; exit 3"
    done = kci(tmp_path, "run", "--kernel-dir", str(kernel_dir), "--json", str(tmp_path / "r.json"), "--",
               "sh", "-c", script)  # fmt: skip
    assert done.returncode == 3
    assert done.stdout == "to-out\n"
    assert "to-err\n" in done.stderr
    assert '"status": 3' in (tmp_path / "r.json").read_text()


def test_a_guest_that_never_boots_is_exit_7_not_a_command_status(kernel_dir: Path, tmp_path: Path) -> None:
    done = kci(tmp_path, "run", "--kernel-dir", str(kernel_dir), "--boot-timeout", "0.5",
               "--json", str(tmp_path / "r.json"), "--", "true")  # fmt: skip
    assert done.returncode == 7
    assert "no exit status from the guest" in " ".join(done.stderr.split())  # rich wraps long lines
    assert not (tmp_path / "r.json").exists()  # --json: no "status" means the command never ran


def test_piped_shell_runs_the_script(kernel_dir: Path, tmp_path: Path) -> None:
    done = kci(tmp_path, "shell", "--kernel-dir", str(kernel_dir), stdin="ls /lib/modules\nexit 4\n")
    assert done.returncode == 4, done.stderr
    assert BuildMetadata.read(kernel_dir).kernel.release in done.stdout  # the build's modules are there


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} on the terminal; saw:\n{seen[-2000:].decode(errors='replace')}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return seen


def test_shell_on_a_terminal_runs_a_command_and_exit_powers_off(kernel_dir: Path, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "kernel_ci.cli.main", "-o", str(tmp_path), "shell", "--kernel-dir",
            str(kernel_dir)]  # fmt: skip
    leader, follower = pty.openpty()
    shell = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, start_new_session=True)
    os.close(follower)
    try:
        _read_until(leader, b"kci-guest:", 180)
        os.write(leader, b"echo $((6*7))-answer\r")
        _read_until(leader, b"42-answer", 60)
        os.write(leader, b"sleep 1000\r")
        time.sleep(1)
        os.write(leader, b"\x03")  # Ctrl-C reaches the guest's foreground job, not kernel-ci
        os.write(leader, b"echo still-$((1+1))\r")
        _read_until(leader, b"still-2", 60)
        os.write(leader, b"exit\r")
        assert shell.wait(timeout=60) == 0
    finally:
        if shell.poll() is None:
            shell.kill()
        os.close(leader)


def test_gdb_prints_a_command_and_gdb_attaches(kernel_dir: Path, tmp_path: Path) -> None:
    import shutil
    import socket

    if shutil.which("gdb") is None:
        pytest.skip("no gdb on this host (apt-get install gdb)")
    with socket.socket() as probe:  # a free port: other guests may hold 1234
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "kernel_ci.cli.main", "-o", str(tmp_path), "run", "--kernel-dir",
            str(kernel_dir), "--gdb", "--gdb-port", str(port), "--", "sleep", "20"]  # fmt: skip
    guest = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(8)  # QEMU listens from its start; the guest is booting meanwhile
        # the vmlinux --gdb unpacked into the session's dir, with the build's gdb scripts: the stopped
        # guest's pc is a kernel symbol (nokaslr), and lx-lsmod walks the guest's module list
        (vmlinux,) = tmp_path.glob("sessions/*/vmlinux")
        script = kernel_dir / "kbuild" / "vmlinux-gdb.py"
        gdb_argv = ["gdb", "-batch", str(vmlinux), "-ex", f"source {script}",
                    "-ex", f"target remote 127.0.0.1:{port}", "-ex", "info registers rip",
                    "-ex", "info symbol $pc", "-ex", "lx-lsmod"]  # fmt: skip
        gdb = subprocess.run([*gdb_argv, "-ex", "detach"], capture_output=True, text=True, timeout=120)
        assert "rip" in gdb.stdout, gdb.stdout + gdb.stderr
        assert " in section .text" in gdb.stdout, gdb.stdout + gdb.stderr
        assert "Traceback" not in gdb.stdout + gdb.stderr, gdb.stdout + gdb.stderr
        _, err = guest.communicate(timeout=200)
        assert guest.returncode == 0, err
        assert f"target remote 127.0.0.1:{port}" in err  # the printed gdb command line
        assert f"source {script}" in err and str(vmlinux) in err
        assert "nokaslr" in err
    finally:
        if guest.poll() is None:
            guest.kill()
