"""`kernel-ci test --kernel-dir DIR --suite smoke-py` needs no Docker: nothing is compiled (no C suite, and
the build carried kci-smoke in extmod/), so the builder container is never started, and the test runs with
the engine unreachable (DOCKER_HOST pointing nowhere). From a bare directory (no project markers, no
guest-tests/): smoke-py is the default suite shipped in the package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_ci.cli.result import CommandResult
from kernel_ci.core.paths import CONTAINERS, GUEST_INIT, PROJECT_ENV

pytestmark = pytest.mark.slow
NOWHERE = "unix:///nonexistent/docker.sock"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default build (a build cache hit when another e2e test made it) and the guest rootfs, both made
    with Docker before the run that must not use it."""
    from kernel_ci.flow.build import BuildRequest, build
    from kernel_ci.guest import rootfs

    out = tmp_path_factory.mktemp("kernel") / "build"  # (no "docker" in the paths printed)
    built = build(BuildRequest(output=out))
    rootfs.ensure_rootfs(CONTAINERS / "rootfs", GUEST_INIT)
    assert any((built.output / "extmod" / "kci-smoke").glob("*.ko"))
    return built.output


def test_a_python_suite_on_a_built_kernel_runs_with_docker_unreachable(
    kernel_dir: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != PROJECT_ENV}
    env["DOCKER_HOST"] = NOWHERE
    probe = subprocess.run(["docker", "info"], env=env, capture_output=True, text=True, check=False)
    assert probe.returncode != 0, "the engine must really be unreachable for this test to mean anything"

    bare = tmp_path / "bare"  # no kernel-patches/, no guest-tests/: a bare project, the default suites
    bare.mkdir()
    result_json = tmp_path / "result.json"
    argv = [sys.executable, "-m", "kernel_ci.cli.main", "test", "--kernel-dir", str(kernel_dir)]
    argv += ["--suite", "smoke-py", "-o", str(tmp_path / "out"), "--json", str(result_json)]
    done = subprocess.run(argv, cwd=bare, env=env, capture_output=True, text=True, timeout=1800, check=False)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-4000:]
    result = CommandResult.from_json(result_json.read_text())
    counts = {s.name: s for s in result.suites}
    assert result.outcome == "PASS" and set(counts) == {"boot", "smoke-py"}
    assert counts["smoke-py"].passed == 3 and counts["smoke-py"].failed == 0
    assert "docker" not in said.lower()  # no image step, no engine message (the paths hold no "docker")
    assert not (bare / "out").exists()
