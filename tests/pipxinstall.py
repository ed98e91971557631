"""kernel-ci installed the way the README says a user installs it: a wheel built from this checkout, installed
with pipx (PIPX_HOME and PIPX_BIN_DIR of the test's own) into a fresh virtualenv of Debian's Python, client
only (no [server] extra), under the pinned constraints. Used by test_install and test_rootless."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STOCK_PYTHON = Path("/usr/bin/python3")  # the README's target: Debian 12's externally managed Python
# what the wheel must carry for an install to work away from any checkout (core/paths.py)
PACKAGE_DATA = (
    "kernel_ci/data/guest/suites/smoke-c/manifest.toml",
    "kernel_ci/data/guest/suites/smoke-c/smoke.c",
    "kernel_ci/data/guest/suites/smoke-py/test_smoke.py",
    "kernel_ci/data/modules/kci-smoke/kci_smoke.c",
    "kernel_ci/data/modules/kci-smoke/Kbuild",
    "kernel_ci/data/guest/lib/ktap.c",
    "kernel_ci/data/guest/lib/ktap.h",
    "kernel_ci/data/guest/runner/kci-runner.py",
    "kernel_ci/data/kconfig/base.config",
    "kernel_ci/data/kernel-sources.lock.toml",
    "kernel_ci/data/containers/builder/Dockerfile",
    "kernel_ci/cache/server/templates/history.html",
)


@dataclass(frozen=True)
class Installed:
    wheel: Path
    tool: Path  # PIPX_BIN_DIR/kernel-ci: what a user runs
    python: Path  # the Python of pipx's venv for kernel-ci (kernel_ci importable there, nothing else)


def run(
    argv: list[str | os.PathLike[str]], cwd: Path, env: dict[str, str] | None = None, timeout: float = 900
):
    return subprocess.run(
        [os.fspath(a) for a in argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def build_wheel(work: Path) -> Path:
    done = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", work / "dist", REPO], work)
    assert done.returncode == 0, done.stderr
    (wheel,) = (work / "dist").glob("kernel_ci-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in PACKAGE_DATA if name not in names]
    assert not missing, f"the wheel lacks {missing}"
    return wheel


def pipx_install(work: Path) -> Installed:
    """`pipx install <wheel>` into work/pipx (readable by every user: the rootless test's user runs it)."""
    wheel = build_wheel(work)
    home, bin_dir = work / "pipx" / "home", work / "pipx" / "bin"
    env = {
        **os.environ,
        "PIPX_HOME": str(home),
        "PIPX_BIN_DIR": str(bin_dir),
        "PIPX_MAN_DIR": str(work / "man"),
    }
    python = STOCK_PYTHON if STOCK_PYTHON.exists() else Path(sys.executable)
    constraints = f"-c {REPO / 'constraints.txt'}"
    argv = [sys.executable, "-m", "pipx", "install", "--python", python, "--pip-args", constraints, wheel]
    done = run(argv, work, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    for path in (work, work / "pipx"):
        path.chmod(0o755)
    return Installed(wheel, bin_dir / "kernel-ci", home / "venvs" / "kernel-ci" / "bin" / "python")
