"""The one way this package runs a subprocess: log the command, stream its output, raise with it."""

from __future__ import annotations

import collections
import contextlib
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue
from typing import IO, Any

from kernel_ci.core.console import console
from kernel_ci.core.errors import InfrastructureError

TAIL_LINES = 60
STOP_GRACE_SECONDS = 10.0
POLL_SECONDS = 0.2
# How long the output pipe may stay open after the command exited (a late writer still being flushed).
LINGER_SECONDS = 2.0


class CommandError(InfrastructureError):
    """A command exited non-zero (or timed out); carries its command line and the tail of its output."""

    def __init__(self, argv: Sequence[str], returncode: int | None, output: str, timed_out: bool = False):
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output
        self.timed_out = timed_out
        what = "timed out" if timed_out else f"exited with status {returncode}"
        tail = "\n".join(output.rstrip().splitlines()[-TAIL_LINES:])
        super().__init__(f"command {what}: {shlex.join(self.argv)}\n--- output (last lines) ---\n{tail}")


@dataclass
class Result:
    argv: list[str]
    returncode: int
    output: str
    seconds: float


LineSink = Callable[[str], None]


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    on_line: LineSink | None = None,
    quiet: bool = False,
    check: bool = True,
    timeout: float | None = None,
    stdin_data: bytes | None = None,
    keep_output: bool = True,
    hold_stdin: bool = False,
) -> Result:
    """Run argv, streaming merged stdout/stderr line by line.

    on_line receives every line (without newline); when it is None and quiet is False the lines are
    printed dimmed. With keep_output=False only the last lines are kept (for very chatty commands).

    The command runs in a session (hence a process group) of its own. On a timeout or an exception (Ctrl-C
    included) the whole group is stopped, and once the command itself has exited the call returns even if a
    process it left behind (in the group or escaped from it) still holds the output pipe.

    hold_stdin gives the command a pipe on stdin that is never written and stays open as long as this
    process lives: the command sees EOF when this process dies, however it dies (SIGKILL included). The
    builder's container watchdog stops the build on that EOF.
    """
    args = [os.fspath(a) for a in argv]
    console.log(f"[bold cyan]$[/] {shlex.join(args)}" + (f"  [dim](in {cwd})[/]" if cwd else ""))
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.PIPE if stdin_data is not None or hold_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Its own session: signals for the tree go to one group, and a Ctrl-C on our terminal reaches
            # the command only through us (so that it is stopped in order, SIGTERM before SIGKILL).
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise CommandError(args, None, f"{args[0]}: not found ({exc})") from exc
    if stdin_data is not None:
        stdin = proc.stdin
        assert stdin is not None

        def feed() -> None:
            try:
                stdin.write(stdin_data)
            finally:
                if not hold_stdin:
                    stdin.close()

        threading.Thread(target=feed, daemon=True).start()

    lines: collections.deque[str] | list[str] = [] if keep_output else collections.deque(maxlen=TAIL_LINES)
    deadline = None if timeout is None else start + timeout
    try:
        timed_out = _pump(proc, deadline, lines, on_line, quiet)
    except BaseException:
        _stop(proc)
        raise
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
    output = "\n".join(lines)
    if check and (proc.returncode != 0 or timed_out):
        raise CommandError(args, proc.returncode, output, timed_out=timed_out)
    return Result(args, proc.returncode, output, time.monotonic() - start)


_EOF = None


def _pump(
    proc: subprocess.Popen[bytes],
    deadline: float | None,
    lines: collections.deque[str] | list[str],
    on_line: LineSink | None,
    quiet: bool,
) -> bool:
    """Hand the output lines to the sink until EOF, or until the command has exited and the pipe stays
    open past LINGER_SECONDS; stop the group on the deadline. Returns whether the deadline was hit.

    The pipe is read by a daemon thread, so the caller never blocks on it: a process that escaped the group
    and keeps the pipe open only keeps that thread (and the pipe) alive, never the caller.
    """
    queue: Queue[bytes | None] = Queue()
    assert proc.stdout is not None
    stdout = proc.stdout

    def read() -> None:
        try:
            for raw in stdout:
                queue.put(raw)
        finally:
            queue.put(_EOF)

    threading.Thread(target=read, daemon=True).start()
    timed_out = False
    exited_at: float | None = None
    while True:
        try:
            raw = queue.get(timeout=POLL_SECONDS)
        except Empty:
            raw = b""
        else:
            if raw is _EOF:
                break
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            lines.append(line)
            if on_line is not None:
                on_line(line)
            elif not quiet:
                console.print(f"[dim]{_escape(line)}[/]", highlight=False)
            continue
        now = time.monotonic()
        if deadline is not None and now >= deadline and not timed_out:
            timed_out = True
            _stop(proc)
            exited_at = time.monotonic()
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at >= LINGER_SECONDS:
            # The command is gone but something it started holds the pipe: stop what is left of its group
            # and stop reading (an escaped process cannot be reached, and must not hang us).
            _stop(proc)
            _drain(queue, lines)
            break
    proc.wait()
    return timed_out


