"""flow.build._moved_into_place: a build without the cache hands its staging dir over by a rename, only
where that leaves exactly what the copy would have."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from kernel_ci.flow.build import _moved_into_place


def _staging(root: Path) -> Path:
    staging = Path(tempfile.mkdtemp(prefix="outputs-", dir=root))
    (staging / "kbuild" / "include").mkdir(parents=True)
    (staging / "kbuild" / "include" / "a.h").write_text("#define A 1\n")
    (staging / "bzImage").write_bytes(b"kernel")
    (staging / "modules").mkdir()
    (staging / "modules" / "build").symlink_to("../kbuild")
    return staging


@pytest.mark.parametrize("dest_state", ["missing", "empty-dir"])
def test_a_new_or_empty_output_dir_is_the_staging_dir_renamed(tmp_path: Path, dest_state: str) -> None:
    staging = _staging(tmp_path)
    inode = (staging / "bzImage").stat().st_ino
    dest = tmp_path / "out" / "build"
    if dest_state == "empty-dir":
        dest.mkdir(parents=True)
    assert _moved_into_place(staging, dest)
    assert not staging.exists()
    assert (dest / "bzImage").stat().st_ino == inode, "moved, not copied"
    assert os.readlink(dest / "modules" / "build") == "../kbuild"
    assert (dest / "kbuild" / "include" / "a.h").read_text() == "#define A 1\n"


def test_an_output_dir_with_files_is_left_to_the_sync(tmp_path: Path) -> None:
    """A rerun's output keeps what did not change (sync_tree): never replaced wholesale here."""
    staging = _staging(tmp_path)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine\n")
    assert not _moved_into_place(staging, dest)
    assert (staging / "bzImage").exists() and (dest / "notes.txt").read_text() == "mine\n"


def test_an_output_that_is_a_symlink_or_a_file_is_not_renamed_over(tmp_path: Path) -> None:
    staging = _staging(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "out-link"
    link.symlink_to(elsewhere, target_is_directory=True)
    assert not _moved_into_place(staging, link)
    assert link.is_symlink() and list(elsewhere.iterdir()) == []
    plain = tmp_path / "out-file"
    plain.write_text("a file\n")
    assert not _moved_into_place(staging, plain)
    assert plain.read_text() == "a file\n" and (staging / "bzImage").exists()


def test_another_filesystem_is_left_to_the_copy(tmp_path: Path) -> None:
    """rename(2) cannot cross filesystems: False, the staging dir intact (the caller copies it)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem here")
    staging = _staging(tmp_path)
    dest_root = Path(tempfile.mkdtemp(dir=shm))
    try:
        assert not _moved_into_place(staging, dest_root / "out")
        assert (staging / "bzImage").exists() and not (dest_root / "out").exists()
    finally:
        shutil.rmtree(dest_root)
