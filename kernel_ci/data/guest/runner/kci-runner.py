#!/usr/bin/env python3
"""kci-runner: runs the plan's suites inside the guest, as guest-tests/PROTOCOL.md describes.

Standard library only (the guest has python3 and python3-pytest, nothing from pip). In the guest it is
PID 1 (kci-init execs it) and ends the VM by rebooting (QEMU runs with -no-reboot). For host tests,
--no-reboot (or KCI_RUNNER_NO_REBOOT=1) makes it just exit, and --insmod/--rmmod (or KCI_RUNNER_INSMOD /
KCI_RUNNER_RMMOD) replace the module commands, and KCI_RUNNER_PRELOAD=1 imports pytest first, as a warm
start does, so that the Python suites are forked from the runner.
"""

from __future__ import annotations

# Only what running a suite needs is imported up front: under TCG every module costs (argparse, ctypes
# and traceback were ~0.3 s of the guest's boot to its first test). ctypes (reboot) and traceback (a
# crash) are imported where used, and the command line is parsed by hand (parse_args).
import contextlib
import importlib
import json
import os
import re
import selectors
import shlex
import signal
import subprocess
import sys
import time

RB_AUTOBOOT = 0x01234567
KILL_GRACE = 5.0  # seconds between SIGINT (pytest still writes its junit.xml) and SIGKILL
DRAIN_SECONDS = 2.0  # after the suite's process exited, how long to wait for its pipe to close
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
# Warm start (PROTOCOL.md, Warm start): with this word on the kernel command line the runner unmounts the
# 9p shares (QEMU refuses to snapshot a guest with one mounted), imports pytest, says WARM_READY and
# waits for the host's GO line on the console; the host may snapshot the guest there and restore that
# snapshot for later runs of the same kernel instead of booting it.
WARM_ARG = "kci.warm=1"
WARM_READY = "KCI-WARM: ready"
GO_PREFIX = b"KCI-GO "
SHARES = ("/kci", "/kci-results")
FSTAB = "/run/kci-fstab"  # kci-init's table of the mounts, the two 9p shares among them
PYTEST_MODULE = ["python3", "-m", "pytest"]


def say(text: str) -> None:
    """One line on the console (stdout is the console in the guest)."""
    sys.stdout.buffer.write(text.encode("utf-8", "replace") + b"\n")
    sys.stdout.buffer.flush()


class Tee:
    """Suite output: raw bytes to output.txt, and line by line to the console with a `[name] ` prefix."""

    def __init__(self, out, name: str) -> None:
        self.out = out
        self.prefix = f"[{name}] ".encode()
        self.partial = b""

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.out.flush()
        self.partial += data
        *lines, self.partial = self.partial.split(b"\n")
        if len(self.partial) > 4096:
            lines.append(self.partial)
            self.partial = b""
        for line in lines:
            sys.stdout.buffer.write(self.prefix + line.rstrip(b"\r") + b"\n")
        sys.stdout.buffer.flush()

    def close(self) -> None:
        if self.partial:
            sys.stdout.buffer.write(self.prefix + self.partial + b"\n")
            sys.stdout.buffer.flush()
            self.partial = b""


def expand(arg: str, env: dict[str, str]) -> str:
    """$VAR and ${VAR} from the suite's environment; unknown names stay as written."""
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), arg)


def killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def default_signals() -> None:
    """In the child: SIGINT (how a timeout asks a suite to stop) and SIGQUIT as default. An ignored signal
    is inherited across exec (a runner started in the background by a shell ignores SIGINT), and Python
    installs no KeyboardInterrupt handler for an ignored SIGINT: pytest could not write its results."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


class CaseTimer:
    """Fires kselftest_harness's own per-test timeout early for the cases the plan names (case_timeouts,
    from expected-failures.toml): when "RUN <case>" shows in the output, the harness process of that
    binary gets SIGALRM after the case's seconds unless the case ended first. The harness handles it as
    its 30 s alarm: it kills the case and reports "Test terminated by timeout"; nothing else changes."""

    def __init__(self, cases: list[dict], session: int) -> None:
        self.cases = {str(c["case"]): (str(c["binary"]), float(c["seconds"])) for c in cases}
        self.session = session
        self.pending: dict[str, float] = {}  # case -> when to fire
        self.partial = b""

    def feed(self, data: bytes, now: float) -> None:
        if not self.cases:
            return
        *lines, self.partial = (self.partial + data).split(b"\n")
        self.partial = self.partial[-4096:]
        for raw in lines:
            words = raw.decode("utf-8", "replace").replace("#", " ").split()
            if len(words) >= 2 and words[1] in self.cases:
                if words[0] == "RUN":
                    self.pending[words[1]] = now + self.cases[words[1]][1]
                elif words[0] in ("OK", "FAIL", "SKIP", "XFAIL"):
                    self.pending.pop(words[1], None)

    def next_at(self) -> float | None:
        return min(self.pending.values(), default=None)

    def fire(self, now: float) -> None:
        for case, at in list(self.pending.items()):
            if now >= at:
                binary, seconds = self.cases[case]
                pids = harness_pids(binary, self.session)
                say(f"kci-runner: {case}: the harness timeout fired after {seconds:g} s (pids {pids})")
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGALRM)
                del self.pending[case]


def harness_pids(binary: str, session: int) -> list[int]:
    """The harness (parent) processes of `binary` in the suite's session: a case runs in a forked child
    of the same name, which must not get the signal (SIGALRM's default action would just kill it)."""
    comm = os.path.basename(binary)[:15]
    procs: dict[int, tuple[str, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        procs[int(entry)] = (name, int(fields[1]), int(fields[3]))  # comm, ppid, session
    return sorted(
        pid
        for pid, (name, ppid, sid) in procs.items()
        if name == comm and sid == session and procs.get(ppid, ("", 0, 0))[0] != comm
    )


def run_suite_process(
    argv: list[str],
    cwd: str,
    env: dict[str, str],
    timeout: float,
    output: str,
    name: str,
    grace: float,
    case_timeouts: list[dict] | None = None,
) -> tuple[int, bool]:
    """Run argv in its own process group, tee its output, kill the whole group on timeout.

    Returns (exit status, timed_out). The status is negative when a signal ended the process.
    """
    with open(output, "wb") as out:
        tee = Tee(out, name)
        proc: ForkedPytest | subprocess.Popen[bytes]
        try:
            if argv[:3] == PYTEST_MODULE and "pytest" in sys.modules:
                proc = ForkedPytest(argv[3:], cwd, env)
            else:
                proc = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=default_signals,
                )
        except OSError as exc:
            tee.write(f"kci-runner: cannot start {argv[0]}: {exc}\n".encode())
            tee.close()
            return (127 if isinstance(exc, FileNotFoundError) else 126), False
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        selector = selectors.DefaultSelector()
        selector.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        cases = CaseTimer(case_timeouts or [], proc.pid)
        kill_at: float | None = None
        drain_until: float | None = None
        timed_out = eof = False
        while True:
            now = time.monotonic()
            if not timed_out and now >= deadline:
                timed_out = True
                killpg(proc.pid, signal.SIGINT)
                kill_at = now + grace
            if kill_at is not None and now >= kill_at:
                killpg(proc.pid, signal.SIGKILL)
                kill_at = None
            if proc.poll() is not None:
                if drain_until is None:
                    killpg(proc.pid, signal.SIGKILL)  # what the suite left in its group goes too
                    kill_at = None
                    drain_until = now + DRAIN_SECONDS
                if eof or now >= drain_until:
                    break
            cases.fire(now)
            limits = [
                t - now
                for t in (deadline, kill_at, drain_until, cases.next_at())
                if t is not None and t > now
            ]
            wait = min([0.2, *limits])
            if eof:
                time.sleep(wait)  # the suite closed its output but still runs
                continue
            if not selector.select(timeout=wait):
                continue
            data = os.read(fd, 65536)
            if data:
                tee.write(data)
                cases.feed(data, time.monotonic())
            else:
                eof = True
        selector.close()
        proc.stdout.close()
        tee.close()
        killpg(proc.pid, signal.SIGKILL)
        return proc.wait(), timed_out


class ForkedPytest:
    """`python3 -m pytest ARGS` as a fork of the runner, which imported pytest while the guest waited to be
    snapshotted (warm start): that import is ~3 s under TCG, paid once per kernel instead of once per
    suite. Offers the part of subprocess.Popen that run_suite_process uses (pid, stdout, poll, wait)."""

    def __init__(self, args: list[str], cwd: str, env: dict[str, str]) -> None:
        read_end, write_end = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(read_end)
            pytest_child(args, cwd, env, write_end)
        os.close(write_end)
        self.stdout = os.fdopen(read_end, "rb", buffering=0)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def pytest_child(args: list[str], cwd: str, env: dict[str, str], out_fd: int) -> None:
    """The forked suite process: what `python3 -m pytest ARGS` in cwd with env would be (its own session,
    stdin from /dev/null, stdout and stderr into out_fd, cwd first on sys.path, no .pyc written), then
    pytest's main. Never returns."""
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a timeout's SIGINT: junit.xml is written
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(null)
        os.close(out_fd)
        sys.stdout.reconfigure(write_through=True)  # type: ignore[union-attr]  # PYTHONUNBUFFERED's effect
        sys.stderr.reconfigure(write_through=True)  # type: ignore[union-attr]
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        sys.path[:0] = [cwd, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
        sys.dont_write_bytecode = True
        sys.argv = ["pytest", *args]
        # pytest.main, not console_main (deprecated since pytest 9); by name: the host's lint has no pytest
        code = int(importlib.import_module("pytest").main(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def warm_requested(cmdline: str = "/proc/cmdline") -> bool:
    """Whether the host booted this guest for a warm start (only as PID 1: host tests run the runner too)."""
    if os.getpid() != 1:
        return False
    try:
        with open(cmdline) as handle:
            return WARM_ARG in handle.read().split()
    except OSError:
        return False


def preload_pytest() -> None:
    """Import pytest as `python3 -m pytest` would find it: the runner starts with -I -S, so the system's
    site-packages are added first. A guest without pytest just runs its Python suites the plain way."""
    import site

    site.main()
    with contextlib.suppress(ImportError):
        importlib.import_module("pytest")


def wait_for_go(console: int = 0) -> int:
    """WARM_READY on the console, then the host's `KCI-GO <ns since the epoch>` line read from it (echo
    off, so the host's line is not printed back). Returns the host's time in nanoseconds."""
    import termios

    attrs = termios.tcgetattr(console)
    quiet = list(attrs)
    quiet[3] &= ~(termios.ECHO | termios.ECHONL)
    termios.tcsetattr(console, termios.TCSANOW, quiet)
    try:
        say(WARM_READY)
        while True:
            line = os.read(console, 4096).strip()
            if line.startswith(GO_PREFIX) and line[len(GO_PREFIX) :].isdigit():
                return int(line[len(GO_PREFIX) :])
    finally:
        termios.tcsetattr(console, termios.TCSANOW, attrs)


def warm_start() -> None:
    """Unmount the shares, import pytest, wait for GO (the host may snapshot the guest meanwhile, and
    restore it many times), take the host's clock (a restored guest's is the snapshot's), mount the shares
    again: from here the run is a cold boot's."""
    subprocess.run(["umount", *SHARES], check=False)
    preload_pytest()
    host_ns = wait_for_go()
    with contextlib.suppress(OSError):
        time.clock_settime_ns(time.CLOCK_REALTIME, host_ns)
    subprocess.run(["mount", "-a", "-t", "9p", "-T", FSTAB], check=False)
    missing = [share for share in SHARES if not os.path.ismount(share)]
    if missing:
        raise RuntimeError(f"warm start: cannot mount {' '.join(missing)} again")


def module_name(path: str) -> str:
    base = os.path.basename(path)
    return (base[:-3] if base.endswith(".ko") else base).replace("-", "_")


def run_module_command(command: list[str], target: str, timeout: float) -> str | None:
    """None on success, else a one-line description of the failure."""
    argv = [*command, target]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"{shlex.join(argv)}: timed out after {timeout:.0f}s"
    except OSError as exc:
        return f"{shlex.join(argv)}: {exc}"
    if done.returncode != 0:
        text = (done.stdout + done.stderr).decode("utf-8", "replace").strip()
        return f"{shlex.join(argv)}: exit status {done.returncode}: {text}"
    return None


def write_status(directory: str, status: dict) -> None:
    tmp = os.path.join(directory, "status.json.tmp")
    with open(tmp, "w") as handle:
        json.dump(status, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, os.path.join(directory, "status.json"))


class Runner:
    def __init__(self, args: Args) -> None:
        self.args = args
        self.payload = os.path.abspath(args.payload or os.path.dirname(os.path.abspath(args.plan)))
        self.results = os.path.abspath(args.results)
        self.insmod = shlex.split(args.insmod)
        self.rmmod = shlex.split(args.rmmod)

    def suite_env(self, suite: dict, release: str, attempt: int = 0) -> dict[str, str]:
        name = suite["name"]
        env = dict(os.environ)
        env.setdefault("PATH", DEFAULT_PATH)
        env.setdefault("HOME", "/root")
        env.setdefault("LANG", "C.UTF-8")
        env.update(
            {
                "KCI_SUITE": name,
                "KCI_ARTIFACTS": os.path.join(self.results, name, "artifacts"),
                "KCI_JUNIT": os.path.join(self.results, name, "junit.xml"),
                "KCI_KERNEL_RELEASE": release,
                "KCI_PAYLOAD": self.payload,
                "KCI_ATTEMPT": str(attempt),
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "1",
                # pytest's search of every installed distribution for plugin entry points: ~0.2 s of
                # each Python suite's start under TCG, for nothing: the rootfs installs no pytest plugin
                # (a suite that wants one installed later names it: `-p name`).
                "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            }
        )
        return env

    def run(self) -> None:
        with open(self.args.plan) as handle:
            plan = json.load(handle)
        release = plan.get("kernel_release", "")
        attempt = int(plan.get("attempt", 0))
        for suite in plan["suites"]:
            self.run_suite(suite, release, attempt)
            reap_orphans()
        say("KCI-RUNNER: done")

    def run_suite(self, suite: dict, release: str, attempt: int = 0) -> None:
        name = suite["name"]
        directory = os.path.join(self.results, name)
        say(f"KCI-SUITE-START: {name}")
        started = time.monotonic()
        rc: int | None = None
        timed_out = False
        errors: list[str] = []
        try:
            os.makedirs(os.path.join(directory, "artifacts"), exist_ok=True)
            timeout = float(suite["timeout"])
            loaded: list[str] = []
            for module in suite.get("modules", []):
                path = os.path.join(self.payload, module)
                error = run_module_command(self.insmod, path, timeout)
                if error is not None:
                    errors.append(error)
                    say(f"KCI-RUNNER: {error}")
                    break
                loaded.append(path)
            if not errors:
                env = self.suite_env(suite, release, attempt)
                argv = [expand(arg, env) for arg in suite["argv"]]
                cwd = os.path.join(self.payload, suite.get("workdir", "."))
                output = os.path.join(directory, "output.txt")
                rc, timed_out = run_suite_process(
                    argv,
                    cwd,
                    env,
                    timeout,
                    output,
                    name,
                    self.args.kill_grace,
                    suite.get("case_timeouts", []),
                )
            for path in reversed(loaded):
                error = run_module_command(self.rmmod, module_name(path), timeout)
                if error is not None:
                    errors.append(error)
                    say(f"KCI-RUNNER: {error}")
        except Exception as exc:  # keep going with the next suite; the host sees the message
            errors.append(f"kci-runner: {exc!r}")
            say(f"KCI-RUNNER: suite {name} failed: {exc!r}")
        seconds = time.monotonic() - started
        status = {
            "name": name,
            "rc": rc,
            "seconds": round(seconds, 3),
            "timed_out": timed_out,
            "module_errors": errors,
        }
        try:
            write_status(directory, status)
        except OSError as exc:
            say(f"KCI-RUNNER: cannot write {directory}/status.json: {exc}")
        shown = "none" if rc is None else str(rc)
        say(f"KCI-SUITE-END: {name} rc={shown} seconds={seconds:.2f} timed_out={int(timed_out)}")


def reap_orphans() -> None:
    """As PID 1, collect the zombies of processes the suites orphaned."""
    if os.getpid() != 1:
        return
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def reboot() -> None:
    import ctypes  # here: only the last thing the runner does needs it

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.reboot(RB_AUTOBOOT) != 0:
        say(f"KCI-RUNNER: reboot failed: {os.strerror(ctypes.get_errno())}")


DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2"}  # fmt: skip


def dev_links(dev: str = "/dev") -> None:
    """What udev would create (the guest has none): /dev/fd and the standard streams, which kselftest's
    runner and shell scripts write through. Made here rather than by kci-init: four `ln` processes cost
    ~0.1 s under TCG, os.symlink nothing."""
    for name, target in DEV_LINKS.items():
        with contextlib.suppress(FileExistsError):
            os.symlink(target, os.path.join(dev, name))


USAGE = """usage: kci-runner.py [-h] [--payload DIR] [--results DIR] [--no-reboot] [--insmod CMD]
                     [--rmmod CMD] [--kill-grace S] plan

  plan             plan.json (its folder is the payload root unless --payload)
  --payload DIR    payload root (default: the plan's folder)
  --results DIR    results root (default /kci-results)
  --no-reboot      exit instead of rebooting (host tests); also KCI_RUNNER_NO_REBOOT=1
  --insmod CMD     the module load command (default insmod; also KCI_RUNNER_INSMOD)
  --rmmod CMD      the module unload command (default rmmod; also KCI_RUNNER_RMMOD)
  --kill-grace S   SIGINT to SIGKILL delay in seconds (default 5)"""


class Args:
    """The parsed command line (a plain class: dataclasses imports inspect, ~0.1 s under TCG)."""

    def __init__(self, *, no_reboot: bool = False, insmod: str = "insmod", rmmod: str = "rmmod") -> None:
        self.plan = ""
        self.payload: str | None = None
        self.results = "/kci-results"
        self.no_reboot = no_reboot
        self.insmod = insmod
        self.rmmod = rmmod
        self.kill_grace = KILL_GRACE


_VALUED = {"--payload": "payload", "--results": "results", "--insmod": "insmod", "--rmmod": "rmmod",
           "--kill-grace": "kill_grace"}  # fmt: skip


def parse_args(argv: list[str]) -> Args:
    """The command line, by hand: argparse alone took ~0.1 s to import under TCG. Options take their
    value as the next word or after "="; the one positional is the plan. A command line it does
    not accept raises ValueError (standard library only: the guest has no kernel_ci to derive from)."""
    args = Args(
        no_reboot=os.environ.get("KCI_RUNNER_NO_REBOOT") == "1",
        insmod=os.environ.get("KCI_RUNNER_INSMOD", "insmod"),
        rmmod=os.environ.get("KCI_RUNNER_RMMOD", "rmmod"),
    )
    plans: list[str] = []
    words = iter(argv)
    for word in words:
        name, eq, value = word.partition("=")
        if word == "--no-reboot":
            args.no_reboot = True
        elif name in _VALUED:
            if not eq:
                value = next(words, None)  # type: ignore[assignment]
                if value is None:
                    raise ValueError(f"{name} needs a value")
            field = _VALUED[name]
            if field == "kill_grace":
                try:
                    args.kill_grace = float(value)
                except ValueError:
                    raise ValueError(f"--kill-grace: not a number: {value!r}") from None
            else:
                setattr(args, field, value)
        elif word.startswith("-") and word != "-":
            raise ValueError(f"unknown option {word}")
        else:
            plans.append(word)
    if len(plans) != 1:
        raise ValueError("one plan.json expected" if not plans else f"unexpected arguments: {plans[1:]}")
    args.plan = plans[0]
    return args


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if "-h" in words or "--help" in words:
        print(__doc__.splitlines()[0] + "\n\n" + USAGE)
        return 0
    try:
        args = parse_args(words)
    except ValueError as exc:
        print(f"{USAGE}\nkci-runner.py: error: {exc}", file=sys.stderr)
        return 2
    status = 0
    try:
        if os.getpid() == 1:
            dev_links()
        if warm_requested():
            warm_start()
        elif os.environ.get("KCI_RUNNER_PRELOAD") == "1":
            preload_pytest()  # host tests: the warm start's forked Python suites, without the wait
        Runner(args).run()
    except Exception as exc:
        import traceback  # here: only a crash needs it

        say(f"KCI-RUNNER: crashed: {exc!r}")
        for line in traceback.format_exc().splitlines():
            say(f"KCI-RUNNER: {line}")
        status = 1
    finally:
        os.sync()
        if not args.no_reboot:
            reboot()
    return status


if __name__ == "__main__":
    sys.exit(main())
