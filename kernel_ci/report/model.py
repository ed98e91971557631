"""The results of a run, as every reader and writer of reports sees them: Outcome, Case, SuiteResult,
RunReport, how the guest ended (GuestEnd) and the run's record (RunRecord, run.json).

Shared between stages (the verdict builds a RunReport, the JUnit writer and reader map it to XML and back,
render shows it, the flow and the CLI read run.json): it imports core and the guest protocol only.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from kernel_ci.core.errors import UsageError
from kernel_ci.core.files import write_text_atomic
from kernel_ci.guest.protocol import EndKind


class Outcome(enum.IntEnum):
    """The run's verdict; its value is the exit code (2 is left to argparse usage errors)."""

    PASS = 0
    TEST_FAILURE = 1
    KERNEL_OOPS = 3
    KERNEL_PANIC = 4
    GUEST_HANG = 5
    BOOT_TIMEOUT = 6
    INFRA_FAILURE = 7

    @property
    def severity(self) -> int:
        return _SEVERITY.index(self)


_SEVERITY = (
    Outcome.PASS,
    Outcome.TEST_FAILURE,
    Outcome.KERNEL_OOPS,
    Outcome.BOOT_TIMEOUT,
    Outcome.GUEST_HANG,
    Outcome.KERNEL_PANIC,
    Outcome.INFRA_FAILURE,
)


def worst(outcomes: Iterable[Outcome]) -> Outcome:
    return max(outcomes, key=lambda outcome: outcome.severity, default=Outcome.PASS)


@dataclass(frozen=True)
class GuestEnd:
    """How the guest run ended, as the QEMU runner saw it."""

    kind: EndKind
    detail: str = ""
    console_tail: str = ""
    sysrq_dump: str = ""
    console_dropped_bytes: int = 0  # console output past the console.log limit (a flooding guest)


CaseState = Literal["passed", "failed", "error", "skipped"]


@dataclass
class Case:
    name: str
    classname: str
    state: CaseState
    seconds: float | None = None
    message: str = ""  # one line: the failure/error/skip reason
    detail: str = ""  # the failure/error body (trace, console tail)
    output: str = ""  # system-out
    stderr: str = ""  # system-err
    outcome: Outcome = Outcome.PASS  # what this case means for the run
    properties: dict[str, str] = field(default_factory=dict)  # the explanation (report.compare)


@dataclass
class SuiteResult:
    name: str
    cases: list[Case]
    properties: dict[str, str] = field(default_factory=dict)
    output: str = ""
    errors: str = ""
    seconds: float | None = None

    def count(self, state: CaseState) -> int:
        return sum(1 for case in self.cases if case.state == state)

    @property
    def bad(self) -> bool:
        return any(case.state in ("failed", "error") for case in self.cases)


@dataclass(frozen=True)
class SuiteRow:
    name: str
    tests: int
    failed: int
    errors: int
    skipped: int
    passed: int
    seconds: float | None


@dataclass
class RunReport:
    """A run's results. outcome is None only for a report read back from a JUnit file whose run.json was
    not found (JUnit has no place for it)."""

    outcome: Outcome | None
    suites: list[SuiteResult]
    properties: dict[str, str] = field(default_factory=dict)

    def count(self, state: CaseState) -> int:
        return sum(suite.count(state) for suite in self.suites)

    @property
    def tests(self) -> int:
        return sum(len(suite.cases) for suite in self.suites)

    @property
    def rows(self) -> list[SuiteRow]:
        return [
            SuiteRow(
                s.name,
                len(s.cases),
                s.count("failed"),
                s.count("error"),
                s.count("skipped"),
                s.count("passed"),
                s.seconds,
            )
            for s in self.suites
        ]

    @property
    def ok(self) -> bool:
        if self.outcome is not None:
            return self.outcome is Outcome.PASS
        return not any(suite.bad for suite in self.suites)

    @property
    def verdict(self) -> str:
        """ "KERNEL_OOPS (exit 3)"; "PASS" / "FAILED" when the outcome is not known."""
        if self.outcome is None:
            return "PASS" if self.ok else "FAILED"
        return f"{self.outcome.name} (exit {self.outcome.value})"

    def property(self, name: str) -> str | None:
        """A suite property (the run's properties are on every suite), from the first suite having it."""
        return next((s.properties[name] for s in self.suites if name in s.properties), None)

    def problems(self) -> list[tuple[str, Case]]:
        """Failed cases first, then errored ones, each in suite order."""
        found = [(s.name, c) for s in self.suites for c in s.cases if c.state == "failed"]
        return found + [(s.name, c) for s in self.suites for c in s.cases if c.state == "error"]


# --- run.json ----------------------------------------------------------------------------------------------

RUN_RECORD_SCHEMA = 1
RUN_RECORD_FILE = "run.json"


