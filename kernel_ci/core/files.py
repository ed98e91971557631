"""Writing a small file so that no reader ever sees half of it: run.json, junit.xml, metadata.json, the
accelerator probe's cache. An interrupted write leaves the previous file (or none), never a torn one.

sync_tree: a folder made a copy of another, writing only the files that differ (a build's output dir);
sync_and_remove_tree: the same from a folder that is not kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
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
    wrote them all again, 1.5 s or more of every build; the quick check is two stats a file. synced, if
    given, is called with each folder of src once the sync is done with everything under it."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        dest.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    _sync_folder(os.fspath(src), os.fspath(dest), synced)


def _sync_folder(src: str, dest: str, synced: Callable[[str], object] | None) -> None:
    """One folder of sync_tree, dest existing. Strings and the listings' own entries, not pathlib: the
    types come from the listings (no stat), a file's quick check is one lstat on each side; pathlib's
    objects and the type checks' stats were half of a 15,000-name sync."""
    with os.scandir(src) as listing:
        entries = {entry.name: entry for entry in listing}
    with os.scandir(dest) as listing:
        present = {entry.name: entry for entry in listing}
    for name, stale in present.items():
        if name not in entries:
            _remove_entry(stale)
    for name, entry in entries.items():
        target = os.path.join(dest, name)
        here: os.DirEntry[str] | None = present.get(name)
        if entry.is_symlink():
            link = os.readlink(entry.path)
            if here is not None and here.is_symlink() and os.readlink(target) == link:
                continue
            if here is not None:
                _remove_entry(here)
            os.symlink(link, target)
        elif entry.is_dir(follow_symlinks=False):
            if here is not None and not here.is_dir(follow_symlinks=False):  # a file or a symlink there
                _remove_entry(here)
                here = None
            if here is None:
                os.mkdir(target)
            _sync_folder(entry.path, target, synced)
        else:
            if here is not None and _unchanged(entry.stat(follow_symlinks=False), here):
                continue
            if here is not None:
                _remove_entry(here)
            shutil.copy2(entry.path, target, follow_symlinks=False)
    theirs, ours = os.lstat(src), os.lstat(dest)
    if (theirs.st_mode, theirs.st_mtime_ns) != (ours.st_mode, ours.st_mtime_ns):  # ~3,700 folders
        shutil.copystat(src, dest, follow_symlinks=False)
    if synced is not None:
        synced(src)  # after its subfolders': the sync is done with everything under src


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


def _remove_entry(entry: os.DirEntry[str]) -> None:
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path)
    else:
        os.unlink(entry.path)


def _unchanged(theirs: os.stat_result, here: os.DirEntry[str]) -> bool:
    """dest's entry is a regular file of its own (one link, not src's inode) with src's size, mode and
    mtime."""
    if not here.is_file(follow_symlinks=False):
        return False
    ours = here.stat(follow_symlinks=False)
    return (
        ours.st_nlink == 1
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
    complete and renamed into place; then only the `keep` most recently written complete folders beside
    it are kept. The reuse stores of the build's steps (external modules, kselftests) and the saved
    guests (guest.warmstart) are such folders.

    A complete folder of the same name is never replaced: the first writer to finish wins, the others'
    folders are dropped. For the reuse stores both are the same; saved guests of the same machine are
    not (each boot has its own state), and another process may be restoring the first one already. The
    check and the rename hold a lock on the parent folder, so two writers cannot both find no folder and
    the second remove the first's."""
    staging = stored.with_name(f"{stored.name}.tmp.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    fill(staging)
    (staging / COMPLETE_MARK).write_text("")
    with _folder_lock(stored.parent):
        if is_kept(stored):
            shutil.rmtree(staging, ignore_errors=True)
        else:
            shutil.rmtree(stored, ignore_errors=True)  # an incomplete leftover, never read
            os.replace(staging, stored)
        done = [p for p in stored.parent.iterdir() if is_kept(p)]
        for old in sorted(done, key=lambda p: p.stat().st_mtime)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself (no lock file to leave behind), released on close."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