def _drain(queue: Queue[bytes | None], lines: collections.deque[str] | list[str]) -> None:
    """Whatever the reader had already queued (no waiting: the writer may live on)."""
    while True:
        try:
            raw = queue.get_nowait()
        except Empty:
            return
        if raw is _EOF:
            return
        lines.append(raw.decode("utf-8", errors="replace").rstrip("\n"))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed its uid (e.g. a setuid helper): still there
        return True
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone, or a member not ours
        os.killpg(pgid, sig)


def _stop(proc: subprocess.Popen[bytes], grace: float | None = None) -> None:
    """SIGTERM to the command's whole process group (a `docker run` client forwards it to the container, so
    the build inside stops too), SIGKILL to the group after the grace period if any member is left.

    The group id is the command's pid (start_new_session), valid while the command is unreaped: once it is
    reaped the group may still hold its children, so they are signalled through the same id.
    """
    grace = STOP_GRACE_SECONDS if grace is None else grace
    pgid = proc.pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, so that a zombie leader does not count as alive
        if not _group_alive(pgid):
            break
        time.sleep(0.05)
    else:
        _signal_group(pgid, signal.SIGKILL)
    proc.wait()


def capture(
    argv: Sequence[str | os.PathLike[str]], *, cwd: Path | str | None = None, check: bool = True
) -> str:
    """Run a short command silently and return its stdout (stderr goes into the error on failure)."""
    args = [os.fspath(a) for a in argv]
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise CommandError(args, None, f"{args[0]}: not found ({exc})") from exc
    if check and done.returncode != 0:
        text = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
        raise CommandError(args, done.returncode, text)
    return done.stdout.decode(errors="replace")


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def probe(argv: Sequence[str | os.PathLike[str]], *, timeout: float = 20.0) -> tuple[bool, str]:
    """Run a short check silently (`docker info`, a version query): (exit 0, its stdout+stderr). A missing
    command or a timeout is a failed check, not an error: the caller decides what it means."""
    args = [os.fspath(a) for a in argv]
    try:
        done = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace").strip()


PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
Stream = int | IO[Any] | None


class Spawned:
    """A command left running beside this process (QEMU, dockerd): its pipes, and a stop that reaches its
    whole process group (it runs in a session of its own), SIGTERM first and SIGKILL after a grace period.

    For a command whose output this process reads or writes while it runs; one that only has to finish
    goes through run() or capture().
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.stdin: IO[bytes] | None = popen.stdin
        self.stdout: IO[bytes] | None = popen.stdout
        self.stderr: IO[bytes] | None = popen.stderr
        self.pid = popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def poll(self) -> int | None:
        return self._popen.poll()

    def wait(self) -> int:
        return self._popen.wait()

    def stop(self, grace: float | None = None) -> None:
        """The whole group stopped and the command reaped (a no-op once it has exited and left no one)."""
        if self._popen.poll() is not None and not _group_alive(self.pid):
            return
        _stop(self._popen, grace)


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdin: Stream = DEVNULL,
    stdout: Stream = PIPE,
    stderr: Stream = PIPE,
    preexec_fn: Callable[[], None] | None = None,
) -> Spawned:
    """Start argv in a session of its own and return at once; logs the command like run().

    Raises OSError when the command cannot be started (the caller says what that means: QEMU missing is a
    failed guest run, dockerd missing a host set-up error)."""
    args = [os.fspath(a) for a in argv]
    console.log(f"[bold cyan]$[/] {shlex.join(args)}")
    popen = subprocess.Popen(
        args, stdin=stdin, stdout=stdout, stderr=stderr, preexec_fn=preexec_fn, start_new_session=True
    )
    return Spawned(popen)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """In a child before exec: the kernel sends it sig when its parent dies, even by SIGKILL (a guest
    left running would hold its overlay and a vCPU's worth of TCG forever). No library exposes prctl."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def foreground(argv: Sequence[str | os.PathLike[str]]) -> int:
    """Run argv attached to this terminal (stdin, stdout and stderr inherited, in our process group so
    that it owns the tty: an interactive guest console) and return its exit status.

    It never outlives us: it gets SIGTERM when this process dies, and is stopped and reaped when the wait is
    interrupted (SIGTERM to us, an exception)."""
    args = [os.fspath(a) for a in argv]
    console.log(f"[bold cyan]$[/] {shlex.join(args)}")
    popen = subprocess.Popen(args, preexec_fn=die_with_parent)
    try:
        return popen.wait()
    finally:
        if popen.poll() is None:
            popen.terminate()
            try:
                popen.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
