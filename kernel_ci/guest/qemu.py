"""Boot the guest in QEMU and watch it: accelerator choice, the qcow2 overlay, the command line, and the
console stream with its boot, idle and global timeouts (a sysrq task dump is taken before a hung guest
is killed).

The QEMU process itself is started with kernel_ci.core.proc.spawn, not proc.run: the console is QEMU's
stdout, its own diagnostics are stderr (kept apart so they never reach the console scanner), the host
writes to its stdin while it runs (serial break + sysrq key), and it is stopped on a silence timeout, when
no line arrives at all. Every other command here goes through kernel_ci.core.proc.run.

The guest runs patch authors' tests as root, so everything it can send the host is bounded: the console
log on disk (console_limit; the rest is still read and scanned, and the cut is said), the lines queued
for the scanner, the sysrq dump kept; the results share cannot make host files that are anything but
plain files (build_command).
"""

from __future__ import annotations

import collections
import ctypes
import functools
import hashlib
import json
import os
import queue
import shlex
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Literal

from kernel_ci.core import proc
from kernel_ci.core.console import console, warn
from kernel_ci.core.digest import sha256_file
from kernel_ci.core.errors import InfrastructureError
from kernel_ci.core.files import file_identity, write_text_atomic
from kernel_ci.core.paths import cache_dir
from kernel_ci.guest import protocol, warmstart
from kernel_ci.guest.protocol import EndKind

QEMU = "qemu-system-x86_64"
MACHINE = "q35"  # measured: boots as fast as "pc" (within noise) under TCG
READY_MARK = protocol.INIT_READY
SUITE_START_MARK = protocol.SUITE_START
# PROTOCOL.md: the kernel command line every guest gets, before the tuning and the user's extra args.
PROTOCOL_APPEND = (
    "console=ttyS0",
    "root=/dev/vda",
    "rw",
    "rootfstype=ext4",
    "init=/sbin/kci-init",
    "panic=-1",
)
# 8250.nr_uarts=1: probe one UART, not four. tsc=reliable: with 2+ vCPUs under TCG the kernel finds the
# TSCs "unsynchronized" and, lacking ACPI/HPET, falls back to the 4 ms refined-jiffies clocksource; this
# keeps the TSC (and fine-grained time) at no boot cost. Not "quiet": it would hide a boot-time WARN or
# an oops's call trace from the console scanner, for no measurable gain (see PROTOCOL.md, Boot).
TUNING_APPEND = ("8250.nr_uarts=1", "tsc=reliable")
# Serial sysrq: the stdio mux turns "Ctrl-A b" into a break on ttyS0; the next key is the sysrq command.
# 8: console log level 8 (so the dumps print even while "quiet"), t: every task's stack,
# l: a backtrace of every active CPU (catches a CPU spinning with preemption disabled).
SYSRQ_KEYS = "8tl"
SYSRQ_QUIET_SECONDS = 2.0
SYSRQ_MAX_SECONDS = 15.0
MAX_LINE_BYTES = 64 * 1024
CONSOLE_LOG_LIMIT = 64 * 2**20  # console.log on disk; past it the console is read and scanned, not kept
CONSOLE_QUEUE_LINES = 10_000  # lines between the reader thread and the watcher (the reader waits)
BOOT_LINES_KEPT = CONSOLE_QUEUE_LINES // 2  # a warm start's boot lines, saved and replayed (within the queue)
SYSRQ_DUMP_LINES = 20_000  # lines of the sysrq dump kept
QEMU_STDERR_LINES = 1000
# The 9p results share. mapped-xattr: what the guest creates is a plain file (0600) or directory (0700)
# on the host, its owner, mode, symlink target and device numbers kept in user.virtfs.* xattrs, never
# made real; so a root guest cannot leave a symlink for the host to follow, a device node, a FIFO or a
# set-id or executable file in out/runs/. Chosen over dropping QEMU's root (-runas): that alone would
# still let a guest symlink be a real symlink on the host, and it needs every payload file readable by
# the unprivileged user (tests/e2e/test_guest_attacks.py shows both shares as they are now).
RESULTS_SHARE = "security_model=mapped-xattr"
# The payload share is read-only: the guest cannot create anything there, and model none shows it the
# host's modes as they are (the suites' binaries are executable).
PAYLOAD_SHARE = "security_model=none,readonly=on"
KVM_PROBE_TIMEOUT = 10.0
KVM_PROBE_TTL = 1800.0

