"""Read a guest's serial console: the runner's markers and the kernel's faults, line by line.

`ConsoleScanner.feed(line)` returns the events that line completes, so the QEMU runner can watch for a
panic or for silence while the guest runs; `scan(text)` reads a whole log. Faults are attributed to the
suite that was running (between its KCI-SUITE-START and KCI-SUITE-END markers) when their first line
appeared. Lines the runner copied from a suite's output (`[<suite>] ...`) are never read as faults or
markers, so a test that prints "BUG:" does not fake a kernel bug.

A root guest can also write straight to /dev/kmsg or the console, as fast as the serial line goes: what the
scanner keeps is bounded (MAX_FAULTS reports, plus the first panic whenever it comes; MAX_SUITE_SPANS
suite markers), and what it dropped is counted in the report.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field, replace

from kernel_ci.guest import protocol
from kernel_ci.guest.protocol import ConsoleReport, Fault, FaultKind, Phase, SuiteSpan

MAX_FAULT_LINES = 400
MAX_FAULTS = 200  # kernel reports kept (a panic is kept beyond it)
MAX_SUITE_SPANS = 1000  # suite START/END markers kept; a plan has a handful of suites
PANIC_CONTEXT_LINES = 25
TAIL_LINES = 60

_TIMESTAMP = re.compile(r"^\[\s*(\d+\.\d+)\](?:\[\s*[CT]\d+\])? ?")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_LINUX_VERSION = re.compile(r"^Linux version (\S+)")

_INIT_READY = re.compile(re.escape(protocol.INIT_READY) + r"\b")
_INIT_FAILED = re.compile(re.escape(protocol.INIT_RUNNER_FAILED) + r"\b")
_SUITE_START = re.compile(re.escape(protocol.SUITE_START) + r" (\S+)")
_SUITE_END = re.compile(
    re.escape(protocol.SUITE_END) + r" (\S+) rc=(-?\d+|none) seconds=(\d+(?:\.\d+)?) timed_out=([01])"
)
_RUNNER_DONE = re.compile(re.escape(protocol.RUNNER_DONE) + r"\b")
_RUNNER_CRASHED = re.compile(re.escape(protocol.RUNNER_CRASHED) + r" (.*)")

_END_TRACE = re.compile(r"^-+\[ end trace\b")
_END_PANIC = re.compile(r"^-+\[ end Kernel panic\b")
_RULER = re.compile(r"^={20,}\s*$")


@dataclass(frozen=True)
class _Start:
    pattern: re.Pattern[str]
    kind: FaultKind
    end: re.Pattern[str] | None  # the line that closes the report; None: it ends with its call trace


# First match wins. Reports without an end marker (sleeping-in-atomic, lockups, hung tasks) end after
# their call trace.
_STARTS = (
    _Start(re.compile(r"^Kernel panic - not syncing: "), "panic", _END_PANIC),
    _Start(re.compile(r"^BUG: KASAN: "), "kasan", _RULER),
    _Start(re.compile(r"^UBSAN: "), "ubsan", _RULER),
    _Start(re.compile(r"^general protection fault\b"), "gpf", _END_TRACE),
    _Start(re.compile(r"^kernel BUG at "), "bug", _END_TRACE),
    _Start(re.compile(r"^BUG: (?:kernel NULL pointer dereference|unable to handle)"), "oops", _END_TRACE),
    _Start(re.compile(r"^(?:Internal error: )?Oops(?: - [^:]*)?: "), "oops", _END_TRACE),
    _Start(re.compile(r"^WARNING: CPU: \d+ PID: \d+ at "), "warn", _END_TRACE),
    _Start(re.compile(r"^WARNING: "), "warn", None),
    _Start(re.compile(r"^(?:\w+: )?BUG: "), "bug", None),
    _Start(re.compile(r"^INFO: task \S+ blocked for more than "), "bug", None),
    _Start(re.compile(r"^(?:rcu: )?INFO: rcu_\w+ (?:self-)?detected (?:expedited )?stalls?"), "bug", None),
)

# Lines that continue the report already open instead of starting another (the oops header printed
# after "BUG: kernel NULL pointer dereference" or "kernel BUG at ...").
_CONTINUATION = re.compile(
    r"^(?:Oops(?: - [^:]*)?: |invalid opcode: |general protection fault\b|Internal error: )"
)

# After "Call Trace:", these lines still belong to the report (frames are indented).
_TRACE_LINE = re.compile(
    r"^(?:\s|\?|<|RIP: |RSP: |RAX: |RDX: |RBP: |R\d+: |FS: |CS: |CR2: |DR\d: |PKRU: |Code: "
    r"|Modules linked in:|---\[|irq event stamp:|hardirqs last|softirqs last|Kernel Offset:|Call Trace:|$)"
)


@dataclass(frozen=True)
class InitReady:
    line: int


@dataclass(frozen=True)
class InitFailed:
    line: int


@dataclass(frozen=True)
class SuiteStarted:
    name: str
    line: int


@dataclass(frozen=True)
class SuiteEnded:
    span: SuiteSpan


@dataclass(frozen=True)
class RunnerDone:
    line: int


@dataclass(frozen=True)
class RunnerCrashed:
    line: int
    message: str


@dataclass(frozen=True)
class FaultStarted:
    """Emitted on a fault's first line, before its trace is complete (a panic: stop waiting soon)."""

    kind: FaultKind
    title: str
    line: int
    suite: str | None


