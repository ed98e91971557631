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
    FLAKY = 8  # every failing test passed on a retry in a fresh guest: not a regression, not green either
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