Accel = Literal["kvm", "tcg"]
LineSink = Callable[[str], None]


# --- accelerator ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    reason: str


class AccelError(InfrastructureError):
    """An accelerator was requested that this host cannot offer."""


def decide_accelerator(
    dev_kvm_present: bool, probe_result: KvmProbe | None, user_choice: str = "auto"
) -> tuple[Accel, str]:
    """Pure: which accelerator to use and why. user_choice is "auto", "kvm" or "tcg"."""
    if user_choice == "tcg":
        return "tcg", "requested (--accel tcg)"
    if user_choice == "kvm":
        if not dev_kvm_present:
            raise AccelError("--accel kvm was requested but /dev/kvm is missing or not accessible")
        return "kvm", "requested (--accel kvm)"
    if user_choice != "auto":
        raise ValueError(f"accelerator must be auto, kvm or tcg, not {user_choice!r}")
    if not dev_kvm_present:
        return "tcg", "/dev/kvm is missing or not accessible"
    if probe_result is None:
        return "tcg", "KVM was not probed"
    if probe_result.usable:
        return "kvm", probe_result.reason
    return "tcg", f"KVM probe failed: {probe_result.reason}"


_tcg_notice_printed = False


def choose_accelerator(kernel: Path, user_choice: str = "auto") -> Accel:
    """decide_accelerator fed with the real /dev/kvm and (for "auto") a real probe boot of kernel."""
    global _tcg_notice_printed
    present = dev_kvm_present()
    probe = probe_kvm(kernel) if present and user_choice == "auto" else None
    accel, reason = decide_accelerator(present, probe, user_choice)
    if accel == "tcg" and not _tcg_notice_printed:
        console.print(f"[yellow]using TCG: {reason}[/]")
        _tcg_notice_printed = True
    return accel


def dev_kvm_present() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def qemu_version() -> str:
    return proc.capture([QEMU, "--version"]).splitlines()[0].strip()


