"""kernel-ci installed like a tool: a wheel built from this checkout, installed (non-editable, client only:
no [server] extra) into a fresh virtualenv of Debian's own Python, run from directories outside the
checkout with --project, and from inside it by discovery. The build is the default build other e2e tests
make, so it is a build cache hit; the test run boots once (smoke-py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_ci.cli.result import CommandResult
from kernel_ci.core.paths import CHECKOUT

pytestmark = pytest.mark.slow
STOCK_PYTHON = Path("/usr/bin/python3")  # the README's target: Debian 12's externally managed Python
SERVER_MODULES = ("starlette", "uvicorn", "boto3", "psycopg", "uvloop", "httptools")
# the `cache serve|scrub` option definitions (argparse only) are part of every parser; the service is not
PARSER_ONLY = ("kernel_ci.cache.server", "kernel_ci.cache.server.cli")


def _run(
    argv: list[str | os.PathLike[str]], cwd: Path, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [os.fspath(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ of a fresh venv with the client wheel (no extras) installed under the constraints."""
    work = tmp_path_factory.mktemp("install")
    python = STOCK_PYTHON if STOCK_PYTHON.exists() else Path(sys.executable)
    wheel = _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", work / "dist", CHECKOUT], work
    )
    assert wheel.returncode == 0, wheel.stderr
    (built,) = (work / "dist").glob("kernel_ci-*.whl")
    venv = _run([python, "-m", "venv", work / "venv"], work)
    assert venv.returncode == 0, venv.stderr
    pip = [work / "venv/bin/python", "-m", "pip", "install", "-q", "-c", CHECKOUT / "constraints.txt", built]
    done = _run(pip, work)
    assert done.returncode == 0, done.stderr
    return work / "venv" / "bin"


def test_client_install_has_and_imports_nothing_of_the_server(installed: Path, tmp_path: Path) -> None:
    for argv in (["--help"], ["build", "--help"], ["test", "--help"]):
        done = _run([installed / "kernel-ci", *argv], tmp_path)
        assert done.returncode == 0, done.stderr
    probe = (
        "import importlib.util, sys\n"
        "from kernel_ci.cli.main import main\n"
        f"assert main(['--project', {str(CHECKOUT)!r}, 'key']) == 0\n"
        f"loaded = [m for m in sys.modules if m.split('.')[0] in {SERVER_MODULES!r} "
        f"or (m.startswith('kernel_ci.cache.server') and m not in {PARSER_ONLY!r})]\n"
        "assert not loaded, loaded\n"
        "assert importlib.util.find_spec('starlette') is None  # the extra is not installed\n"
    )
    done = _run([installed / "python", "-c", probe], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    serve = _run([installed / "kernel-ci", "cache", "serve", "--data", tmp_path / "data"], tmp_path)
    assert serve.returncode == 2
    assert "pip install 'kernel-ci[server]'" in " ".join((serve.stdout + serve.stderr).split())


def test_installed_tool_builds_and_tests_from_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = tmp_path / "out"
    built_json, tested_json = tmp_path / "build.json", tmp_path / "test.json"
    tool: list[str | os.PathLike[str]] = [installed / "kernel-ci", "--project", CHECKOUT]
    build = _run([*tool, "build", "-o", out, "--json", built_json], outside)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert (out / "build" / "bzImage").is_file()
    built = CommandResult.from_json(built_json.read_text())
    assert (built.outcome, built.exit_code, built.paths["build"]) == ("PASS", 0, str(out / "build"))
    test = _run([*tool, "test", "-o", out, "--suite", "smoke-py", "--json", tested_json], outside)
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    assert (out / "junit.xml").is_file()
    tested = CommandResult.from_json(tested_json.read_text())
    assert (tested.outcome, tested.build_key) == ("PASS", built.build_key)
    counts = {s.name: s for s in tested.suites}  # the boot pseudo-suite and the one chosen
    assert set(counts) == {"boot", "smoke-py"} and counts["smoke-py"].passed > 0
    assert not (outside / "out").exists()  # -o, not the current directory

    inside = CHECKOUT / "guest-tests"  # discovery: the project is found upwards from here
    found = _run([installed / "kernel-ci", "build", "-o", tmp_path / "out2"], inside)
    assert found.returncode == 0, found.stdout[-3000:] + found.stderr[-3000:]
    assert "build cache hit" in found.stdout + found.stderr  # rich prints to stderr
    shutil.rmtree(tmp_path / "out2", ignore_errors=True)
