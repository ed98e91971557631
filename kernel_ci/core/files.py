"""Writing a small file so that no reader ever sees half of it: run.json, junit.xml, metadata.json, the
accelerator probe's cache. An interrupted write leaves the previous file (or none), never a torn one.

sync_tree: a folder made a copy of another, writing only the files that differ (a build's output dir);
sync_and_remove_tree: the same from a folder that is not kept.
"""

from __future__ import annotations

import os
import queue
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


def file_identity(path: Path) -> tuple[int, int, int, int, int]:
    """What changes whenever the file at path does: device, inode, size, mtime and ctime (an edit, a
    replacement or a utime changes one of them; ctime cannot be set back). For remembering work done on a
    file (a digest, a compression) as long as it is the same file."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write text to a temporary name beside path (one per process: concurrent writers do not share it),
    then rename it over path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def sync_tree(src: Path, dest: Path, *, synced: Callable[[str], object] | None = None) -> None:
    """Make dest what shutil.copytree(src, dest, symlinks=True) would make it, rewriting only what differs.

    A file of dest is kept only when it is a regular file with one link (no other name shares it: never
    src's own inode, nor a file linked elsewhere) of src's file's size, mode and mtime: rsync's quick check,
    and what the last sync left (copy2 keeps the mtime). A file written since has another mtime: an edit,
    a rebuild, a copy. Anything else is replaced by a fresh copy; entries src lacks are removed.
    An incremental build's outputs are mostly the files of the last one (the kbuild export: ~11,000 links
    to the source tree, the same inodes every time): comparing their bytes read 2 x 73 MB and copying them
    wrote them all again, 1.5 s or more of every build; the quick check is two stats a file."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        dest.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    with os.scandir(src) as listing:
        entries = {entry.name: entry for entry in listing}
    with os.scandir(dest) as listing:
        stale = [entry for entry in listing if entry.name not in entries]
    for entry in stale:
        _remove(Path(entry.path))
    for name, entry in entries.items():
        target = dest / name
        if entry.is_symlink():
            link = os.readlink(entry.path)
            if target.is_symlink() and os.readlink(target) == link:
                continue
            _remove(target)
            os.symlink(link, target)
        elif entry.is_dir(follow_symlinks=False):
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                _remove(target)
            sync_tree(Path(entry.path), target, synced=synced)
        elif _unchanged(entry.stat(follow_symlinks=False), target):
            continue
        else:
            _remove(target)
            shutil.copy2(entry.path, target, follow_symlinks=False)
    theirs, ours = os.lstat(src), os.lstat(dest)
    if (theirs.st_mode, theirs.st_mtime_ns) != (ours.st_mode, ours.st_mtime_ns):  # ~3,700 folders
        shutil.copystat(src, dest, follow_symlinks=False)
    if synced is not None:
        synced(os.fspath(src))  # after its subfolders': the sync is done with everything under src


def sync_and_remove_tree(src: Path, dest: Path) -> None:
    """sync_tree(src, dest), then src removed (a build's staging dir when no cache keeps it), the removal
    beside the sync: a thread empties and removes each folder of src as soon as the sync reports it done
    (subfolders before their parent). Removing a staging dir (~15,000 names, ~3,700 folders) took 0.6 s
    after the sync's 0.9 s, both mostly system calls, which run on the second core this way. Whatever the
    thread could not remove (the rest of a sync that failed) is removed at the end."""
    done: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    remover = threading.Thread(target=_remove_synced, args=(done,), name="staging removal", daemon=True)
    remover.start()
    try:
        sync_tree(src, dest, synced=done.put)
    finally:
        done.put(None)
        remover.join()
        shutil.rmtree(src, ignore_errors=True)


def _remove_synced(done: queue.SimpleQueue[str | None]) -> None:
    """Empty and remove each folder put on done until None; an error leaves the folder to the caller."""
    while (folder := done.get()) is not None:
        try:
            with os.scandir(folder) as listing:
                for entry in listing:
                    if not entry.is_dir(follow_symlinks=False):
                        os.unlink(entry.path)
            os.rmdir(folder)
        except OSError:
            continue


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _unchanged(theirs: os.stat_result, dest: Path) -> bool:
    """dest is a regular file of its own (one link, not src's inode) with src's size, mode and mtime."""
    try:
        ours = os.lstat(dest)
    except FileNotFoundError:
        return False
    return (
        stat.S_ISREG(ours.st_mode)
        and ours.st_nlink == 1
        and (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino)
        and (theirs.st_size, theirs.st_mode, theirs.st_mtime_ns)
        == (ours.st_size, ours.st_mode, ours.st_mtime_ns)
    )


COMPLETE_MARK = ".kci-reuse-complete"  # in a kept folder: written whole (keep_folder)


def is_kept(folder: Path) -> bool:
    """Whether folder is one keep_folder wrote whole."""
    return (folder / COMPLETE_MARK).is_file()


def keep_folder(stored: Path, fill: Callable[[Path], Any], keep: int) -> None:
    """Write the folder stored whole: fill writes into a staging folder beside it, which is then marked
    complete and renamed into place (a concurrent writer of the same name wins: its folder is the same);
    then only the `keep` most recently written complete folders beside it are kept. The reuse stores of
    the build's steps (external modules, kselftests) are such folders."""
    staging = stored.with_name(f"{stored.name}.tmp.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    fill(staging)
    (staging / COMPLETE_MARK).write_text("")
    shutil.rmtree(stored, ignore_errors=True)
    try:
        os.replace(staging, stored)
    except OSError:  # a concurrent build stored the same name first
        shutil.rmtree(staging, ignore_errors=True)
    done = [p for p in stored.parent.iterdir() if is_kept(p)]
    for old in sorted(done, key=lambda p: p.stat().st_mtime)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
