"""What the host and the guest agree on, in one place (guest-tests/PROTOCOL.md is the prose of it).

- the console markers the guest's init and runner print (kci-init, kci-runner.py) and that the QEMU
  runner and the console scanner watch for;
- how a guest run ends (`EndKind`), as the QEMU runner decides it and the report reads it;
- the layout of plan.json (`Plan`), written into the payload and read back for the report;
- what the console scanner found (`ConsoleReport`: faults, suite spans), which the report turns into a
  verdict.

Shared by the guest and report stages, so it imports nothing of ours but core (and the suite manifest's
language list, itself a protocol module).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kernel_ci.core.errors import InfrastructureError
from kernel_ci.guest.suites import LANGUAGES, Language

# --- console markers (PROTOCOL.md: Boot, The runner) ------------------------------------------------------
INIT_READY = "KCI-INIT: ready"
INIT_RUNNER_FAILED = "KCI-INIT: runner failed"
SUITE_START = "KCI-SUITE-START:"
SUITE_END = "KCI-SUITE-END:"
RUNNER_DONE = "KCI-RUNNER: done"
RUNNER_CRASHED = "KCI-RUNNER: crashed:"
# Warm start (PROTOCOL.md): the kernel command line word that makes the runner wait, its mark, and the
# line the host types on the console to start it (then the host's time in ns since the epoch).
WARM_ARG = "kci.warm=1"
WARM_READY = "KCI-WARM: ready"
GO_PREFIX = "KCI-GO"


class EndKind(enum.StrEnum):
    """How a guest run ended, as the QEMU runner saw it (a str: it is written as is into reports)."""

    POWEROFF = "poweroff"  # the guest rebooted or powered off (QEMU -no-reboot exited)
    TIMEOUT = "timeout"  # the global timeout
    HANG = "hang"  # no console output for the idle timeout
    BOOT_TIMEOUT = "boot_timeout"  # no INIT_READY in time
    QEMU_FAILED = "qemu_failed"  # QEMU could not start or exited with an error


# --- plan.json ------------------------------------------------------------------------------------------


class PlanError(InfrastructureError, ValueError):
    """plan.json is missing or is not the layout below."""


@dataclass(frozen=True)
class PlanSuite:
    name: str
    language: Language
    timeout: int
    modules: tuple[str, ...]  # paths under the payload root, loaded before the suite, unloaded after
    argv: tuple[str, ...]
    workdir: str  # under the payload root
    junit: bool  # the suite writes $KCI_JUNIT itself
    # kselftest: (testcase name, reason) of the tests expected to fail on this kernel (read by the host)
    expected_failures: tuple[tuple[str, str], ...] = ()
    # kselftest: (binary, harness case, seconds): the runner fires the harness's timeout for that case early
    case_timeouts: tuple[tuple[str, str, float], ...] = ()

    def to_json(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.expected_failures:
            extra["expected_failures"] = [{"test": t, "reason": r} for t, r in self.expected_failures]
        if self.case_timeouts:
            extra["case_timeouts"] = [
                {"binary": b, "case": c, "seconds": s} for b, c, s in self.case_timeouts
            ]
        return {
            "name": self.name,
            "language": self.language,
            "timeout": self.timeout,
            "modules": list(self.modules),
            "argv": list(self.argv),
            "workdir": self.workdir,
            "junit": self.junit,
            **extra,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlanSuite:
        language = data["language"]
        if language not in LANGUAGES:
            raise ValueError(f"suite {data.get('name')!r}: unknown language {language!r}")
        return cls(
            name=str(data["name"]),
            language=language,
            timeout=int(data["timeout"]),
            modules=tuple(str(m) for m in data.get("modules", [])),
            argv=tuple(str(a) for a in data["argv"]),
            workdir=str(data["workdir"]),
            junit=bool(data.get("junit", False)),
            expected_failures=tuple(
                (str(x["test"]), str(x["reason"])) for x in data.get("expected_failures", [])
            ),
            case_timeouts=tuple(
                (str(x["binary"]), str(x["case"]), float(x["seconds"])) for x in data.get("case_timeouts", [])
            ),
        )


@dataclass(frozen=True)
class Plan:
    kernel_release: str
    suites: tuple[PlanSuite, ...]
    # 0 for a run, n for its n-th retry (kernel-ci attribute): the suites see it as $KCI_ATTEMPT
    attempt: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel_release": self.kernel_release,
            "attempt": self.attempt,
            "suites": [s.to_json() for s in self.suites],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        attempt = int(data.get("attempt", 0))
        if attempt < 0:
            raise ValueError(f"attempt {attempt}: a run's attempt number is 0 or more")
        suites = tuple(PlanSuite.from_json(s) for s in data["suites"])
        return cls(str(data["kernel_release"]), suites, attempt)


def read_plan(path: Path) -> Plan:
    """plan.json, as the payload writer left it."""
    try:
        return Plan.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"{path}: not a usable plan.json: {exc}") from exc


def write_plan(plan: Plan, path: Path) -> None:
    path.write_text(json.dumps(plan.to_json(), indent=2) + "\n")


# --- what the console scanner found ------------------------------------------------------------------------

FaultKind = Literal["panic", "oops", "bug", "warn", "kasan", "ubsan", "gpf"]
Phase = Literal["boot", "suite", "runner", "shutdown"]


@dataclass
class Fault:
    """One kernel report. trace runs from its title line to its end marker (or a sane limit)."""

    kind: FaultKind
    title: str
    trace: str
    line: int
    end_line: int
    suite: str | None
    phase: Phase
    complete: bool


@dataclass
class SuiteSpan:
    """A suite as the console saw it: started at start_line, ended at end_line (None: never ended)."""

    name: str
    start_line: int
    end_line: int | None = None
    rc: int | None = None
    seconds: float | None = None
    timed_out: bool = False

    @property
    def ended(self) -> bool:
        return self.end_line is not None


@dataclass
class ConsoleReport:
    faults: list[Fault]
    suites: list[SuiteSpan]
    init_ready_line: int | None
    init_failed: bool
    runner_done_line: int | None
    runner_error: str | None  # from "KCI-RUNNER: crashed: ..."
    boot_seconds: float | None
    boot_tail: str
    kernel_release: str | None
    last_timestamp: float | None
    lines: int
    dropped_faults: int = 0  # kernel reports past MAX_FAULTS, not kept
    dropped_suites: int = 0  # suite markers past MAX_SUITE_SPANS, not kept

    @property
    def panic(self) -> Fault | None:
        return next((fault for fault in self.faults if fault.kind == "panic"), None)

    def suite(self, name: str) -> SuiteSpan | None:
        return next((span for span in self.suites if span.name == name), None)

    def faults_in(self, suite: str) -> list[Fault]:
        return [fault for fault in self.faults if fault.suite == suite]

    @property
    def running(self) -> SuiteSpan | None:
        """The suite started last if it has not ended."""
        if self.suites and not self.suites[-1].ended:
            return self.suites[-1]
        return None
