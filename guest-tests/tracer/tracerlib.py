"""Helpers of the tracer suite: ioctl numbers, /proc/tracer parsing, module loading, parked workloads."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PAYLOAD_MODULES = Path(os.environ.get("KCI_PAYLOAD", "/kci")) / "modules"
TRACER = "tracer"
WORKLOAD = "tracer_workload"
PROC = Path("/proc/tracer")
STATS = Path("/proc/tracer_stats")
DEV = Path("/dev/tracer")
WL_DEV = Path("/dev/tracer_workload")

COLUMNS = ["PID", "kmalloc", "kfree", "kmalloc_mem", "kfree_mem", "sched", "up", "down", "lock", "unlock"]
COUNTERS = COLUMNS[1:]

# asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr
_IOC_NONE, _IOC_WRITE = 0, 1


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | kind << 8 | nr


# tracer.h: _IOW(_IOC_WRITE, 42, pid_t), _IOW(_IOC_WRITE, 43, pid_t): the "type" is _IOC_WRITE (1)
TRACER_ADD_PROCESS = _ioc(_IOC_WRITE, _IOC_WRITE, 42, 4)
TRACER_REMOVE_PROCESS = _ioc(_IOC_WRITE, _IOC_WRITE, 43, 4)

# tracer_workload.h
WL_RUN_FORMAT = "5I"  # count, size, step, ops, flags
WL_RUN = _ioc(_IOC_WRITE, ord("W"), 1, struct.calcsize(WL_RUN_FORMAT))
WL_WAIT = _ioc(_IOC_NONE, ord("W"), 2, 0)
WL_RELEASE = _ioc(_IOC_NONE, ord("W"), 3, 0)
WL_MISS = _ioc(_IOC_NONE, ord("W"), 4, 0)
WL_LEAK = _ioc(_IOC_NONE, ord("W"), 5, 0)
WL_LEAK_SIZE = 777
WL_OP_KMALLOC, WL_OP_MUTEX, WL_OP_SEM, WL_OP_SCHED = 0x1, 0x2, 0x4, 0x8
WL_OP_ALL = 0xF  # one operation per column
WL_OP_BULK, WL_OP_KFREE_RCU = 0x10, 0x20  # frees that bypass kfree(): kfree_bulk(), kvfree_rcu()
WL_PARK = 0x1
WL_PARKED_BEFORE, WL_PARKED_AFTER = 1, 3


# ---- modules ----


def loaded_modules() -> set[str]:
    return {line.split()[0] for line in Path("/proc/modules").read_text().splitlines() if line.strip()}


# Modules are loaded and removed with the system calls insmod(8) and rmmod(8) make, from this process: a
# fork and exec of kmod took ~75 ms in an idle TCG guest, and the stress test's cycles run two per cycle
# beside three busy workers. (x86_64 numbers: the guest is x86_64, as the whole build is.)
_LIBC = ctypes.CDLL(None, use_errno=True)
_SYS_FINIT_MODULE, _SYS_DELETE_MODULE = 313, 176


def _syscall(number: int, *args: object) -> int:
    """0, or the errno of a failed system call."""
    return 0 if _LIBC.syscall(number, *args) == 0 else ctypes.get_errno()


def insmod(name: str, *params: str) -> None:
    """finit_module(2) of the payload's NAME.ko with PARAMS, as insmod(8)."""
    ko = PAYLOAD_MODULES / f"{name}.ko"
    fd = os.open(ko, os.O_RDONLY | os.O_CLOEXEC)
    try:
        failed = _syscall(_SYS_FINIT_MODULE, fd, " ".join(params).encode(), 0)
    finally:
        os.close(fd)
    assert not failed, f"insmod {ko} {' '.join(params)}: {os.strerror(failed)} (dmesg may say more)"


def rmmod(name: str) -> None:
    """delete_module(2) of NAME, without waiting for its users, as rmmod(8)."""
    failed = _syscall(_SYS_DELETE_MODULE, name.encode(), os.O_NONBLOCK)
    assert not failed, f"rmmod {name}: {os.strerror(failed)}"


