"""ptrace-events: ptrace options, stops and signals, driven from Python through ctypes (ptracelib).

Every test forks its own tracee (PTRACE_TRACEME + SIGSTOP, then the scenario), steers it through its
stops, and kills and reaps whatever is left even when an assertion fails.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import ptracelib as pt
import pytest
from ptracelib import Stop

NOBODY = 65534
YAMA_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")


@pytest.fixture
def tracees() -> Iterator[set[int]]:
    """Pids to kill and reap after the test, whatever happened."""
    pids: set[int] = set()
    yield pids
    pt.reap_all(pids)


def drive(
    first: int,
    pids: set[int],
    *,
    request: int = pt.PTRACE_CONT,
    on_stop: Callable[[Stop], int | None] | None = None,
    limit: int = 20000,
) -> list[Stop]:
    """Resume `first` and every tracee that appears, until all have ended; returns every report in order.

    At each stop on_stop may return the signal to resume with; by default a signal-delivery-stop
    re-injects its signal, and every other stop (syscall, event, a new child's SIGSTOP) resumes with 0.
    """
    log: list[Stop] = []
    live = {first}
    fresh: set[int] = set()  # auto-attached children before their first stop
    pt.ptrace(request, first, 0, 0)
    while live or fresh:
        assert len(log) < limit, f"more than {limit} stops: {log[-5:]}"
        stop = pt.wait(-1)
        log.append(stop)
        pids.add(stop.pid)
        if not stop.stopped:
            live.discard(stop.pid)
            fresh.discard(stop.pid)
            continue
        if stop.event in (pt.PTRACE_EVENT_FORK, pt.PTRACE_EVENT_VFORK, pt.PTRACE_EVENT_CLONE):
            child = pt.event_msg(stop.pid)
            pids.add(child)
            if child not in live:
                fresh.add(child)
        first_stop = stop.pid in fresh or stop.pid not in live
        fresh.discard(stop.pid)
        live.add(stop.pid)
        sig = on_stop(stop) if on_stop else None
        if sig is None:
            signal_delivery = not stop.syscall_stop and not stop.event and stop.sig != signal.SIGTRAP
            sig = stop.sig if signal_delivery and not (first_stop and stop.sig == signal.SIGSTOP) else 0
        pt.ptrace(request, stop.pid, 0, sig)
    return log


def _of(log: list[Stop], pid: int) -> list[Stop]:
    return [s for s in log if s.pid == pid]


# --- PTRACE_O_TRACEFORK / TRACECLONE / TRACEEXEC --------------------------------------------------------


def test_tracefork_auto_attaches_the_child_and_reports_its_pid(tracees: set[int]) -> None:
    def body() -> int:
        child = os.fork()
        if child == 0:
            os._exit(7)
        _, status = os.waitpid(child, 0)
        return 0 if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7 else 1

    pid = pt.fork_tracee(body, options=pt.PTRACE_O_TRACEFORK | pt.PTRACE_O_EXITKILL)
    tracees.add(pid)
    seen: dict[str, int] = {}

    def on_stop(stop: Stop) -> int | None:
        if stop.pid == pid and stop.event == pt.PTRACE_EVENT_FORK:
            seen["reported"] = pt.event_msg(pid)
        elif stop.pid != pid and stop.sig == signal.SIGSTOP and "child_tracer" not in seen:
            seen["first_stop"] = stop.pid
            seen["child_tracer"] = pt.tracer_pid(stop.pid)
            status = Path(f"/proc/{stop.pid}/status").read_text()
            seen["child_ppid"] = int(next(x for x in status.splitlines() if x.startswith("PPid:")).split()[1])
            return 0
        return None

    log = drive(pid, tracees, on_stop=on_stop)
    forks = [s for s in _of(log, pid) if s.event == pt.PTRACE_EVENT_FORK]
    assert len(forks) == 1, f"PTRACE_EVENT_FORK stops of the tracee: {log}"
    assert forks[0].sig == signal.SIGTRAP
    child = seen["reported"]
    assert child not in (0, pid)
    assert seen.get("first_stop") == child, f"the reported child {child} never stopped with SIGSTOP: {log}"
    assert seen["child_tracer"] == os.getpid(), "the new child is not traced by us"
    assert seen["child_ppid"] == pid, "the new child's parent is not the tracee"
    assert [s.exited for s in _of(log, child) if not s.stopped] == [7]
    assert [s.exited for s in _of(log, pid) if not s.stopped] == [0], (
        "the tracee did not see its child exit 7"
    )


def test_traceclone_auto_attaches_a_new_thread(tracees: set[int]) -> None:
    def body() -> int:
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
        return 0

    pid = pt.fork_tracee(body, options=pt.PTRACE_O_TRACECLONE | pt.PTRACE_O_EXITKILL)
    tracees.add(pid)
    seen: dict[str, object] = {}

    def on_stop(stop: Stop) -> int | None:
        if stop.pid == pid and stop.event == pt.PTRACE_EVENT_CLONE:
            seen["reported"] = pt.event_msg(pid)
        elif stop.pid != pid and stop.sig == signal.SIGSTOP and "first_stop" not in seen:
            seen["first_stop"] = stop.pid
            seen["in_thread_group"] = Path(f"/proc/{pid}/task/{stop.pid}").is_dir()
            seen["tracer"] = pt.tracer_pid(stop.pid)
            return 0
        return None

    log = drive(pid, tracees, on_stop=on_stop)
    clones = [s for s in _of(log, pid) if s.event == pt.PTRACE_EVENT_CLONE]
    assert len(clones) == 1, f"PTRACE_EVENT_CLONE stops: {log}"
    tid = seen["reported"]
    assert seen.get("first_stop") == tid, f"the new thread {tid} never stopped with SIGSTOP: {log}"
    assert seen["in_thread_group"], f"{tid} is not in /proc/{pid}/task"
    assert seen["tracer"] == os.getpid()
    assert [s.exited for s in _of(log, tid) if not s.stopped] == [0], "the thread's exit was not reported"
    assert [s.exited for s in _of(log, pid) if not s.stopped] == [0]


def test_traceexec_stops_with_the_exec_event(tracees: set[int]) -> None:
    true = next((p for p in ("/bin/true", "/usr/bin/true") if os.access(p, os.X_OK)), None)
    assert true, "no true(1) in the guest"

    def body() -> int:
        os.execv(true, ["true"])
        return 1

    pid = pt.fork_tracee(body, options=pt.PTRACE_O_TRACEEXEC | pt.PTRACE_O_EXITKILL)
    tracees.add(pid)
    seen: dict[str, object] = {}

    def on_stop(stop: Stop) -> int | None:
        if stop.event == pt.PTRACE_EVENT_EXEC:
            seen["former_tid"] = pt.event_msg(stop.pid)
            seen["comm"] = Path(f"/proc/{stop.pid}/comm").read_text().strip()
        return None

    log = drive(pid, tracees, on_stop=on_stop)
    execs = [s for s in log if s.event == pt.PTRACE_EVENT_EXEC]
    assert len(execs) == 1 and execs[0].pid == pid, f"exec event stops: {log}"
    assert seen["former_tid"] == pid, "GETEVENTMSG at the exec stop is the former thread id"
    assert seen["comm"] == "true", "the exec stop comes after the new image is in place"
    plain = [s for s in log if s.stopped and s.sig == signal.SIGTRAP and not s.event]
    assert not plain, f"with TRACEEXEC there is no legacy post-exec SIGTRAP: {plain}"
    assert [s.exited for s in _of(log, pid) if not s.stopped] == [0]


# --- signal-delivery-stop vs syscall-stop ---------------------------------------------------------------


def test_signal_delivery_stop_is_told_apart_from_syscall_stops(tracees: set[int]) -> None:
    def body() -> int:
        got: list[int] = []
        signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
        signal.signal(signal.SIGTRAP, lambda s, f: got.append(s))
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTRAP)  # a real SIGTRAP: WSTOPSIG without the 0x80 bit
        return 0 if got == [signal.SIGUSR1, signal.SIGTRAP] else 3

    pid = pt.fork_tracee(body, options=pt.PTRACE_O_TRACESYSGOOD | pt.PTRACE_O_EXITKILL)
    tracees.add(pid)
    details: list[tuple[Stop, int, int, int, int]] = []  # stop, si_signo, si_code, si_pid, syscall op

    def on_stop(stop: Stop) -> int | None:
        info = pt.siginfo(stop.pid)
        op = pt.syscall_info(stop.pid).op
        details.append((stop, info.si_signo, info.si_code, info.si_pid, op))
        if stop.syscall_stop:
            return 0
        return stop.sig  # a signal-delivery-stop: deliver it

    log = drive(pid, tracees, request=pt.PTRACE_SYSCALL, on_stop=on_stop)
    assert [s.exited for s in log if not s.stopped] == [0], "the tracee's handlers did not both run"
    syscall_stops = [d for d in details if d[0].syscall_stop]
    signal_stops = [d for d in details if not d[0].syscall_stop]
    assert syscall_stops, "no syscall stops under PTRACE_SYSCALL"
    for stop, signo, code, _, op in syscall_stops:
        assert signo == signal.SIGTRAP and code == pt.SYSGOOD_TRAP, f"siginfo at a syscall stop {stop}"
        assert op in (pt.PTRACE_SYSCALL_INFO_ENTRY, pt.PTRACE_SYSCALL_INFO_EXIT)
    assert [d[0].sig for d in signal_stops] == [signal.SIGUSR1, signal.SIGTRAP], (
        f"signal stops: {signal_stops}"
    )
    for stop, signo, code, sender, op in signal_stops:
        assert signo == stop.sig, "GETSIGINFO names the signal of the signal-delivery-stop"
        assert code == pt.SI_USER and sender == pid, "kill(2) from the tracee itself"
        assert op == pt.PTRACE_SYSCALL_INFO_NONE, "a signal-delivery-stop is not a syscall stop"
    # each signal stop follows the exit stop of the kill(2) that raised it
    for index, entry in enumerate(details):
        if not entry[0].syscall_stop:
            previous = details[index - 1]
            assert previous[0].syscall_stop and previous[4] == pt.PTRACE_SYSCALL_INFO_EXIT, (
                f"stop before the {entry[0].sig} signal stop: {previous}"
            )


# --- a signal arriving inside a blocking system call ----------------------------------------------------


def _state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def _wait_blocked(pid: int) -> None:
    deadline = time.monotonic() + 20
    while _state(pid) != "S":
        assert time.monotonic() < deadline, f"tracee never blocked (state {_state(pid)})"
        time.sleep(0.01)
    time.sleep(0.05)


def _interrupted_call(
    tracees: set[int], body: Callable[[], int], is_the_call: Callable[[pt.SyscallInfo], bool], deliver: bool
) -> tuple[list[tuple[str, int, int]], Stop]:
    """Run the tracee under PTRACE_SYSCALL to the entry of the blocking call, let it block, send SIGUSR1,
    and record the stops that follow (kind, number/signal, return value) until the call is entered again
    (or restart_syscall is). deliver: deliver the signal at its signal-delivery-stop, else suppress it."""
    pid = pt.fork_tracee(body, options=pt.PTRACE_O_TRACESYSGOOD | pt.PTRACE_O_EXITKILL)
    tracees.add(pid)
    pt.ptrace(pt.PTRACE_SYSCALL, pid)
    for _ in range(5000):
        stop = pt.wait(pid)
        assert stop.stopped, f"the tracee ended before the blocking call: {stop}"
        info = pt.syscall_info(pid)
        if stop.syscall_stop and info.op == pt.PTRACE_SYSCALL_INFO_ENTRY and is_the_call(info):
            break
        pt.ptrace(pt.PTRACE_SYSCALL, pid, 0, 0 if stop.syscall_stop else stop.sig)
    else:
        raise AssertionError("never saw the blocking call")
    pt.ptrace(pt.PTRACE_SYSCALL, pid)
    _wait_blocked(pid)
    os.kill(pid, signal.SIGUSR1)
    after: list[tuple[str, int, int]] = []
    while True:
        stop = pt.wait(pid)
        assert stop.stopped, f"the tracee ended: {stop} after {after}"
        info = pt.syscall_info(pid)
        if not stop.syscall_stop:
            after.append(("signal", stop.sig, 0))
            pt.ptrace(pt.PTRACE_SYSCALL, pid, 0, stop.sig if deliver else 0)
            continue
        if info.op == pt.PTRACE_SYSCALL_INFO_ENTRY:
            after.append(("entry", info.u.entry.nr, 0))
            if is_the_call(info) or info.u.entry.nr == pt.NR["restart_syscall"]:
                return after, stop
        else:
            after.append(("exit", 0, info.u.exit.rval))
        assert len(after) < 200, f"the call was never entered again: {after}"
        pt.ptrace(pt.PTRACE_SYSCALL, pid)


def _read_scenario(deliver: bool, tracees: set[int]) -> tuple[list[tuple[str, int, int]], int]:
    r, w = os.pipe()

    def body() -> int:
        os.close(w)
        handled: list[int] = []
        signal.signal(signal.SIGUSR1, lambda s, f: handled.append(s))
        data = os.read(r, 1)  # PEP 475: retried after the handler ran
        return 10 * len(handled) + (0 if data == b"x" else 1)

    try:
        after, stop = _interrupted_call(
            tracees, body, lambda i: i.u.entry.nr == pt.NR["read"] and i.u.entry.args[0] == r, deliver
        )
        os.write(w, b"x")
        handled_rc: dict[int, int] = {}

        def on_exit() -> int:
            pt.ptrace(pt.PTRACE_CONT, stop.pid)
            end = pt.wait(stop.pid)
            while end.stopped:
                pt.ptrace(pt.PTRACE_CONT, stop.pid, 0, end.sig if end.sig != pt.SYSGOOD_TRAP else 0)
                end = pt.wait(stop.pid)
            handled_rc[0] = end.exited if end.exited is not None else -1
            return handled_rc[0]

        return after, on_exit()
    finally:
        os.close(r)
        os.close(w)


def test_signal_in_a_blocking_read_with_a_handler(tracees: set[int]) -> None:
    """read() interrupted, signal delivered: exit stop with -ERESTARTSYS, the signal-delivery-stop, the
    handler's rt_sigreturn (returning -EINTR, since Python's handlers have no SA_RESTART), then Python
    retries the read."""
    after, rc = _read_scenario(True, tracees)
    kinds = [(k, n) for k, n, _ in after]
    assert after[0] == ("exit", 0, -pt.ERESTARTSYS), f"first stop after the signal: {after}"
    assert kinds[1] == ("signal", signal.SIGUSR1), f"the signal-delivery-stop follows the exit stop: {after}"
    assert ("entry", pt.NR["rt_sigreturn"]) in kinds[2:], f"no rt_sigreturn: {after}"
    sigreturn = kinds.index(("entry", pt.NR["rt_sigreturn"]))
    assert after[sigreturn + 1] == ("exit", 0, -4), f"rt_sigreturn restores -EINTR: {after}"
    assert kinds[-1] == ("entry", pt.NR["read"]), "the read is entered again"
    assert rc == 10, f"exit {rc}: 10 x handler runs + 1 if the read got no data"


def test_signal_in_a_blocking_read_suppressed_restarts_the_call(tracees: set[int]) -> None:
    """Suppressed at its signal-delivery-stop, the signal runs no handler, and the kernel restarts read()
    itself: exit stop with -ERESTARTSYS, the signal stop, then straight to a new read entry."""
    after, rc = _read_scenario(False, tracees)
    assert after == [
        ("exit", 0, -pt.ERESTARTSYS),
        ("signal", signal.SIGUSR1, 0),
        ("entry", pt.NR["read"], 0),
    ], f"stops after the signal: {after}"
    assert rc == 0, f"exit {rc}: 10 x handler runs + 1 if the read got no data"


def test_signal_in_nanosleep_suppressed_goes_through_restart_syscall(tracees: set[int]) -> None:
    """An interrupted sleep returns -ERESTART_RESTARTBLOCK; with the signal suppressed the kernel resumes
    it through restart_syscall(2), which the tracer sees as that syscall's entry."""

    def body() -> int:
        handled: list[int] = []
        signal.signal(signal.SIGUSR1, lambda s, f: handled.append(s))
        # a relative sleep (time.sleep() sleeps to an absolute deadline, restarted with -ERESTARTNOHAND)
        rc = pt.libc.nanosleep(ctypes.byref(pt.Timespec(1, 500_000_000)), None)
        return 0 if rc == 0 and not handled else 5

    sleeps = {35, pt.NR["clock_nanosleep"]}  # nanosleep, clock_nanosleep
    after, stop = _interrupted_call(tracees, body, lambda i: i.u.entry.nr in sleeps, False)
    assert after == [
        ("exit", 0, -pt.ERESTART_RESTARTBLOCK),
        ("signal", signal.SIGUSR1, 0),
        ("entry", pt.NR["restart_syscall"], 0),
    ], f"stops after the signal: {after}"
    pt.ptrace(pt.PTRACE_DETACH, stop.pid)
    _, status = os.waitpid(stop.pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the sleep ended, no handler ran"


# --- signal injection and suppression -------------------------------------------------------------------


def test_signal_injection_and_suppression(tracees: set[int]) -> None:
    r, w = os.pipe()

    def body() -> int:
        os.close(r)
        counts = {"USR1": 0, "USR2": 0, "HUP": 0}
        signal.signal(signal.SIGUSR1, lambda s, f: counts.__setitem__("USR1", counts["USR1"] + 1))
        signal.signal(signal.SIGUSR2, lambda s, f: counts.__setitem__("USR2", counts["USR2"] + 1))
        signal.signal(signal.SIGHUP, lambda s, f: counts.__setitem__("HUP", counts["HUP"] + 1))
        os.kill(os.getpid(), signal.SIGUSR1)  # the tracer suppresses it
        os.kill(os.getpid(), signal.SIGUSR2)  # the tracer delivers SIGHUP instead
        os.kill(os.getpid(), signal.SIGUSR2)  # delivered as it is
        os.write(w, json.dumps(counts).encode())
        return 0

    try:
        pid = pt.fork_tracee(body, options=pt.PTRACE_O_EXITKILL)
        tracees.add(pid)
        os.close(w)
        w = -1
        seen: list[int] = []
        decisions = {0: 0, 1: signal.SIGHUP}

        def on_stop(stop: Stop) -> int:
            seen.append(stop.sig)
            return decisions.get(len(seen) - 1, stop.sig)

        log = drive(pid, tracees, on_stop=on_stop)
        counts = json.loads(os.read(r, 4096))
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert seen == [signal.SIGUSR1, signal.SIGUSR2, signal.SIGUSR2], f"signal-delivery-stops: {log}"
    assert counts == {"USR1": 0, "USR2": 1, "HUP": 1}, "suppressed, replaced and delivered signals"
    assert [s.exited for s in log if not s.stopped] == [0]


def test_injecting_a_fatal_signal_kills_the_tracee(tracees: set[int]) -> None:
    def body() -> int:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, lambda s, f: None)
        os.kill(os.getpid(), signal.SIGUSR1)
        return 0

    pid = pt.fork_tracee(body, options=pt.PTRACE_O_EXITKILL)
    tracees.add(pid)
    log = drive(pid, tracees, on_stop=lambda stop: signal.SIGTERM)
    ends = [s for s in log if not s.stopped]
    assert [s.killed_by for s in ends] == [signal.SIGTERM], f"reports: {log}"


