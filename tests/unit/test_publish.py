"""The output dir of a build without the cache is the user's own: no name in it shares an inode with the
staging dir's hard links to kernel-ci's source tree (a rename of the staging dir would have)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kernel_ci.flow.build import _link_or_copy_tree


def test_the_output_dir_never_shares_a_file_with_kernel_cis_source_tree(tmp_path: Path) -> None:
    source = tmp_path / "work" / "src"
    (source / "include").mkdir(parents=True)
    (source / "include" / "a.h").write_text("#define A 1\n")
    staging = Path(tempfile.mkdtemp(prefix="outputs-", dir=tmp_path))
    (staging / "kbuild" / "include").mkdir(parents=True)
    os.link(source / "include" / "a.h", staging / "kbuild" / "include" / "a.h")  # as export_kbuild_tree
    (staging / "bzImage").write_bytes(b"kernel")
    dest = tmp_path / "out" / "build"
    for _ in range(2):  # into a new output dir, then over it (the rerun's sync)
        _link_or_copy_tree(staging, dest)
        header = dest / "kbuild" / "include" / "a.h"
        assert header.read_text() == "#define A 1\n" and header.stat().st_nlink == 1
        header.write_text("#define A 2\n")  # the user edits the output dir
        assert (source / "include" / "a.h").read_text() == "#define A 1\n"
    assert (staging / "bzImage").exists(), "the staging dir is the caller's to remove"
