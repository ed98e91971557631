"""What `kernel-ci run` reads back from the untrusted guest: the status file and the output files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kernel_ci.guest import interactive, qemu
from kernel_ci.guest.interactive import GuestSessionError
from kernel_ci.guest.protocol import EndKind


@pytest.mark.parametrize("text", ["0\n", "3", " 255 \n"])
def test_a_status_is_a_number_0_to_255(text: str) -> None:
    assert interactive.parse_status(text) == int(text.strip())


@pytest.mark.parametrize("text", ["", "-1", "256", "7; rm -rf /", "0x3", "1e2", "0007", "\uff13"])
def test_a_malformed_status_is_an_infrastructure_failure_not_a_command_status(text: str) -> None:
    with pytest.raises(GuestSessionError) as err:
        interactive.parse_status(text)
    assert int(err.value.exit_code) == 7


def _guest_run(tmp_path: Path, end: EndKind) -> qemu.GuestRun:
    return qemu.GuestRun(end, 0, 4.8, None, None, tmp_path / "console.log", ["qemu"], "why", "")


def test_a_status_written_by_a_guest_that_powered_off_is_the_command_s(tmp_path: Path) -> None:
    (tmp_path / "status").write_text("3\n")
    (tmp_path / "stdout").write_bytes(b"out")
    result = interactive.collect(tmp_path, _guest_run(tmp_path, EndKind.POWEROFF))
    assert (result.status, result.stdout) == (3, b"out")


@pytest.mark.parametrize("end", [e for e in EndKind if e != EndKind.POWEROFF])
def test_a_status_written_after_the_run_was_declared_failed_is_not_a_command_status(
    tmp_path: Path, end: EndKind
) -> None:
    """Seen under load: a boot timeout fired, the guest booted during the stack dump and ran `true`; its
    status 0 came back as the command's, exit 0 instead of 7."""
    (tmp_path / "status").write_text("0\n")
    with pytest.raises(GuestSessionError, match=f"no exit status from the guest \\({end}") as err:
        interactive.collect(tmp_path, _guest_run(tmp_path, end))
    assert int(err.value.exit_code) == 7


def test_output_is_capped(tmp_path: Path) -> None:
    big = tmp_path / "stdout"
    big.write_bytes(b"x" * 100)
    assert interactive.read_capped(big, 10) == (b"x" * 10, True)
    assert interactive.read_capped(big, 100) == (b"x" * 100, False)
    assert interactive.read_capped(tmp_path / "missing", 10) == (b"", False)


def test_the_payload_carries_the_session_under_the_runners_name(tmp_path: Path) -> None:
    kernel_dir = tmp_path / "build"
    (kernel_dir / "modules" / "lib" / "modules" / "5.10-x").mkdir(parents=True)
    payload = interactive.make_payload(tmp_path / "p", kernel_dir, "run", ["uname", "-r"], b"in")
    assert (payload / "kci-runner.py").read_bytes() == interactive.SESSION_RUNNER.read_bytes()
    assert json.loads((payload / "session.json").read_text()) == {"mode": "run", "argv": ["uname", "-r"]}
    assert (payload / "modules" / "lib" / "modules" / "5.10-x").is_dir()
    assert (payload / "stdin").read_bytes() == b"in"
    with pytest.raises(ValueError):
        interactive.make_payload(tmp_path / "q", kernel_dir, "debug", [], None)


def test_the_gdb_command_attaches_to_the_stub_with_the_kernels_scripts(tmp_path: Path) -> None:
    assert interactive.gdb_command(None, None, 1234) == "gdb vmlinux -ex 'target remote 127.0.0.1:1234'"
    script = tmp_path / "kbuild" / "vmlinux-gdb.py"
    command = interactive.gdb_command(tmp_path / "run" / "vmlinux", script, 4321)
    assert command == (
        f"gdb {tmp_path}/run/vmlinux -iex 'add-auto-load-safe-path {tmp_path}/kbuild' "
        f"-ex 'source {script}' -ex 'target remote 127.0.0.1:4321'"
    )
