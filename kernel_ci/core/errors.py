"""Which exceptions are the user's to read (clear, actionable messages) rather than bugs to trace back."""

from __future__ import annotations

BUILD_FAILED_EXIT = 10  # a patch that does not apply, a lost kconfig option, a compile error, a setup problem


def user_facing(exc: BaseException) -> bool:
    """Errors raised on purpose by a stage of this package carry their own explanation."""
    return type(exc).__module__.startswith("kernel_ci.") or type(exc).__name__ == "DockerException"
