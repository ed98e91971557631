"""core.files.write_text_atomic: a reader sees the old file or the new one, never half of one; sync_tree: a
copy that rewrites only what differs and never shares an inode with its source."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from kernel_ci.core.files import write_text_atomic


def test_the_new_text_replaces_the_old_and_no_temporary_file_stays(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    target.write_text("old")
    assert write_text_atomic(target, "new") == target
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_a_write_that_fails_leaves_the_old_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "junit.xml"
    target.write_text("<testsuites/>")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(target, "half \udc80 written")  # a lone surrogate cannot be encoded: fails mid-way
    assert target.read_text() == "<testsuites/>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junit.xml"]


def _snapshot(root: Path) -> dict[str, tuple[str, bytes | str, int]]:
    """Every entry under root: kind, content (or link target), permission bits."""
    found: dict[str, tuple[str, bytes | str, int]] = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        mode = path.lstat().st_mode & 0o7777
        if path.is_symlink():
            found[name] = ("link", os.readlink(path), 0)
        elif path.is_dir():
            found[name] = ("dir", b"", mode)
        else:
            found[name] = ("file", path.read_bytes(), mode)
    return found


def test_sync_tree_makes_a_copy_rewriting_only_what_differs(tmp_path: Path) -> None:
    import shutil

    from kernel_ci.core.files import sync_tree

    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "same").write_text("same")
    (src / "a" / "changed").write_text("new bytes")
    (src / "resized").write_text("longer than before")
    (src / "linked").write_text("shared")
    (src / "was-a-dir").write_text("now a file")
    (src / "was-a-file").mkdir()
    (src / "exec").write_text("#!/bin/sh\n")
    (src / "exec").chmod(0o755)
    os.symlink("a/b/same", src / "link")
    os.link(src / "a" / "b" / "same", tmp_path / "outside")  # src's files may be hard links elsewhere
    # an older copy in dest: some of it right, some of it stale
    (dest / "a" / "b").mkdir(parents=True)
    shutil.copy2(src / "a" / "b" / "same", dest / "a" / "b" / "same")  # as the last sync left it
    (dest / "a" / "changed").write_text("old bytes")  # same size, other bytes, written at another time
    (dest / "stale").write_text("same size")  # edited in dest since the last sync (its mtime is now)
    (src / "stale").write_text("same size")
    os.utime(src / "stale", ns=(0, 10**18))
    (dest / "resized").write_text("short")
    shutil.copy2(src / "linked", dest / "linked")
    os.link(dest / "linked", tmp_path / "someone-elses")  # same bytes, but another name shares the inode
    (dest / "was-a-dir").mkdir()
    (dest / "was-a-dir" / "x").write_text("")
    (dest / "was-a-file").write_text("")
    shutil.copy2(src / "exec", dest / "exec")
    (dest / "exec").chmod(0o644)  # same bytes and time, another mode
    os.symlink("elsewhere", dest / "link")
    (dest / "gone").write_text("not in src")
    kept = (dest / "a" / "b" / "same").stat().st_ino

    sync_tree(src, dest)

    reference = tmp_path / "reference"
    shutil.copytree(src, reference, symlinks=True)
    assert _snapshot(dest) == _snapshot(reference)
    assert (dest / "a" / "b" / "same").stat().st_ino == kept  # unchanged: not rewritten
    assert (dest / "stale").stat().st_mtime_ns == 10**18  # another mtime: rewritten, though of the same size
    assert (dest / "linked").stat().st_nlink == 1  # the shared inode was replaced by a copy of its own
    assert (tmp_path / "someone-elses").read_text() == "shared"
    for path in dest.rglob("*"):  # dest never shares an inode with src
        if path.is_file() and not path.is_symlink():
            assert path.stat().st_ino != (src / path.relative_to(dest)).stat().st_ino
    (dest / "a" / "b" / "same").write_text("edited in the output")
    assert (src / "a" / "b" / "same").read_text() == "same"


def test_sync_tree_into_nothing_or_over_a_file(tmp_path: Path) -> None:
    from kernel_ci.core.files import sync_tree

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("x")
    sync_tree(src, tmp_path / "new" / "dest")
    assert (tmp_path / "new" / "dest" / "d" / "f").read_text() == "x"
    (tmp_path / "file").write_text("")
    sync_tree(src, tmp_path / "file")
    assert (tmp_path / "file" / "d" / "f").read_text() == "x"


def test_sync_and_remove_tree_leaves_the_copy_and_no_source(tmp_path: Path) -> None:
    """The removal runs beside the sync, a folder at a time: every file still reaches dest (deep trees,
    folders with many files, links to files elsewhere whose other names stay), and src is gone."""
    import shutil

    from kernel_ci.core.files import sync_and_remove_tree

    src, dest = tmp_path / "src", tmp_path / "dest"
    for top in range(8):
        deep = src / f"t{top}" / "a" / "b" / "c"
        deep.mkdir(parents=True)
        for n in range(40):
            (deep.parent / f"f{n}").write_text(f"{top} {n}")
        (deep / "leaf").write_text("leaf")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("linked")
    os.link(elsewhere, src / "linked")
    os.symlink("t0/a/b/f0", src / "link")
    (dest / "t0").mkdir(parents=True)
    (dest / "stale").write_text("not in src")
    reference = tmp_path / "reference"
    shutil.copytree(src, reference, symlinks=True)

    sync_and_remove_tree(src, dest)

    assert _snapshot(dest) == _snapshot(reference)
    assert not src.exists()
    assert elsewhere.read_text() == "linked" and elsewhere.stat().st_nlink == 1


def test_a_kept_folder_is_never_replaced_by_a_later_writer(tmp_path: Path) -> None:
    """Two runs save the same machine (guest.warmstart): the first to finish stays, since another process
    may already restore from it; the second's folder is dropped. Before, the second replaced the first."""
    from kernel_ci.core.files import is_kept, keep_folder

    stored = tmp_path / "warm" / "machine"
    stored.parent.mkdir()

    def writer(text: str) -> Callable[[Path], None]:
        def fill(staging: Path) -> None:
            staging.mkdir()
            (staging / "state").write_text(text)

        return fill

    keep_folder(stored, writer("first"), keep=3)
    inode = stored.stat().st_ino
    keep_folder(stored, writer("second"), keep=3)
    assert is_kept(stored) and (stored / "state").read_text() == "first"
    assert stored.stat().st_ino == inode
    assert sorted(p.name for p in stored.parent.iterdir()) == ["machine"]  # no staging folder left


def test_an_incomplete_leftover_is_replaced_and_old_folders_are_evicted(tmp_path: Path) -> None:
    import time

    from kernel_ci.core.files import keep_folder

    root = tmp_path / "reuse"
    (root / "a").mkdir(parents=True)  # a leftover without the complete mark: never read, replaced
    (root / "a" / "half").write_text("")
    keep_folder(root / "a", Path.mkdir, keep=2)
    assert sorted(p.name for p in (root / "a").iterdir()) == [".kci-reuse-complete"]
    for name in ("b", "c"):
        time.sleep(0.01)
        keep_folder(root / name, Path.mkdir, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["b", "c"]
