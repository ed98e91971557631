"""A bare project: a directory holding one kconfig fragment and nothing else (no kernel-patches/,
guest-tests/, kernel-modules/), where `kernel-ci test` builds a vanilla kernel and runs the default suites
shipped in the package. They must all pass: nothing in them may depend on this repository's series or
modules (the kci-smoke module they load ships in the package too and is built with the kernel).

The fragment sets CONFIG_LOCALVERSION, so the release the default suites compare `uname -r` with is the
build's own (5.10.x-bare), not the checkout's. The build goes to the shared build cache like every e2e
build: the first run compiles the kernel, a later run is a cache hit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_ci.build.records import BuildMetadata
from kernel_ci.cli.result import CommandResult
from kernel_ci.core.paths import PROJECT_ENV

pytestmark = pytest.mark.slow
DEFAULT_SUITES = {"smoke-c", "smoke-py"}


def test_a_bare_project_builds_a_vanilla_kernel_and_passes_the_default_suites(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    fragment = bare / "bare.config"
    fragment.write_text('CONFIG_LOCALVERSION="-bare"\n')
    out, result_json = tmp_path / "out", tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in (PROJECT_ENV, "PYTHONPATH")}
    argv = [sys.executable, "-m", "kernel_ci.cli.main", "test", "--fragment", fragment.name]
    argv += ["-o", str(out), "--json", str(result_json)]
    done = subprocess.run(argv, cwd=bare, env=env, capture_output=True, text=True, timeout=5400, check=False)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-5000:]

    metadata = BuildMetadata.read(out / "build")
    assert metadata.series == () and metadata.patches == ()  # vanilla: no project series
    assert metadata.kernel.release.endswith("-bare"), metadata.kernel.release
    assert set(metadata.external_modules) == {"kci-smoke"}  # the packaged module, built with the kernel
    assert (out / "build" / "extmod" / "kci-smoke" / "kci_smoke.ko").is_file()
    assert 'CONFIG_LOCALVERSION="-bare"' in (out / "build" / "config").read_text()

    result = CommandResult.from_json(result_json.read_text())
    counts = {s.name: s for s in result.suites}
    assert (result.outcome, result.exit_code) == ("PASS", 0), said[-5000:]
    assert set(counts) == {"boot", *DEFAULT_SUITES}  # every suite a bare project has: the defaults
    for name in DEFAULT_SUITES:
        assert counts[name].passed >= 3 and counts[name].failed == counts[name].error == 0, counts[name]
        assert counts[name].skipped == 0, counts[name]  # nothing quietly left out on a vanilla kernel
    junit = (out / "junit.xml").read_text()
    assert f"hello from smoke-py on {metadata.kernel.release}" in junit  # the guest ran this very build
    assert sorted(p.name for p in bare.iterdir()) == ["bare.config"]  # -o: nothing written to the project
