"""One error hierarchy: every error kernel-ci raises on purpose carries the exit code it means.

A user's mistake (bad option, unknown version, missing directory) exits 2; a build that fails (a patch that
does not apply, a lost kconfig option, a compile error) exits 10; a broken host or tool (Docker down, QEMU
missing, a download that fails) exits 7, the code the test taxonomy already gives "infrastructure", so a
broken machine never reads as a test failure (1). Anything else that escapes is a bug: `cli.main` reports
it as infrastructure (7) with the path of the log that holds its traceback, never as a traceback and 1.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What `kernel-ci` exits with; test outcomes 0-7 are the guest taxonomy (report.model.Outcome)."""

    PASS = 0
    TEST_FAILURE = 1
    USAGE = 2
    OOPS = 3
    PANIC = 4
    HANG = 5
    BOOT_TIMEOUT = 6
    INFRASTRUCTURE = 7
    BUILD_FAILED = 10
    INTERRUPTED = 130


class KernelCIError(Exception):
    """Base of every error raised on purpose; its message says what happened and what to do."""

    exit_code: ExitCode = ExitCode.INFRASTRUCTURE


class UsageError(KernelCIError):
    """The command line or a file the user wrote is wrong (exit 2)."""

    exit_code = ExitCode.USAGE


class BuildError(KernelCIError):
    """The kernel could not be built from these inputs (exit 10)."""

    exit_code = ExitCode.BUILD_FAILED


class InfrastructureError(KernelCIError):
    """The host, a tool or a service failed; not the code under test (exit 7)."""

    exit_code = ExitCode.INFRASTRUCTURE


BUILD_FAILED_EXIT = int(ExitCode.BUILD_FAILED)

# `git bisect run` reads an exit code as: 0 good, 125 skip (cannot test this commit), 1-127 bad, >127 abort.
BISECT_GOOD = 0
BISECT_BAD = 1
BISECT_SKIP = 125
BISECT_ABORT = 128
_BISECT = {
    ExitCode.PASS: BISECT_GOOD,
    ExitCode.TEST_FAILURE: BISECT_BAD,
    ExitCode.OOPS: BISECT_BAD,
    ExitCode.PANIC: BISECT_BAD,
    ExitCode.HANG: BISECT_BAD,
    ExitCode.BOOT_TIMEOUT: BISECT_BAD,  # the kernel did not come up: a property of the commit
    # a commit that does not build, or a machine that failed, says nothing about the bug: skip it
    ExitCode.BUILD_FAILED: BISECT_SKIP,
    ExitCode.INFRASTRUCTURE: BISECT_SKIP,
    # the command line is wrong, or the user pressed ^C: every step would fail the same way, stop
    ExitCode.USAGE: BISECT_ABORT,
    ExitCode.INTERRUPTED: BISECT_ABORT + 2,
}


def bisect_exit_code(code: int) -> int:
    """What `kernel-ci` exits with under `git bisect run`, for the code it would exit with otherwise."""
    try:
        return _BISECT[ExitCode(code)]
    except ValueError:
        return BISECT_SKIP  # an unknown code is no verdict on the commit


def bisect_verdict(code: int) -> str:
    """The word git bisect gives a bisect exit code."""
    if code == BISECT_GOOD:
        return "good"
    if code == BISECT_SKIP:
        return "skip"
    return "bad" if 0 < code < BISECT_ABORT else "abort"
