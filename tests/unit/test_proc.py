"""kernel_ci.core.proc.run: a timeout or an interrupt stops the whole process tree it started, and the call
returns even
when a grandchild (or one that escaped the group) keeps the output pipe open."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kernel_ci.core import proc

GRACE = 1.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent or by init) is gone for our purpose.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _pids(pidfile: Path) -> list[int]:
    return [int(p) for p in pidfile.read_text().split()]


def _wait_gone(pids: list[int], seconds: float = 3.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


@pytest.fixture
def no_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proc, "STOP_GRACE_SECONDS", GRACE)


@pytest.mark.timeout(30)
def test_a_timeout_kills_a_grandchild_that_holds_the_output_pipe(tmp_path: Path, no_grace: None) -> None:
    pidfile = tmp_path / "pids"
    # The grandchild inherits stdout (the pipe) and outlives its parent's SIGTERM unless it is signalled too.
    script = f"sleep 1000 & echo $! >> {pidfile}; echo $$ >> {pidfile}; echo started; sleep 1000"
    start = time.monotonic()
    with pytest.raises(proc.CommandError) as caught:
        proc.run(["sh", "-c", script], timeout=1.0, quiet=True)
    elapsed = time.monotonic() - start
    assert caught.value.timed_out
    assert "started" in caught.value.output
    assert elapsed < 1.0 + GRACE + 3.0, elapsed
    assert _wait_gone(_pids(pidfile)) == []


@pytest.mark.timeout(30)
def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path, no_grace: None) -> None:
    pidfile = tmp_path / "pids"
    script = (
        "trap '' TERM; "
        + f"sleep 1000 & echo $! >> {pidfile}; echo $$ >> {pidfile}; while :; do sleep 1; done"
    )
    start = time.monotonic()
    with pytest.raises(proc.CommandError):
        proc.run(["sh", "-c", script], timeout=1.0, quiet=True)
    assert time.monotonic() - start < 1.0 + GRACE + 3.0
    assert _wait_gone(_pids(pidfile)) == []


@pytest.mark.timeout(30)
def test_a_process_that_escaped_the_group_does_not_hang_the_caller(tmp_path: Path, no_grace: None) -> None:
    pidfile = tmp_path / "pids"
    # setsid puts the grandchild in a session of its own: signalling our group cannot reach it, but it still
    # holds the pipe. The caller must return anyway (and we clean it up ourselves afterwards).
    script = f"setsid sh -c 'echo $$ >> {pidfile}; exec sleep 1000' & sleep 1000"
    start = time.monotonic()
    try:
        with pytest.raises(proc.CommandError) as caught:
            proc.run(["sh", "-c", script], timeout=1.0, quiet=True)
        assert caught.value.timed_out
        assert time.monotonic() - start < 1.0 + GRACE + 3.0
    finally:
        for pid in _pids(pidfile) if pidfile.exists() else []:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(30)
def test_exit_of_the_child_returns_even_if_a_background_grandchild_holds_the_pipe(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    # A daemonising child: it exits 0 at once, its background grandchild keeps stdout. Today's caller reads
    # the pipe until EOF and hangs; the child's exit must end the call (and the leftover tree is stopped).
    script = f"sleep 1000 & echo $! >> {pidfile}; echo done"
    start = time.monotonic()
    result = proc.run(["sh", "-c", script], quiet=True)
    assert result.returncode == 0
    assert "done" in result.output
    assert time.monotonic() - start < STOP_BOUND
    assert _wait_gone(_pids(pidfile)) == []


STOP_BOUND = proc.STOP_GRACE_SECONDS + 5.0


@pytest.mark.timeout(30)
def test_an_interrupt_stops_the_tree(tmp_path: Path, no_grace: None) -> None:
    pidfile = tmp_path / "pids"
    script = f"sleep 1000 & echo $! >> {pidfile}; echo $$ >> {pidfile}; echo started; sleep 1000"
    seen = threading.Event()

    def on_line(line: str) -> None:
        if line == "started":
            seen.set()
            raise KeyboardInterrupt  # what Ctrl-C raises in the reading thread

    with pytest.raises(KeyboardInterrupt):
        proc.run(["sh", "-c", script], on_line=on_line)
    assert seen.is_set()
    assert _wait_gone(_pids(pidfile)) == []


def test_output_and_status_are_unchanged_for_ordinary_commands() -> None:
    result = proc.run(["sh", "-c", "echo one; echo two >&2; exit 0"], quiet=True)
    assert result.output.splitlines() == ["one", "two"]
    with pytest.raises(proc.CommandError) as caught:
        proc.run(["sh", "-c", "echo bad; exit 3"], quiet=True)
    assert caught.value.returncode == 3 and not caught.value.timed_out


def test_spawn_stops_the_whole_group_including_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    """proc.spawn (QEMU, dockerd): stop() reaches every process the command started, SIGKILL after grace."""
    pid_file = tmp_path / "child.pid"
    script = f"sh -c 'trap \"\" TERM; echo $$ > {pid_file}; while :; do sleep 0.1; done' & echo up; wait"
    spawned = proc.spawn(["sh", "-c", script])
    assert spawned.stdout is not None and spawned.stdout.readline() == b"up\n"
    deadline = time.monotonic() + 30  # a loaded machine is slow to start a shell
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    started = time.monotonic()
    spawned.stop(grace=GRACE)
    assert time.monotonic() - started < GRACE + 10  # not the 300 s of a child nobody killed
    assert spawned.returncode is not None
    deadline = time.monotonic() + 10
    while _alive(child):  # SIGKILLed; init reaps the orphan a moment later
        assert time.monotonic() < deadline, "the child that ignores SIGTERM survived the stop"
        time.sleep(0.05)
    spawned.stop()  # stopping what is gone is a no-op


def test_spawn_of_a_missing_command_raises_oserror() -> None:
    with pytest.raises(OSError):
        proc.spawn(["/nonexistent/kernel-ci-no-such-command"])


def test_probe_is_a_silent_yes_or_no() -> None:
    assert proc.probe(["sh", "-c", "echo fine; echo also >&2"]) == (True, "fine\nalso")
    ok, detail = proc.probe(["sh", "-c", "echo broken >&2; exit 3"])
    assert not ok and detail == "broken"
    assert not proc.probe(["/nonexistent/kernel-ci-no-such-command"])[0]
    started = time.monotonic()
    ok, detail = proc.probe(["sleep", "30"], timeout=0.5)
    assert not ok and "timed out" in detail and time.monotonic() - started < 5


def _wait_for(predicate: Callable[[], bool], seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_foreground_command_dies_with_a_sigkilled_parent(tmp_path: Path) -> None:
    """`kernel-ci shell` runs QEMU in the foreground: a kernel-ci killed with SIGKILL must not leave the guest
    running (it did: an orphaned QEMU ran on for 24 minutes)."""
    pidfile = tmp_path / "pid"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from kernel_ci.core import proc; "
            "proc.foreground(['sh', '-c', 'echo $$ > ' + sys.argv[1] + '; exec sleep 60'])",
            str(pidfile),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
        child = int(pidfile.read_text())
        assert _alive(child)
        parent.kill()
        parent.wait()
        assert _wait_for(lambda: not _alive(child)), "the foreground command outlived its parent"
    finally:
        parent.kill()


def test_a_foreground_command_returns_its_status() -> None:
    assert proc.foreground(["sh", "-c", "exit 3"]) == 3
