"""Two builds of the same sources on a cold work dir prepare the patched tree once, and neither pulls the
tree from under the other (the preparation runs under the work dir's lock)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys
from pathlib import Path
from kernel_ci.build import source
from kernel_ci.flow import build as buildpipeline
tarball = source.Tarball("9.9.0", "debian", "p/linux_9.9.0.orig.tar.xz", "0" * 64, "linux-9.9.0")
src = source.KernelSource("9.9.0", tarball, Path(sys.argv[1]), "cache:")
tree = buildpipeline._prepare_tree(src, [], "t" * 16)
print(tree.stat().st_ino, (tree / "Makefile").read_text().strip())
"""


def test_two_processes_prepare_the_same_tree_once(tmp_path: Path) -> None:
    pristine = tmp_path / "linux-9.9.0"
    pristine.mkdir()
    (pristine / "Makefile").write_text("VERSION = 5\n")
    shims = tmp_path / "bin"
    shims.mkdir()
    runs = tmp_path / "cp-runs"
    (shims / "cp").write_text(f'#!/bin/sh\necho run >> {runs}\nsleep 2\nexec /bin/cp "$@"\n')
    (shims / "cp").chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "KERNEL_CI_CACHE": str(tmp_path / "cache")}
    argv = [sys.executable, "-c", CHILD, str(pristine)]
    children = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [child.communicate(timeout=60)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0]
    assert outputs[0] == outputs[1]  # the same tree, complete, for both
    assert outputs[0].split()[1:] == ["VERSION", "=", "5"]
    assert runs.read_text().count("run") == 1