class _ProbeStop(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def probe_kvm(kernel: Path, *, timeout: float = KVM_PROBE_TIMEOUT, use_cache: bool = True) -> KvmProbe:
    """Boot kernel under -accel kvm with no root device: a usable KVM runs it to its "cannot mount root"
    panic, which (panic=-1, -no-reboot) ends QEMU within a second or two. /dev/kvm alone proves nothing:
    nested kvm_pvm hosts have it, but a real guest dies with "KVM internal error" or hangs early.

    The verdict is cached per (host kernel release, QEMU version) for KVM_PROBE_TTL seconds.
    """
    cache_key = f"{os.uname().release}|{qemu_version()}"
    cache_file = cache_dir("qemu") / "kvm-probe.json"
    if use_cache:
        cached = _read_probe_cache(cache_file, cache_key)
        if cached is not None:
            return cached
    result = _run_kvm_probe(kernel, timeout)
    entry = {"key": cache_key, "time": time.time(), "usable": result.usable, "reason": result.reason}
    write_text_atomic(cache_file, json.dumps(entry) + "\n")
    return result


def _read_probe_cache(cache_file: Path, cache_key: str) -> KvmProbe | None:
    try:
        entry = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return None
    if entry.get("key") != cache_key or time.time() - float(entry.get("time", 0)) > KVM_PROBE_TTL:
        return None
    return KvmProbe(bool(entry["usable"]), f"{entry['reason']} (cached probe)")


def kvm_probe_command(kernel: Path) -> list[str]:
    return [
        QEMU, "-accel", "kvm", "-cpu", "host", "-machine", MACHINE, "-m", "256", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1",
    ]  # fmt: skip


def _run_kvm_probe(kernel: Path, timeout: float) -> KvmProbe:
    saw_kernel = False

    def watch(line: str) -> None:
        nonlocal saw_kernel
        if "KVM internal error" in line or "emulation failure" in line:
            raise _ProbeStop(line.strip())
        if "Linux version" in line or "Kernel panic" in line:
            saw_kernel = True

    started = time.monotonic()
    try:
        result = proc.run(kvm_probe_command(kernel), on_line=watch, check=False, timeout=timeout)
    except _ProbeStop as stop:
        return KvmProbe(False, stop.reason)
    except proc.CommandError as exc:
        return KvmProbe(False, str(exc).splitlines()[0])
    seconds = time.monotonic() - started
    if result.returncode == 0 and saw_kernel:
        return KvmProbe(True, f"a KVM guest booted and rebooted in {seconds:.1f} s")
    tail = " | ".join(line.strip() for line in result.output.strip().splitlines()[-2:])
    if result.returncode < 0 and seconds >= timeout:
        return KvmProbe(False, f"the KVM guest did not finish booting within {timeout:.0f} s")
    if result.returncode < 0:
        return KvmProbe(False, f"QEMU died of signal {-result.returncode}: {tail}")
    return KvmProbe(False, f"QEMU exited with status {result.returncode}: {tail}")


# --- overlay ----------------------------------------------------------------------------------------


def create_overlay(base: Path, dest_dir: Path) -> Path:
    """A fresh qcow2 overlay on top of base in dest_dir; QEMU only ever writes the overlay."""
    base = base.resolve()
    if not base.is_file():
        raise FileNotFoundError(f"rootfs image {base} does not exist")
    dest_dir.mkdir(parents=True, exist_ok=True)
    overlay = dest_dir / "overlay.qcow2"
    proc.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)],
        quiet=True,
    )
    return overlay


def rebase_overlay(overlay: Path, base: Path) -> None:
    """Make overlay stand on base alone (what the layers between held is copied into it): a kept overlay
    of a restored run no longer needs the warm-start snapshot's disk, which a later save may delete."""
    proc.run(
        ["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", str(base.resolve()), "-F", "qcow2", str(overlay)],
        quiet=True,
    )


# --- command line -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QemuConfig:
    kernel: Path  # bzImage
    overlay: Path  # qcow2 overlay of the rootfs image (create_overlay)
    payload_dir: Path  # shared read-only as kci-payload (/kci)
    results_dir: Path  # shared read-write as kci-results (/kci-results)
    run_dir: Path  # console.log, qemu-cmdline.sh, the monitor socket
    accel: Accel = "tcg"
    memory: str = "1024M"
    cpus: int = 2
    extra_append: tuple[str, ...] = ()
    boot_timeout: float = 120.0  # no "KCI-INIT: ready" after this many seconds
    idle_timeout: float = 300.0  # after ready: no console output for this many seconds = hang
    global_timeout: float = 3600.0  # the whole run
    console_limit: int = CONSOLE_LOG_LIMIT  # bytes of console.log kept on disk
    machine: str = MACHINE
    tuning: tuple[str, ...] = field(default=TUNING_APPEND)
    extra_args: tuple[str, ...] = ()  # appended to the argv as is (e.g. -gdb tcp::1234 for --gdb)
    warm: Path | None = None  # the warm-start store folder of this machine (warm_folder); None: boot cold

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def monitor_socket(self) -> Path:
        """run_dir/monitor.sock, or a short stand-in under /tmp when that path is too long for AF_UNIX."""
        inside = self.run_dir.absolute() / "monitor.sock"
        if len(os.fsencode(inside)) < 100:
            return inside
        digest = hashlib.sha256(os.fsencode(inside)).hexdigest()[:16]
        return Path("/tmp") / f"kci-monitor-{digest}.sock"


