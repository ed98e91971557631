"""kernel-ci installed like a tool: a wheel built from this checkout, installed with pipx (client only: no
[server] extra) into a fresh virtualenv of Debian's own Python (tests/pipxinstall.py), run from directories
outside the checkout with --project, from a bare directory (the packaged default suites), and from inside the
checkout by discovery. The build is the default build other e2e tests make, so it is a build cache hit; the
test runs boot once each."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kernel_ci.cli.result import CommandResult
from kernel_ci.core.paths import CHECKOUT, PROJECT_ENV
from tests.pipxinstall import Installed, pipx_install

pytestmark = pytest.mark.slow
SERVER_MODULES = ("starlette", "uvicorn", "boto3", "psycopg", "uvloop", "httptools", "jinja2")
# the `cache serve|scrub` option definitions (argparse only) are part of every parser; the service is not
PARSER_ONLY = ("kernel_ci.cache.server", "kernel_ci.cache.server.cli")


def _run(
    argv: list[str | os.PathLike[str]], cwd: Path, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (PROJECT_ENV, "PYTHONPATH")}
    return subprocess.run(
        [os.fspath(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return pipx_install(tmp_path_factory.mktemp("install"))


def test_client_install_has_and_imports_nothing_of_the_server(installed: Installed, tmp_path: Path) -> None:
    for argv in (["--help"], ["build", "--help"], ["test", "--help"]):
        done = _run([installed.tool, *argv], tmp_path)
        assert done.returncode == 0, done.stderr
    probe = (
        "import importlib.util, sys\n"
        "import kernel_ci, kernel_ci.flow.attribute, kernel_ci.cli.explain\n"
        f"assert not kernel_ci.__file__.startswith({str(CHECKOUT)!r}), kernel_ci.__file__\n"
        "from kernel_ci.cli.main import main\n"
        f"assert main(['--project', {str(CHECKOUT)!r}, 'key']) == 0\n"
        f"loaded = [m for m in sys.modules if m.split('.')[0] in {SERVER_MODULES!r} "
        f"or (m.startswith('kernel_ci.cache.server') and m not in {PARSER_ONLY!r})]\n"
        "assert not loaded, loaded\n"
        "assert importlib.util.find_spec('starlette') is None  # the extra is not installed\n"
    )
    done = _run([installed.python, "-c", probe], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    serve = _run([installed.tool, "cache", "serve", "--data", tmp_path / "data"], tmp_path)
    assert serve.returncode == 2
    assert "pip install 'kernel-ci[server]'" in " ".join((serve.stdout + serve.stderr).split())


def test_installed_tool_builds_and_tests_from_outside_the_checkout(
    installed: Installed, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = tmp_path / "out"
    built_json, tested_json = tmp_path / "build.json", tmp_path / "test.json"
    tool: list[str | os.PathLike[str]] = [installed.tool, "--project", CHECKOUT]
    build = _run([*tool, "build", "-o", out, "--json", built_json], outside)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert (out / "build" / "bzImage").is_file()
    built = CommandResult.from_json(built_json.read_text())
    assert (built.outcome, built.exit_code, built.paths["build"]) == ("PASS", 0, str(out / "build"))
    # the packaged default suites (the checkout has no smoke-*: the wheel's), smoke-c built with its lib/
    chosen = ["--suite", "smoke-py", "--suite", "smoke-c"]
    test = _run([*tool, "test", "-o", out, *chosen, "--json", tested_json], outside, timeout=1800)
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    assert (out / "junit.xml").is_file()
    tested = CommandResult.from_json(tested_json.read_text())
    assert (tested.outcome, tested.build_key) == ("PASS", built.build_key)
    counts = {s.name: s for s in tested.suites}  # the boot pseudo-suite and the one chosen
    assert set(counts) == {"boot", "smoke-py", "smoke-c"}
    assert counts["smoke-py"].passed > 0 and counts["smoke-c"].passed > 0
    assert counts["smoke-py"].failed == counts["smoke-c"].failed == 0
    assert not (outside / "out").exists()  # -o, not the current directory

    inside = CHECKOUT / "guest-tests"  # discovery: the project is found upwards from here
    found = _run([installed.tool, "build", "-o", tmp_path / "out2"], inside)
    assert found.returncode == 0, found.stdout[-3000:] + found.stderr[-3000:]
    assert "build cache hit" in found.stdout + found.stderr  # rich prints to stderr
    shutil.rmtree(tmp_path / "out2", ignore_errors=True)


def test_installed_tool_tests_a_built_kernel_from_a_bare_directory(
    installed: Installed, tmp_path: Path
) -> None:
    """No project at all (no kernel-patches/, no guest-tests/): the default suites shipped in the wheel."""
    built = tmp_path / "built"
    build = _run([installed.tool, "--project", CHECKOUT, "build", "-o", built], tmp_path)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    bare = tmp_path / "bare"
    bare.mkdir()
    result_json = tmp_path / "test.json"
    argv = [
        installed.tool,
        "test",
        "--kernel-dir",
        built / "build",
        "--suite",
        "smoke-py",
        "--json",
        result_json,
    ]
    test = _run(argv, bare, timeout=1800)
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    result = CommandResult.from_json(result_json.read_text())
    assert result.outcome == "PASS" and [s.name for s in result.suites] == ["boot", "smoke-py"]
    assert (bare / "out" / "junit.xml").is_file()  # a bare project's output: ./out