def ensure_loaded(name: str) -> None:
    if name not in loaded_modules():
        insmod(name)


def ensure_unloaded(name: str) -> None:
    if name in loaded_modules():
        if name == TRACER:
            unload_tracer()
        else:
            rmmod(name)


DEBUGFS = Path("/sys/kernel/debug")
KPROBES_LIST = DEBUGFS / "kprobes" / "list"
TRACER_SYMBOLS = {
    "__kmalloc",
    "kfree",
    "schedule",
    "up",
    "down_interruptible",
    "mutex_lock",
    "mutex_lock_nested",
    "mutex_unlock",
    "kmem_cache_free_bulk",
}


def debugfs_ready() -> None:
    if not KPROBES_LIST.exists():
        subprocess.run(["mount", "-t", "debugfs", "none", str(DEBUGFS)], capture_output=True)
    assert KPROBES_LIST.exists(), f"no {KPROBES_LIST} (CONFIG_KPROBES, CONFIG_DEBUG_FS)"


def kprobes_listed(symbols: set[str]) -> list[str]:
    """The lines of the kprobe core's list of probes placed on any of symbols (at offset 0)."""
    found = []
    for line in KPROBES_LIST.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2].split("+")[0] in symbols:
            found.append(line)
    return found


def unload_tracer(timeout: float = 20.0) -> float:
    """rmmod tracer, then wait until the kprobe core lists none of its probes; returns the seconds waited."""
    rmmod(TRACER)
    started = time.monotonic()
    while True:
        left = kprobes_listed(TRACER_SYMBOLS)
        if not left:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, "probes not released after unload:\n" + "\n".join(left)
        time.sleep(0.02)


KPROBES_OPTIMIZATION = Path("/proc/sys/debug/kprobes-optimization")


# ---- /proc/tracer ----


@dataclass
class Table:
    text: str
    rows: dict[int, dict[str, int]]

    def __contains__(self, pid: int) -> bool:
        return pid in self.rows

    def __getitem__(self, pid: int) -> dict[str, int]:
        return self.rows[pid]


def parse(text: str) -> Table:
    """Parse /proc/tracer strictly: the exact header, then one line of 10 integers per pid, no pid twice."""
    lines = text.splitlines()
    assert lines, "/proc/tracer is empty (no header)"
    assert lines[0].split() == COLUMNS, f"bad header {lines[0]!r}"
    rows: dict[int, dict[str, int]] = {}
    for line in lines[1:]:
        fields = line.split()
        assert len(fields) == len(COLUMNS), f"bad line {line!r} in\n{text}"
        values = [int(f) for f in fields]
        assert all(v >= 0 for v in values), f"negative value in {line!r}"
        assert values[0] not in rows, f"pid {values[0]} listed twice in\n{text}"
        rows[values[0]] = dict(zip(COUNTERS, values[1:], strict=True))
    return Table(text, rows)


def table() -> Table:
    return parse(PROC.read_text())


def stats() -> tuple[dict[str, dict[str, str]], dict[str, list[str]], str]:
    """/proc/tracer_stats: ({symbol: {maxactive, nmissed}}, {"processes"/"records": fields}, text)."""
    text = STATS.read_text()
    lines = text.splitlines()
    assert lines[0].split() == ["probe", "maxactive", "nmissed"], f"bad stats header in\n{text}"
    probes: dict[str, dict[str, str]] = {}
    pools: dict[str, list[str]] = {}
    for line in lines[1:]:
        fields = line.split()
        if fields[0] in ("processes", "records"):
            pools[fields[0]] = fields[1:]
        else:
            assert len(fields) == 3, f"bad stats line {line!r}"
            probes[fields[0]] = {"maxactive": fields[1], "nmissed": fields[2]}
    return probes, pools, text


def nmissed(symbol: str) -> int:
    return int(stats()[0][symbol]["nmissed"])


def pool_used(pool: str) -> int:
    return int(stats()[1][pool][0].split("/")[0])


