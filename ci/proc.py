"""The one way this package runs a subprocess: log the command, stream its output, raise with it."""

from __future__ import annotations

import collections
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ci.ui import console

TAIL_LINES = 60
STOP_GRACE_SECONDS = 10.0


class CommandError(RuntimeError):
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
) -> Result:
    """Run argv, streaming merged stdout/stderr line by line.

    on_line receives every line (without newline); when it is None and quiet is False the lines are
    printed dimmed. With keep_output=False only the last lines are kept (for very chatty commands).
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
            stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    except FileNotFoundError as exc:
        raise CommandError(args, None, f"{args[0]}: not found ({exc})") from exc
    if stdin_data is not None:
        assert proc.stdin is not None

        def feed() -> None:
            try:
                proc.stdin.write(stdin_data)  # type: ignore[union-attr]
            finally:
                proc.stdin.close()  # type: ignore[union-attr]

        threading.Thread(target=feed, daemon=True).start()

    lines: collections.deque[str] | list[str] = [] if keep_output else collections.deque(maxlen=TAIL_LINES)
    timed_out = False
    timer = None
    if timeout is not None:

        def kill() -> None:
            nonlocal timed_out
            timed_out = True
            _stop(proc)

        timer = threading.Timer(timeout, kill)
        timer.start()
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            lines.append(line)
            if on_line is not None:
                on_line(line)
            elif not quiet:
                console.print(f"[dim]{_escape(line)}[/]", highlight=False)
        proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        if timer is not None:
            timer.cancel()
    output = "\n".join(lines)
    if check and (proc.returncode != 0 or timed_out):
        raise CommandError(args, proc.returncode, output, timed_out=timed_out)
    return Result(args, proc.returncode, output, time.monotonic() - start)


def _stop(proc: subprocess.Popen[bytes], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM first (a `docker run` client forwards it to the container, so the build inside stops too;
    SIGKILL of the client would leave the container running), SIGKILL after the grace period."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
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
