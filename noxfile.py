"""nox sessions: thin wrappers around the `kernel-ci` command and the project's checks.

nox -s kernel test        build the kernel (cached) and run the guest suites in QEMU -> out/junit.xml
nox -s lint unit e2e      the project's own checks (what .ci/run runs)
nox -s bench              benchmarks (JSON + table in out/bench/)

Arguments after `--` go to every session named: `nox -s kernel test -- --suite smoke-c --memory 2G`
gives `kernel` only the build's options (the test-only ones, TEST_ONLY, are dropped there) and `test` all.
Installs use constraints.txt (pinned versions) and happen once per virtualenv and pyproject/constraints
content: a session that finds the same stamp skips pip (the package is editable, so code changes need none).
A session whose Python is missing fails (error_on_missing_interpreters) instead of "skipped, exit 0".
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["kernel", "test"]
PYTHON = "3.11"
HERE = Path(__file__).resolve().parent
CONSTRAINTS = HERE / "constraints.txt"

# `kernel-ci test` options that `kernel-ci build` does not take: (option, takes a value). Held equal to the
# parser's "test" group by tests/unit/test_project.py.
TEST_ONLY = {
    "--kernel-dir": True,
    "--memory": True,
    "--cpus": True,
    "--accel": True,
    "--append": True,
    "--boot-timeout": True,
    "--gdb": False,
    "--gdb-port": True,
    "--idle-timeout": True,
    "--timeout": True,
    "--keep-overlay": False,
    "--attribute": False,
    "--retries": True,
    "--fail-on-preexisting": False,
    "--no-baseline": False,
    "--base": True,
    "--branch": True,
    "--guests": True,
    "--cold-boot": False,
    "--suite": True,  # build accepts and ignores it, with a warning: not worth the noise here
}


def build_args(posargs: list[str]) -> list[str]:
    """posargs without the test-only options (and their values): what `kernel-ci build` accepts."""
    kept: list[str] = []
    skip_value = False
    for arg in posargs:
        if skip_value:
            skip_value = False
            continue
        name = arg.split("=", 1)[0]
        if name in TEST_ONLY:
            skip_value = TEST_ONLY[name] and "=" not in arg
            continue
        kept.append(arg)
    return kept


def _install(session: nox.Session, extras: str = "") -> None:
    """pip install -e .[extras] under the constraints, unless this venv already has exactly that."""
    spec = f".{extras}"
    stamp = Path(session.virtualenv.location) / ".kernel-ci-installed"
    digest = hashlib.sha256(
        spec.encode() + (HERE / "pyproject.toml").read_bytes() + CONSTRAINTS.read_bytes()
    ).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest:
        return
    session.install("-c", str(CONSTRAINTS), "-e", spec)
    stamp.write_text(digest)


@nox.session(python=PYTHON)
def kernel(session: nox.Session) -> None:
    """Build the kernel with every patch series (or restore it from the build cache)."""
    _install(session)
    session.run("kernel-ci", "build", *build_args(session.posargs))


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
    # --durations: the slowest tests by name in every CI log (a cold machine took 48 min where a warm one
    # took 16.5: which tests build kernels nothing had in ccache is the first thing to know)
    session.run("pytest", "-m", "slow", "-v", "--timeout=3000", "--durations=15", *session.posargs)


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