# ---- control ----


class Tracer:
    """An open /dev/tracer."""

    def __init__(self) -> None:
        self.fd = os.open(DEV, os.O_RDWR)

    def close(self) -> None:
        os.close(self.fd)

    def ioctl(self, cmd: int, arg: int) -> int:
        return fcntl.ioctl(self.fd, cmd, arg)

    def add(self, pid: int) -> None:
        self.ioctl(TRACER_ADD_PROCESS, pid)

    def remove(self, pid: int) -> None:
        self.ioctl(TRACER_REMOVE_PROCESS, pid)

    def error(self, cmd: int, arg: int) -> int:
        """The errno of an ioctl expected to fail (0 if it succeeded)."""
        try:
            self.ioctl(cmd, arg)
        except OSError as e:
            return e.errno
        return 0


def errname(code: int) -> str:
    return errno.errorcode.get(code, str(code)) if code else "success"


# ---- processes ----


_SLEEPER_PIPES: dict[int, int] = {}


def proc_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat (R, S, D, Z...)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def wait_asleep(pid: int, timeout: float = 10.0) -> None:
    """Until pid sleeps in read(2) (on the pipe it never gets data from), stably for 100 ms."""
    deadline = time.monotonic() + timeout
    stable = 0
    while stable < 5:
        syscall = Path(f"/proc/{pid}/syscall").read_text().split()
        stable = stable + 1 if proc_state(pid) == "S" and syscall[:1] == ["0"] else 0
        assert time.monotonic() < deadline, f"pid {pid} never went to sleep in read(2)"
        time.sleep(0.02)


