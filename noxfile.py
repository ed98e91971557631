"""nox sessions: thin wrappers around the `kernel-ci` command and the project's checks.

nox -s kernel test        build the kernel (cached) and run the guest suites in QEMU -> out/junit.xml
nox -s lint unit e2e      the project's own checks (what .ci/run runs)
nox -s bench              benchmarks (JSON + table in out/bench/)
"""

from __future__ import annotations

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["kernel", "test"]
PYTHON = "3.11"


def _install(session: nox.Session, extras: str = "") -> None:
    session.install("-e", f".{extras}")


@nox.session(python=PYTHON)
def kernel(session: nox.Session) -> None:
    """Build the kernel with every patch series (or restore it from the build cache)."""
    _install(session)
    session.run("kernel-ci", "build", *session.posargs)


@nox.session(python=PYTHON)
def test(session: nox.Session) -> None:
    """Boot the built kernel in QEMU and run every guest suite; JUnit in out/junit.xml."""
    _install(session)
    session.run("kernel-ci", "test", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff lint and format check; mypy over the package (with its dependencies installed, so that their
    types are checked too)."""
    _install(session, "[lint]")
    session.run("ruff", "check", "kernel_ci", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "kernel_ci", "tests", "noxfile.py")
    session.run("mypy", "kernel_ci")


@nox.session(python=PYTHON)
def unit(session: nox.Session) -> None:
    """Fast host tests (no kernel build, no QEMU boot)."""
    _install(session, "[test]")
    session.run("pytest", "-m", "not slow", "-q", *session.posargs)


@nox.session(python=PYTHON)
def e2e(session: nox.Session) -> None:
    """Real end to end: build kernels in the container, boot them in QEMU, check the reports."""
    _install(session, "[test]")
    session.run("pytest", "-m", "slow", "-v", "--timeout=3000", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks beside tuxmake and virtme-ng; figures in out/bench/bench.json."""
    _install(session, "[bench]")
    session.run("kernel-ci", "bench", *session.posargs)


@nox.session(python=PYTHON)
def patches(session: nox.Session) -> None:
    """Export each series as .patch files + mboxes into out/patches/; checkpatch them (fails on findings)."""
    _install(session)
    session.run("kernel-ci", "patches", *session.posargs)
