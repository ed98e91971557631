"""ptrace(2) and waitpid(2) for the ptrace-events suite, through ctypes on the guest's libc (x86_64).

Only what the tests need: requests and options by number (include/uapi/linux/ptrace.h), the
PTRACE_GET_SYSCALL_INFO and siginfo layouts, a waitpid that cannot block for ever, and a Tracee
helper that remembers its pid and cleans up.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
libc.waitpid.restype = ctypes.c_int
libc.waitpid.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
libc.prctl.restype = ctypes.c_int
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

PTRACE_TRACEME = 0
PTRACE_PEEKDATA = 2
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_ATTACH = 16
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_GET_SYSCALL_INFO = 0x420E

PTRACE_O_TRACESYSGOOD = 0x01
PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_EXITKILL = 0x100000

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4

PTRACE_SYSCALL_INFO_NONE = 0
PTRACE_SYSCALL_INFO_ENTRY = 1
PTRACE_SYSCALL_INFO_EXIT = 2

SYSGOOD_TRAP = signal.SIGTRAP | 0x80
WALL = 0x40000000  # __WALL
AUDIT_ARCH_X86_64 = 0xC000003E
SI_USER = 0
PR_SET_DUMPABLE = 4
PR_SET_PTRACER = 0x59616D61
PR_SET_PTRACER_ANY = 0xFFFFFFFFFFFFFFFF  # (unsigned long)-1

# x86_64 system call numbers the tests look for
NR = {"read": 0, "rt_sigreturn": 15, "getppid": 110, "restart_syscall": 219, "clock_nanosleep": 230}
ERESTARTSYS = 512
ERESTART_RESTARTBLOCK = 516


class PtraceError(OSError):
    pass


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class SyscallEntry(ctypes.Structure):
    _fields_ = [("nr", ctypes.c_uint64), ("args", ctypes.c_uint64 * 6)]


class SyscallExit(ctypes.Structure):
    _fields_ = [("rval", ctypes.c_int64), ("is_error", ctypes.c_uint8)]


class SyscallUnion(ctypes.Union):
    _fields_ = [("entry", SyscallEntry), ("exit", SyscallExit), ("pad", ctypes.c_uint64 * 8)]


class SyscallInfo(ctypes.Structure):
    """struct ptrace_syscall_info"""

    _fields_ = [
        ("op", ctypes.c_uint8),
        ("arch", ctypes.c_uint32),
        ("instruction_pointer", ctypes.c_uint64),
        ("stack_pointer", ctypes.c_uint64),
        ("u", SyscallUnion),
    ]


class SigInfo(ctypes.Structure):
    """The head of siginfo_t (128 bytes): signo, errno, code, then the union (pid, uid first for kill)."""

    _fields_ = [
        ("si_signo", ctypes.c_int),
        ("si_errno", ctypes.c_int),
        ("si_code", ctypes.c_int),
        ("_pad0", ctypes.c_int),
        ("si_pid", ctypes.c_int),
        ("si_uid", ctypes.c_uint),
        ("_rest", ctypes.c_byte * (128 - 24)),
    ]


def ptrace(request: int, pid: int, addr: int = 0, data: int | ctypes.c_void_p | None = 0) -> int:
    ctypes.set_errno(0)
    result = libc.ptrace(request, pid, addr, data)
    err = ctypes.get_errno()
    if result == -1 and err:
        raise PtraceError(err, f"ptrace({request:#x}, {pid}): {os.strerror(err)}")
    return result


def try_ptrace(request: int, pid: int, addr: int = 0, data: int = 0) -> int:
    """0 on success, else the errno (for the tests that expect a refusal)."""
    try:
        ptrace(request, pid, addr, data)
    except PtraceError as exc:
        return exc.errno or -1
    return 0


def prctl(option: int, arg2: int = 0) -> None:
    if libc.prctl(option, arg2, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option:#x}): {os.strerror(err)}")


@dataclass(frozen=True)
class Stop:
    """One waitpid() report."""

    pid: int
    status: int

    @property
    def stopped(self) -> bool:
        return os.WIFSTOPPED(self.status)

    @property
    def sig(self) -> int:
        return os.WSTOPSIG(self.status) if self.stopped else 0

    @property
    def event(self) -> int:
        return (self.status >> 16) & 0xFF if self.stopped else 0

    @property
    def syscall_stop(self) -> bool:
        return self.stopped and self.sig == SYSGOOD_TRAP

    @property
    def exited(self) -> int | None:
        return os.WEXITSTATUS(self.status) if os.WIFEXITED(self.status) else None

    @property
    def killed_by(self) -> int | None:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None

    def __repr__(self) -> str:
        if self.stopped:
            what = f"stopped sig={self.sig:#x}" + (f" event={self.event}" if self.event else "")
        elif self.exited is not None:
            what = f"exited {self.exited}"
        else:
            what = f"killed by {self.killed_by}"
        return f"<pid {self.pid} {what}>"


def wait(pid: int = -1, timeout: float = 20.0) -> Stop:
    """waitpid(pid, __WALL), polled with WNOHANG so a lost stop fails the test instead of hanging it."""
    status = ctypes.c_int(0)
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        got = libc.waitpid(pid, ctypes.byref(status), WALL | os.WNOHANG)
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            raise OSError(err, f"waitpid({pid}): {os.strerror(err)}")
        if got > 0:
            return Stop(got, status.value)
        if time.monotonic() > deadline:
            raise TimeoutError(f"waitpid({pid}): nothing after {timeout}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def syscall_info(pid: int) -> SyscallInfo:
    info = SyscallInfo()
    ptrace(PTRACE_GET_SYSCALL_INFO, pid, ctypes.sizeof(info), ctypes.addressof(info))
    return info


def siginfo(pid: int) -> SigInfo:
    info = SigInfo()
    ptrace(PTRACE_GETSIGINFO, pid, 0, ctypes.addressof(info))
    return info


def event_msg(pid: int) -> int:
    msg = ctypes.c_ulong(0)
    ptrace(PTRACE_GETEVENTMSG, pid, 0, ctypes.addressof(msg))
    return msg.value


def tracer_pid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no TracerPid")


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def reap_all(pids: set[int]) -> None:
    """SIGKILL and reap every pid still around (tracees and their auto-attached children)."""
    for pid in pids:
        kill_quietly(pid)
    for pid in pids:
        try:
            while True:
                stop = wait(pid, timeout=5.0)
                if not stop.stopped:
                    break
        except (ChildProcessError, OSError, TimeoutError):
            pass


def fork_tracee(body, *, options: int = 0) -> int:  # type: ignore[no-untyped-def]
    """Fork a child that does PTRACE_TRACEME, stops itself with SIGSTOP, then runs body() and exits with
    its return value (0 if None; 99 if it raised). Returns the pid with the child in that stop and the
    options set."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            libc.ptrace(PTRACE_TRACEME, 0, 0, 0)
            os.kill(os.getpid(), signal.SIGSTOP)
            code = body() or 0
        finally:
            os._exit(code)
    stop = wait(pid)
    assert stop.stopped and stop.sig == signal.SIGSTOP, f"initial stop of the tracee: {stop}"
    if options:
        ptrace(PTRACE_SETOPTIONS, pid, 0, options)
    return pid