# --- Yama ptrace_scope ----------------------------------------------------------------------------------


def _drop_to_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    pt.prctl(pt.PR_SET_DUMPABLE, 1)  # setuid cleared it; without it only CAP_SYS_PTRACE could attach


def _fork_waiting_victim(declare_any_tracer: bool) -> int:
    """An unprivileged process (uid nobody, dumpable) that is not a descendant of the tracer below."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            _drop_to_nobody()
            if declare_any_tracer:
                pt.prctl(pt.PR_SET_PTRACER, pt.PR_SET_PTRACER_ANY)
            os.write(w, b"!")
            while True:
                signal.pause()
        finally:
            os._exit(1)
    os.close(w)
    assert os.read(r, 1) == b"!", "the victim did not get ready"
    os.close(r)
    return pid


def _attach_as_nobody(victims: dict[str, int]) -> dict[str, int]:
    """Fork a tracer that drops to uid nobody, forks its own child, and tries PTRACE_ATTACH on the
    victims and on that child; returns the errno of each attempt (0: attached)."""
    r, w = os.pipe()
    tracer = os.fork()
    if tracer == 0:
        code = 1
        try:
            os.close(r)
            _drop_to_nobody()
            child = os.fork()
            if child == 0:
                while True:
                    signal.pause()
            results = {}
            for name, target in [*victims.items(), ("own_child", child)]:
                err = pt.try_ptrace(pt.PTRACE_ATTACH, target)
                if err == 0:
                    pt.wait(target)
                    pt.ptrace(pt.PTRACE_DETACH, target)
                results[name] = err
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            os.write(w, json.dumps(results).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data = os.read(r, 4096)
    os.close(r)
    _, status = os.waitpid(tracer, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"tracer status {status:#x}"
    return json.loads(data)


@pytest.fixture
def yama_scope() -> Iterator[Callable[[int], None]]:
    assert YAMA_SCOPE.exists(), f"{YAMA_SCOPE} is missing: Yama is not active in this kernel"
    before = YAMA_SCOPE.read_text().strip()

    def set_scope(value: int) -> None:
        YAMA_SCOPE.write_text(f"{value}\n")
        assert YAMA_SCOPE.read_text().strip() == str(value)

    try:
        yield set_scope
    finally:
        YAMA_SCOPE.write_text(f"{before}\n")


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        # 1: a non-root tracer may trace only its descendants, or a process that declared it (or any)
        (1, {"stranger": 1, "declared_any": 0, "own_child": 0}),
        # 0: classic ptrace permissions: same uid, dumpable -> allowed (so the EPERM above is Yama's)
        (0, {"stranger": 0, "declared_any": 0, "own_child": 0}),
        # 2: only CAP_SYS_PTRACE may attach, even to one's own child
        (2, {"stranger": 1, "declared_any": 1, "own_child": 1}),
    ],
    ids=["scope1-descendants-only", "scope0-classic", "scope2-admin-only"],
)
def test_yama_ptrace_scope(
    scope: int, expected: dict[str, int], yama_scope: Callable[[int], None], tracees: set[int]
) -> None:
    yama_scope(scope)
    victims = {"stranger": _fork_waiting_victim(False), "declared_any": _fork_waiting_victim(True)}
    tracees.update(victims.values())
    results = _attach_as_nobody(victims)
    names = {0: "attached", 1: "EPERM"}
    got = {k: names.get(v, os.strerror(v)) for k, v in results.items()}
    want = {k: names[v] for k, v in expected.items()}
    assert got == want, f"ptrace_scope={scope}, uid {NOBODY} tracer"