@dataclass(frozen=True)
class FaultEnded:
    fault: Fault


Event = (
    InitReady
    | InitFailed
    | SuiteStarted
    | SuiteEnded
    | RunnerDone
    | RunnerCrashed
    | FaultStarted
    | FaultEnded
)


@dataclass
class _Open:
    kind: FaultKind
    title: str
    line: int
    suite: str | None
    phase: Phase
    end: re.Pattern[str] | None
    lines: list[str] = field(default_factory=list)
    in_call_trace: bool = False
    last_line: int = 0


def normalize(line: str) -> tuple[float | None, str]:
    """Split a console line into its kernel timestamp (if any) and its text."""
    text = _ANSI.sub("", line.rstrip("\r\n")).replace("\r", "")
    match = _TIMESTAMP.match(text)
    if match is None:
        return None, text
    return float(match.group(1)), text[match.end() :]


class ConsoleScanner:
    """Incremental console reader. feed() each line; finish() at the end; report() any time."""

    def __init__(self) -> None:
        self._line = 0
        self._faults: list[Fault] = []
        self._suites: list[SuiteSpan] = []
        self._open: _Open | None = None
        self._init_ready: int | None = None
        self._init_failed = False
        self._runner_done: int | None = None
        self._runner_error: str | None = None
        self._boot_seconds: float | None = None
        self._last_timestamp: float | None = None
        self._kernel_release: str | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._boot_tail: list[str] | None = None
        self._context: collections.deque[str] = collections.deque(maxlen=PANIC_CONTEXT_LINES)
        self._lines_since_fault: int | None = None
        self._dropped_faults = 0
        self._dropped_suites = 0

    @property
    def running_suite(self) -> str | None:
        if self._suites and not self._suites[-1].ended:
            return self._suites[-1].name
        return None

    def feed(self, line: str) -> list[Event]:
        self._line += 1
        stamp, text = normalize(line)
        if stamp is not None:
            self._last_timestamp = stamp
        self._tail.append(text)
        running = self.running_suite
        if running is not None and text.startswith(f"[{running}] "):
            return []  # a copy of the suite's own output: neither a marker nor a kernel message
        events = self._markers(text)
        if events:
            self._context.clear()  # a panic's context is what the kernel said since the last marker
            return events
        if self._kernel_release is None and (version := _LINUX_VERSION.match(text)):
            self._kernel_release = version.group(1)
        return self._kernel_line(text)

    def finish(self) -> list[Event]:
        """End of the log: close a report still open (it is kept, marked incomplete)."""
        return self._close(complete=False)

    def report(self) -> ConsoleReport:
        faults = list(self._faults)
        if self._open is not None:
            faults.append(self._to_fault(self._open, complete=False))
        boot_tail = self._boot_tail if self._boot_tail is not None else list(self._tail)
        return ConsoleReport(
            faults=faults,
            suites=[replace(span) for span in self._suites],
            init_ready_line=self._init_ready,
            init_failed=self._init_failed,
            runner_done_line=self._runner_done,
            runner_error=self._runner_error,
            boot_seconds=self._boot_seconds,
            boot_tail="\n".join(boot_tail),
            kernel_release=self._kernel_release,
            last_timestamp=self._last_timestamp,
            lines=self._line,
            dropped_faults=self._dropped_faults,
            dropped_suites=self._dropped_suites,
        )

    def tail(self) -> str:
        """The last console lines (timestamps removed)."""
        return "\n".join(self._tail)

    # -- markers -------------------------------------------------------------------------------------

    def _markers(self, text: str) -> list[Event]:
        if _INIT_READY.search(text):
            self._init_ready = self._line
            self._boot_seconds = self._last_timestamp
            self._boot_tail = list(self._tail)[:-1]
            return [InitReady(self._line)]
        if _INIT_FAILED.search(text):
            self._init_failed = True
            return [InitFailed(self._line)]
        if (end := _SUITE_END.search(text)) is not None:
            span = self._end_suite(end)
            return [SuiteEnded(span)] if span is not None else []
        if (start := _SUITE_START.search(text)) is not None:
            if not self._room_for_suite():
                return []
            self._suites.append(SuiteSpan(name=start.group(1), start_line=self._line))
            return [SuiteStarted(start.group(1), self._line)]
        if _RUNNER_DONE.search(text):
            self._runner_done = self._line
            return [RunnerDone(self._line)]
        if (crashed := _RUNNER_CRASHED.search(text)) is not None:
            self._runner_error = crashed.group(1)
            return [RunnerCrashed(self._line, crashed.group(1))]
        return []

    def _room_for_suite(self) -> bool:
        if len(self._suites) < MAX_SUITE_SPANS:
            return True
        self._dropped_suites += 1
        return False

    def _end_suite(self, match: re.Match[str]) -> SuiteSpan | None:
        name = match.group(1)
        span = next((s for s in reversed(self._suites) if s.name == name and not s.ended), None)
        if span is None:  # an END without its START (lost console output): keep what it says
            if not self._room_for_suite():
                return None
            span = SuiteSpan(name=name, start_line=self._line)
            self._suites.append(span)
        span.end_line = self._line
        span.rc = None if match.group(2) == "none" else int(match.group(2))
        span.seconds = float(match.group(3))
        span.timed_out = match.group(4) == "1"
        return replace(span)

    # -- faults --------------------------------------------------------------------------------------

    def _kernel_line(self, text: str) -> list[Event]:
        events: list[Event] = []
        current = self._open
        if current is not None:
            if _CONTINUATION.match(text) and not current.in_call_trace:
                self._append(current, text)
                return events
            start = _match_start(text)
            if start is None and self._continues(current, text):
                self._append(current, text)
                if current.end is not None and current.end.match(text):
                    events += self._close(complete=True)
                elif len(current.lines) >= MAX_FAULT_LINES:
                    events += self._close(complete=False)
                return events
            events += self._close(complete=current.end is None)
        start = _match_start(text)
        if start is None:
            self._context.append(text)
            if self._lines_since_fault is not None:
                self._lines_since_fault += 1
            return events
        opened = _Open(
            kind=start.kind,
            title=text.strip(),
            line=self._line,
            suite=self.running_suite,
            phase=self._phase(),
            end=start.end,
        )
        if start.kind == "panic":
            opened.lines += self._panic_preamble()
        self._open = opened
        self._append(opened, text)
        if self._keeps(opened.kind):
            events.append(FaultStarted(opened.kind, opened.title, opened.line, opened.suite))
        return events

    def _keeps(self, kind: FaultKind) -> bool:
        """Whether a report of kind is kept: the first MAX_FAULTS, and the first panic whenever it comes
        (a flood of fake WARNINGs must not hide the panic that decides the outcome)."""
        if len(self._faults) < MAX_FAULTS:
            return True
        return kind == "panic" and not any(fault.kind == "panic" for fault in self._faults)

    def _continues(self, current: _Open, text: str) -> bool:
        """Whether text still belongs to the open report (reports with an end marker run to it)."""
        if current.end is not None:
            return True
        if not current.in_call_trace:
            return True
        return bool(_TRACE_LINE.match(text))

    def _append(self, current: _Open, text: str) -> None:
        current.lines.append(text)
        current.last_line = self._line
        if text.strip() == "Call Trace:":
            current.in_call_trace = True

    def _close(self, complete: bool) -> list[Event]:
        current = self._open
        if current is None:
            return []
        self._open = None
        fault = self._to_fault(current, complete)
        self._context.clear()
        self._lines_since_fault = 0
        if not self._keeps(fault.kind):
            self._dropped_faults += 1
            return []
        self._faults.append(fault)
        return [FaultEnded(fault)]

    def _to_fault(self, current: _Open, complete: bool) -> Fault:
        return Fault(
            kind=current.kind,
            title=current.title,
            trace="\n".join(current.lines),
            line=current.line,
            end_line=current.last_line,
            suite=current.suite,
            phase=current.phase,
            complete=complete,
        )

    def _panic_preamble(self) -> list[str]:
        """What led to a panic: the report just before it (and the lines since), else recent lines."""
        lines: list[str] = []
        recent = self._faults[-1] if self._faults else None
        if recent is not None and self._lines_since_fault is not None and self._lines_since_fault <= 10:
            lines += recent.trace.splitlines()
        lines += self._context
        return lines

    def _phase(self) -> Phase:
        if self._init_ready is None:
            return "boot"
        if self.running_suite is not None:
            return "suite"
        if self._runner_done is not None:
            return "shutdown"
        return "runner"


def _match_start(text: str) -> _Start | None:
    return next((start for start in _STARTS if start.pattern.match(text)), None)


def scan(text: str) -> ConsoleReport:
    """Read a whole console log."""
    scanner = ConsoleScanner()
    for line in text.splitlines():
        scanner.feed(line)
    scanner.finish()
    return scanner.report()