class RunRecordError(UsageError, ValueError):
    """A run.json that is not what this kernel-ci writes; the message says which file and what is wrong."""


@dataclass(frozen=True)
class RootfsRef:
    key: str
    path: str


@dataclass(frozen=True)
class RunRecord:
    """run.json: what a test run booted, how, and how it ended; `kernel-ci repro` boots it again from this.

    Written once, by kernel_ci.flow.test at the end of a run; read by repro, the bench and `kernel-ci
    summary` (its outcome). The fields after `options` are known only once the guest has run.
    """

    created: str
    build_key: str
    kernel_dir: str
    kernel: Mapping[str, Any]  # build.records.KernelInfo as JSON (version, requested, release, ...)
    reproduce_build: str
    rootfs: RootfsRef
    suites: tuple[str, ...]
    options: Mapping[str, Any]  # the TestOptions of the run (paths as strings)
    accelerator: str = ""
    qemu_command: tuple[str, ...] = ()
    overlay: str | None = None  # kept when the run failed (or asked to)
    payload: str = ""
    outcome: str = ""  # Outcome name
    exit_code: int | None = None
    guest_end: str = ""  # EndKind value
    seconds: float | None = None
    boot_seconds: float | None = None
    first_test_seconds: float | None = None
    # a run in several guests (kernel-ci test --guests): the run dirs of its guests (guest-1, ...), each a
    # complete run of its share of the suites; this record then has no payload or QEMU command of its own
    guests: tuple[str, ...] = ()
    schema: int = RUN_RECORD_SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=str)

    @classmethod
    def from_json(cls, text: str, where: str = RUN_RECORD_FILE) -> RunRecord:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise RunRecordError(f"{where}: not JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise RunRecordError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("schema") != RUN_RECORD_SCHEMA:
            raise RunRecordError(
                f"{where}: run record schema {data.get('schema')!r}, this kernel-ci reads "
                f"{RUN_RECORD_SCHEMA}: rerun kernel-ci test to write it again"
            )
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names - set(data) if n in _RUN_REQUIRED)
        unknown = sorted(set(data) - names)
        if missing or unknown:
            said = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unknown {', '.join(unknown)}"] if unknown else []
            )
            raise RunRecordError(f"{where}: not the run record this kernel-ci writes ({'; '.join(said)})")
        try:
            rootfs = data["rootfs"]
            values = {
                **data,
                "rootfs": RootfsRef(str(rootfs["key"]), str(rootfs["path"])),
                "suites": tuple(_strings(data["suites"])),
                "qemu_command": tuple(_strings(data.get("qemu_command", []))),
                "guests": tuple(_strings(data.get("guests", []))),
                "kernel": dict(data["kernel"]),
                "options": dict(data["options"]),
            }
            record = cls(**values)
            _check_types(record)
        except (KeyError, TypeError, ValueError) as exc:
            raise RunRecordError(f"{where}: a field has the wrong type ({exc})") from exc
        return record

    def write(self, run_dir: Path) -> Path:
        return write_text_atomic(run_dir / RUN_RECORD_FILE, self.to_json())  # never a half-written run.json

    @classmethod
    def read(cls, run_dir: Path) -> RunRecord:
        path = run_dir / RUN_RECORD_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise RunRecordError(f"{path} is missing: {run_dir} is not a kernel-ci test run") from None
        return cls.from_json(text, str(path))

    @classmethod
    def beside(cls, junit: Path) -> RunRecord | None:
        """The record of the run that wrote junit: beside it (out/runs/<time>/) or in latest/ (out/);
        None when there is none or it cannot be read."""
        for run_dir in (junit.parent, junit.parent / "latest"):
            if (run_dir / RUN_RECORD_FILE).is_file():
                try:
                    return cls.read(run_dir)
                except (OSError, RunRecordError):
                    return None
        return None

    def outcome_value(self) -> Outcome | None:
        return Outcome.__members__.get(self.outcome)


_RUN_REQUIRED = {
    "created",
    "build_key",
    "kernel_dir",
    "kernel",
    "reproduce_build",
    "rootfs",
    "suites",
    "options",
    "schema",
}


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"expected a list of strings, got {value!r:.60}")
    return value


def _check_types(record: RunRecord) -> None:
    for name in (
        "created",
        "build_key",
        "kernel_dir",
        "reproduce_build",
        "accelerator",
        "payload",
        "outcome",
    ):
        if not isinstance(getattr(record, name), str):
            raise TypeError(f"{name} is not a string")
    if record.overlay is not None and not isinstance(record.overlay, str):
        raise TypeError("overlay is not a string")
    if record.exit_code is not None and (
        isinstance(record.exit_code, bool) or not isinstance(record.exit_code, int)
    ):
        raise TypeError("exit_code is not an integer")
    for name in ("seconds", "boot_seconds", "first_test_seconds"):
        value = getattr(record, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise TypeError(f"{name} is not a number")