def kernel_append(cfg: QemuConfig) -> str:
    warm = (warmstart.WARM_ARG,) if cfg.warm is not None else ()
    return " ".join((*PROTOCOL_APPEND, *cfg.tuning, *cfg.extra_append, *warm))


def warm_folder(cfg: QemuConfig, base_image: Path, runner: Path) -> Path:
    """The warm-start store folder for cfg's machine: its QEMU command with this run's paths left out,
    the kernel's and the runner's digests, the rootfs image (named by its own key) and QEMU's version.
    A snapshot restores only into exactly the machine and software it was taken from. The kernel is
    named by its digest, not its path: the same build restored into another output dir is the same
    machine (a new snapshot per path cost every such run a cold boot and a save, ~8 s)."""
    placeholder = Path("/kci-run")
    generic = replace(
        cfg, kernel=placeholder / "bzImage", overlay=placeholder / "overlay.qcow2",
        payload_dir=placeholder / "payload", results_dir=placeholder / "results", run_dir=placeholder,
        warm=placeholder,
    )  # fmt: skip
    argv = build_command(generic)
    image = base_image.resolve()
    stat = image.stat()
    return warmstart.folder(
        [*argv, _digest_of(cfg.kernel), _digest_of(runner), f"{image}:{stat.st_size}:{stat.st_mtime_ns}",
         qemu_version()]
    )  # fmt: skip


def _digest_of(path: Path) -> str:
    """sha256 of a file, read once per process for as long as it is the same file: the guests of one run
    share the kernel (~10 MB) and the runner."""
    return _digest_once(path.resolve(), *file_identity(path))


@functools.lru_cache(maxsize=16)
def _digest_once(path: Path, *identity: int) -> str:
    return sha256_file(path)


def accel_option(accel: Accel) -> str:
    """-accel's value. TCG runs single-threaded (all vCPUs in one host thread) unless
    KERNEL_CI_TCG_THREAD=multi: with multi-threaded TCG a vCPU can keep executing a stale translation of
    kernel text that another vCPU has just patched (kprobe arming and disarming), loop on an int3 that is
    no longer in memory and starve RCU; seen twice in ~20 runs of the tracer suite's load/unload cycles."""
    if accel != "tcg":
        return accel
    return f"tcg,thread={os.environ.get('KERNEL_CI_TCG_THREAD', 'single')}"


def build_command(cfg: QemuConfig) -> list[str]:
    """The QEMU argv for cfg (pure). Console: ttyS0 on stdio through a mux (Ctrl-A b = serial break)."""
    cpu = "host" if cfg.accel == "kvm" else "max"
    # One CPU per socket: without ACPI the guest finds CPUs in SeaBIOS's MP table, which lists only the
    # first logical CPU of each package, so "-smp 2" (2 cores, 1 socket) would boot with one CPU.
    smp = f"{cfg.cpus},sockets={cfg.cpus},cores=1,threads=1"
    payload = _opt(cfg.payload_dir)
    results = _opt(cfg.results_dir)
    return [
        QEMU,
        "-name", "kci-guest",
        "-machine", cfg.machine,
        "-accel", accel_option(cfg.accel),
        "-cpu", cpu,
        "-m", cfg.memory,
        "-smp", smp,
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-chardev", "stdio,id=console,mux=on,signal=off",
        "-serial", "chardev:console",
        "-monitor", f"unix:{_opt(cfg.monitor_socket)},server=on,wait=off",
        "-kernel", str(cfg.kernel.absolute()),
        "-append", kernel_append(cfg),
        "-drive", f"file={_opt(cfg.overlay)},format=qcow2,if=virtio,cache=unsafe",
        "-virtfs", f"local,path={payload},mount_tag=kci-payload,{PAYLOAD_SHARE},id=payload",
        "-virtfs", f"local,path={results},mount_tag=kci-results,{RESULTS_SHARE},id=results",
        "-device", "virtio-rng-pci",
        *cfg.extra_args,
    ]  # fmt: skip