def voluntary_switches(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches in /proc/{pid}/status")


def sleeper(pipes: int = 0) -> int:
    """A forked child that sleeps in read(2) until killed; returns its pid once it sleeps (reap with
    kill_and_reap). poke(pid) wakes it once: it then makes `pipes` pipes (their buffers are __kmalloc'd
    and live until it exits) and sleeps again."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            os.read(r, 1)
            keep = [os.pipe() for _ in range(pipes)]
            while keep is not None:
                os.read(r, 1)
        finally:
            os._exit(1)
    os.close(r)
    _SLEEPER_PIPES[pid] = w
    wait_asleep(pid)
    return pid


def poke(pid: int) -> None:
    """Wake a sleeper once and wait until it sleeps again."""
    before = voluntary_switches(pid)
    os.write(_SLEEPER_PIPES[pid], b"x")
    deadline = time.monotonic() + 10
    while voluntary_switches(pid) == before:
        assert time.monotonic() < deadline, f"pid {pid} did not wake up"
        time.sleep(0.02)
    wait_asleep(pid)


def kill_and_reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
    os.waitpid(pid, 0)
    if pid in _SLEEPER_PIPES:
        os.close(_SLEEPER_PIPES.pop(pid))


def wait_gone(pid: int, timeout: float = 10.0) -> Table:
    """Read /proc/tracer until pid is no longer listed (or timeout); the last table."""
    deadline = time.monotonic() + timeout
    while True:
        t = table()
        if pid not in t or time.monotonic() > deadline:
            return t
        time.sleep(0.05)


@dataclass
class Workload:
    """One forked worker that runs WL_RUN on a shared /dev/tracer_workload file."""

    count: int
    size: int = 64
    step: int = 0
    ops: int = WL_OP_ALL
    park: bool = True

    def start(self) -> None:
        self.wl_fd = os.open(WL_DEV, os.O_RDWR)
        flags = WL_PARK if self.park else 0
        arg = struct.pack(WL_RUN_FORMAT, self.count, self.size, self.step, self.ops, flags)
        self.pid = os.fork()
        if self.pid == 0:
            code = 0
            try:
                fcntl.ioctl(self.wl_fd, WL_RUN, arg)
            except OSError as e:
                code = e.errno or 100
            except BaseException:
                code = 101
            os._exit(code)

    def wait(self, phase: int) -> None:
        fcntl.ioctl(self.wl_fd, WL_WAIT, phase)

    def release(self) -> None:
        fcntl.ioctl(self.wl_fd, WL_RELEASE, 0)

    def finish(self) -> int:
        """Reap the worker; its exit status (0, or the errno of WL_RUN)."""
        try:
            _, status = os.waitpid(self.pid, 0)
        finally:
            os.close(self.wl_fd)
        return os.waitstatus_to_exitcode(status)

    def abort(self) -> None:
        kill_and_reap(self.pid)
        os.close(self.wl_fd)

    def expected(self) -> dict[str, int]:
        n = self.count
        on = {
            WL_OP_KMALLOC: ("kmalloc", "kfree"),
            WL_OP_MUTEX: ("lock", "unlock"),
            WL_OP_SEM: ("down", "up"),
            WL_OP_SCHED: ("sched",),
        }
        exp = dict.fromkeys(COUNTERS, 0)
        for op, cols in on.items():
            if self.ops & op:
                for c in cols:
                    exp[c] = n
        nbytes = sum(self.size + i * self.step for i in range(n))
        if self.ops & WL_OP_KMALLOC:
            exp["kmalloc_mem"] = exp["kfree_mem"] = nbytes
        # kfree_bulk(): the blocks' bytes are released by the caller, in no kfree() call
        if self.ops & WL_OP_BULK:
            exp["kmalloc"] += n
            exp["kmalloc_mem"] += nbytes
            exp["kfree_mem"] += nbytes
        # kvfree_rcu(): released later, by whoever runs the RCU batch (never the caller)
        if self.ops & WL_OP_KFREE_RCU:
            exp["kmalloc"] += n
            exp["kmalloc_mem"] += nbytes
        return exp


@dataclass
class Measured:
    before: Table
    after: Table
    pid: int
    status: int

    def delta(self) -> dict[str, int]:
        return {c: self.after[self.pid][c] - self.before[self.pid][c] for c in COUNTERS}

    def describe(self) -> str:
        return f"pid {self.pid}\n--- /proc/tracer before:\n{self.before.text}--- after:\n{self.after.text}"


def measure(tracer: Tracer, *workloads: Workload) -> list[Measured]:
    """Run parked workloads in monitored children; snapshot /proc/tracer while all are parked before and
    after their work. Between the two snapshots each worker only does its work (see tracer_workload.c)."""
    for w in workloads:
        w.start()
    try:
        for w in workloads:
            tracer.add(w.pid)
        for w in workloads:
            w.wait(WL_PARKED_BEFORE)
        before = table()
        for w in workloads:
            w.release()
        for w in workloads:
            w.wait(WL_PARKED_AFTER)
        after = table()
        for w in workloads:
            w.release()
    except BaseException:
        for w in workloads:
            w.abort()
        raise
    return [Measured(before, after, w.pid, w.finish()) for w in workloads]


# ---- kernel log, kmemleak ----


def dmesg() -> str:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout


KERNEL_PROBLEMS = ("WARNING:", "BUG:", "Oops", "general protection fault", "Call Trace:", "kernel BUG")


def kernel_problems(log: str) -> list[str]:
    return [line for line in log.splitlines() if any(p in line for p in KERNEL_PROBLEMS)]


KMEMLEAK = Path("/sys/kernel/debug/kmemleak")


def kmemleak_ready() -> None:
    if not KMEMLEAK.exists():
        subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], capture_output=True)
    assert KMEMLEAK.exists(), "no /sys/kernel/debug/kmemleak (CONFIG_DEBUG_KMEMLEAK, debugfs)"


def kmemleak(command: str) -> None:
    KMEMLEAK.write_text(command + "\n")


def kmemleak_reports() -> list[str]:
    """The unreferenced objects kmemleak reports now, one text block each."""
    blocks, current = [], []
    for line in KMEMLEAK.read_text().splitlines():
        if line.startswith("unreferenced object") and current:
            blocks.append("\n".join(current))
            current = []
        current.append(line)
    if current:
        blocks.append("\n".join(current))
    return blocks