def _opt(path: Path) -> str:
    """An absolute path inside a QEMU -option value, where a comma must be doubled."""
    return str(path.absolute()).replace(",", ",,")


def cmdline_script(argv: list[str]) -> str:
    """A runnable, shell-quoted script of argv, one option (with its value) per line."""
    lines: list[str] = [shlex.quote(argv[0])]
    i = 1
    while i < len(argv):
        if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            lines.append(f"{shlex.quote(argv[i])} {shlex.quote(argv[i + 1])}")
            i += 2
        else:
            lines.append(shlex.quote(argv[i]))
            i += 1
    body = " \\\n    ".join(lines)
    return (
        "#!/bin/sh\n"
        "# The exact QEMU command of this kernel-ci run. The console is on stdio:\n"
        "# Ctrl-A x quits, Ctrl-A b then a key sends a sysrq (e.g. t = task stacks).\n"
        f"exec {body}\n"
    )


def monitor_command(sock: Path, command: str, *, timeout: float = 5.0) -> str:
    """Send one human-monitor (HMP) command over the -monitor unix socket and return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(os.fspath(sock))
        _read_until_prompt(conn)
        conn.sendall(command.encode() + b"\n")
        reply = _read_until_prompt(conn)
    # The monitor echoes the command with terminal escapes; keep the lines after the echo.
    text = reply.decode(errors="replace").replace("\r", "")
    lines = text.split("\n")[1:]
    return "\n".join(line for line in lines if not line.startswith("(qemu)")).strip()


def _read_until_prompt(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"(qemu) "):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


# --- running ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestRun:
    end: EndKind
    exit_code: int | None
    seconds: float
    boot_seconds: float | None  # start to "KCI-INIT: ready"
    first_test_seconds: float | None  # start to the first "KCI-SUITE-START:"
    console_log: Path
    command: list[str]
    detail: str
    sysrq_dump: str
    console_dropped_bytes: int = 0  # console bytes past console_limit, read and scanned but not in the log
    warm_start: str = "off"  # off, restored (from a snapshot), saved (booted, then saved), booted (not saved)


def run_guest(cfg: QemuConfig, on_line: LineSink | None = None) -> GuestRun:
    """Boot cfg (or restore its warm-start snapshot), stream the console to console.log and on_line, and
    end the run on poweroff, timeout or hang. Failures of QEMU itself come back as end="qemu_failed"; only
    on_line's own exceptions escape (QEMU is killed first)."""
    if cfg.warm is not None and warmstart.ready(cfg.warm):
        restored = _restore(cfg, cfg.warm, on_line)
        if restored is not None:
            return restored
    return _boot(cfg, build_command(cfg), on_line)


def _boot(
    cfg: QemuConfig, argv: list[str], on_line: LineSink | None, replay: list[str] | None = None
) -> GuestRun:
    """Run argv: a cold boot, or (replay: the snapshot's boot lines) a QEMU already told to restore."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    script = cfg.run_dir / "qemu-cmdline.sh"
    script.write_text(cmdline_script(argv))
    script.chmod(0o755)
    cfg.monitor_socket.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        qemu = proc.spawn(argv, stdin=proc.PIPE, preexec_fn=_die_with_parent)
    except OSError as exc:
        cfg.console_log.write_text("")
        return GuestRun(
            EndKind.QEMU_FAILED, None, 0.0, None, None, cfg.console_log, argv, f"cannot start: {exc}", ""
        )
    out = _Console(qemu.stdout, cfg.console_log, cfg.console_limit, replay or [])  # type: ignore[arg-type]
    # spawned with stdout=PIPE, so never None
    try:
        if replay is not None and not _restored_running(cfg, qemu):
            _stop(qemu)
            raise _RestoreFailed(_stderr_tail(qemu) or "the guest did not start running")
        return _watch(cfg, argv, qemu, started, on_line, out, restored=replay is not None)
    finally:
        out.abandon()
        _stop(qemu)
        cfg.monitor_socket.unlink(missing_ok=True)


class _RestoreFailed(InfrastructureError):
    """A snapshot QEMU would not load: the run boots cold instead."""


def _restore(cfg: QemuConfig, stored: Path, on_line: LineSink | None) -> GuestRun | None:
    """The guest restored from stored and started with GO; None (the snapshot discarded) when QEMU could
    not load it: the caller boots cold, which saves a new one."""
    try:
        replay = warmstart.boot_lines(stored)
        create_overlay(stored / warmstart.DISK, cfg.overlay.parent)
    except (OSError, proc.CommandError) as exc:
        warn(f"warm start: cannot use the snapshot in {stored} ({exc}); booting")
        warmstart.discard(stored)
        return None
    argv = [*build_command(cfg), "-incoming", f"exec:cat {shlex.quote(str(stored / warmstart.STATE))}"]
    try:
        return _boot(cfg, argv, on_line, replay)
    except _RestoreFailed as exc:
        warn(f"warm start: QEMU could not restore the snapshot in {stored} ({exc}); booting")
        base = _backing_image(stored / warmstart.DISK)  # the rootfs image, for a fresh overlay
        warmstart.discard(stored)
        create_overlay(base, cfg.overlay.parent)
        return None


def _restored_running(cfg: QemuConfig, qemu: proc.Spawned) -> bool:
    """Wait for the restored guest to run, then send GO (the runner waits for it on the console)."""
    if not warmstart.wait_running(
        lambda c: monitor_command(cfg.monitor_socket, c), lambda: qemu.poll() is None
    ):
        return False
    warmstart.send_go(qemu.stdin)
    return True


def _stderr_tail(qemu: proc.Spawned) -> str:
    """What a stopped QEMU said on stderr (its last 500 characters): why a restore failed."""
    assert qemu.stderr is not None
    return qemu.stderr.read().decode(errors="replace").strip()[-500:]


def _backing_image(overlay: Path) -> Path:
    """The backing file a qcow2 overlay names (the rootfs image under a saved disk)."""
    info = json.loads(proc.capture(["qemu-img", "info", "--output=json", str(overlay)]))
    return Path(info["full-backing-filename"])


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL QEMU if this process dies, so no guest outlives its run."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class _Console:
    """Reads QEMU's stdout on a thread: whole lines go to console.log (up to limit bytes) and a bounded
    queue; any byte counts as activity for the idle timeout (a hung guest may stop mid-line). A full
    queue makes the thread wait, and QEMU's serial line with it, rather than grow without end."""

    def __init__(
        self, stream: IO[bytes], log_path: Path, limit: int = CONSOLE_LOG_LIMIT, replay: Sequence[str] = ()
    ):
        self.lines: queue.Queue[str | None] = queue.Queue(maxsize=CONSOLE_QUEUE_LINES)
        self.last_output = time.monotonic()
        self.dropped_bytes = 0
        self._stream = stream
        self._limit = limit
        self._written = 0
        self._abandoned = False
        self._log = log_path.open("wb")
        for line in replay[:BOOT_LINES_KEPT]:  # a restored guest's boot, before what it prints
            self._emit(line.encode())
        self._thread = threading.Thread(target=self._pump, name="qemu-console", daemon=True)
        self._thread.start()

    def abandon(self) -> None:
        """Nobody reads the queue any more: drop lines instead of waiting (the thread then ends)."""
        self._abandoned = True

    def _pump(self) -> None:
        pending = b""
        fd = self._stream.fileno()
        try:
            while chunk := os.read(fd, 65536):
                self.last_output = time.monotonic()
                pending += chunk
                *complete, pending = pending.split(b"\n")
                if len(pending) > MAX_LINE_BYTES:  # a guest printing without newlines is still seen
                    complete.append(pending)
                    pending = b""
                for raw in complete:
                    self._emit(raw)
            if pending:
                self._emit(pending)
        finally:
            self._log.close()
            self._put(None)

    def _emit(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        self._keep(line.encode("utf-8", errors="replace") + b"\n")
        self._put(line)

    def _keep(self, data: bytes) -> None:
        """Append to console.log while under the limit; past it, say so once and count what is dropped."""
        if self.dropped_bytes == 0 and self._written + len(data) <= self._limit:
            self._log.write(data)
            self._log.flush()
            self._written += len(data)
            return
        if self.dropped_bytes == 0:
            note = f"[kernel-ci: console.log cut at {self._written} bytes; the rest was read, not kept]\n"
            self._log.write(note.encode())
            self._log.flush()
        self.dropped_bytes += len(data)

    def _put(self, line: str | None) -> None:
        while not self._abandoned:
            try:
                self.lines.put(line, timeout=0.5)
                return
            except queue.Full:
                continue

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class _Stderr:
    """Collects QEMU's own messages (errors, warnings) on a thread; notices a KVM internal error."""

    def __init__(self, stream: IO[bytes]):
        self.text: collections.deque[str] = collections.deque(maxlen=QEMU_STDERR_LINES)
        self.kvm_error = False
        self._stream = stream
        self._thread = threading.Thread(target=self._pump, name="qemu-stderr", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for raw in self._stream:
            line = raw.decode("utf-8", errors="replace").rstrip()
            self.text.append(line)
            if "KVM internal error" in line or "emulation failure" in line:
                self.kvm_error = True

    def tail(self, n: int = 20) -> str:
        return "\n".join(list(self.text)[-n:])

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@dataclass
class _Marks:
    boot_seconds: float | None = None
    first_test_seconds: float | None = None
    frozen: bool = False  # set with the verdict: what the guest prints while it is dumped does not count
    went: bool = False  # a warm start's GO was sent
    saved: bool = False  # and the guest was saved first


def _watch(
    cfg: QemuConfig,
    argv: list[str],
    qemu: proc.Spawned,
    started: float,
    on_line: LineSink | None,
    out: _Console,
    *,
    restored: bool = False,
) -> GuestRun:
    assert qemu.stderr is not None
    err = _Stderr(qemu.stderr)
    marks = _Marks()
    boot: list[str] = []  # a warm start's boot lines, kept with its snapshot

    def take(line: str) -> None:
        now = time.monotonic() - started
        if cfg.warm is not None and not restored and not marks.went and not marks.frozen:
            if len(boot) < BOOT_LINES_KEPT:  # a guest flooding its console before ready costs no memory
                boot.append(line)
            if line.strip() == warmstart.WARM_READY:
                marks.went = True
                marks.saved = _save_and_go(cfg, qemu, boot)
        if not marks.frozen and marks.boot_seconds is None and READY_MARK in line:
            marks.boot_seconds = now
        if not marks.frozen and marks.first_test_seconds is None and SUITE_START_MARK in line:
            marks.first_test_seconds = now
        if on_line is not None:
            on_line(line)

    end: EndKind | None = None
    detail = ""
    sysrq_dump = ""
    eof = False
    while not eof:
        try:
            line = out.lines.get(timeout=0.2)
        except queue.Empty:
            line = ""
        else:
            if line is None:
                eof = True
                break
            take(line)
        verdict = _overdue(cfg, started, out.last_output, marks.boot_seconds is not None)
        if verdict is None and err.kvm_error:
            verdict = (EndKind.QEMU_FAILED, f"KVM failed: {err.tail(3)}")
        if verdict is not None:
            end, detail = verdict
            marks.frozen = True
            if end != EndKind.QEMU_FAILED:
                sysrq_dump, eof = _sysrq_dump(qemu, out, take)
            break
    if end is not None:
        _stop(qemu)
    while not eof:  # drain what QEMU printed before it ended
        line = out.lines.get()
        if line is None:
            break
        take(line)
    qemu.wait()
    out.join(5)
    err.join(5)
    seconds = time.monotonic() - started
    if end is None:
        if qemu.returncode == 0:
            end, detail = EndKind.POWEROFF, "the guest rebooted or powered off (QEMU -no-reboot exited)"
        else:
            end, detail = EndKind.QEMU_FAILED, f"QEMU exited with status {qemu.returncode}:\n{err.tail()}"
    elif end == EndKind.QEMU_FAILED:
        detail = f"{detail}\n{err.tail()}"
    console.log(f"guest: {end} after {seconds:.1f} s ({detail.splitlines()[0] if detail else ''})")
    return GuestRun(
        end=end,
        exit_code=qemu.returncode,
        seconds=seconds,
        boot_seconds=marks.boot_seconds,
        first_test_seconds=marks.first_test_seconds,
        console_log=cfg.console_log,
        command=argv,
        detail=detail,
        sysrq_dump=sysrq_dump,
        console_dropped_bytes=out.dropped_bytes,
        warm_start=_warm_start_word(cfg, restored, marks.saved),
    )


def _warm_start_word(cfg: QemuConfig, restored: bool, saved: bool) -> str:
    if cfg.warm is None:
        return "off"
    return "restored" if restored else "saved" if saved else "booted"


def _save_and_go(cfg: QemuConfig, qemu: proc.Spawned, boot: Sequence[str]) -> bool:
    """At a cold warm-start boot's ready mark: save the guest unless its snapshot exists, then start it.
    Whether this run saved it."""
    assert cfg.warm is not None
    saved = False
    try:
        saved = warmstart.save(cfg.warm, lambda c: monitor_command(cfg.monitor_socket, c), cfg.overlay, boot)
        if saved:
            console.log(f"warm start: saved the booted guest for later runs of this kernel ({cfg.warm})")
    except (warmstart.SaveError, OSError) as exc:
        warn(f"warm start: the booted guest could not be saved ({exc}); the next run boots again")
    warmstart.send_go(qemu.stdin)
    return saved


def _overdue(cfg: QemuConfig, started: float, last_output: float, ready: bool) -> tuple[EndKind, str] | None:
    now = time.monotonic()
    if now - started > cfg.global_timeout:
        return EndKind.TIMEOUT, f"the run exceeded the global timeout of {cfg.global_timeout:g} s"
    if not ready and now - started > cfg.boot_timeout:
        return EndKind.BOOT_TIMEOUT, f"no '{READY_MARK}' within {cfg.boot_timeout:g} s"
    if ready and now - last_output > cfg.idle_timeout:
        return EndKind.HANG, f"no console output for {cfg.idle_timeout:g} s"
    return None


def _sysrq_dump(qemu: proc.Spawned, out: _Console, take: LineSink) -> tuple[str, bool]:
    """Ask the guest for its stacks over the serial line and collect what it prints: until the console
    has been quiet for SYSRQ_QUIET_SECONDS (at most SYSRQ_MAX_SECONDS). Returns (dump, saw_eof)."""
    dump: collections.deque[str] = collections.deque(maxlen=SYSRQ_DUMP_LINES)
    send_sysrq(qemu, SYSRQ_KEYS)
    sent = time.monotonic()
    while True:
        now = time.monotonic()
        if now - sent > SYSRQ_MAX_SECONDS or now - max(out.last_output, sent) > SYSRQ_QUIET_SECONDS:
            return "\n".join(dump), False
        try:
            line = out.lines.get(timeout=0.1)
        except queue.Empty:
            continue
        if line is None:
            return "\n".join(dump), True
        dump.append(line)
        take(line)


def send_sysrq(qemu: proc.Spawned, keys: str) -> None:
    """Serial sysrq through the stdio mux: Ctrl-A b sends a break, the next character is the command."""
    assert qemu.stdin is not None
    for key in keys:
        try:
            qemu.stdin.write(b"\x01b")
            qemu.stdin.flush()
            time.sleep(0.1)
            qemu.stdin.write(key.encode())
            qemu.stdin.flush()
        except OSError:
            return  # QEMU is gone
        time.sleep(0.3)


def _stop(qemu: proc.Spawned) -> None:
    qemu.stop(grace=5)
