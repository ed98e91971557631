"""The content-addressed build cache: one directory of build outputs per build key, published atomically.

Layout of a LocalStore root::

    entries/<key[:2]>/<key>/   the output files + manifest.json (input manifest) + entry.json (written last)
    tmp/<key>.<pid>.<random>/  entries being written; renamed into entries/ when complete
    aliases/<request_key>      a file holding the build key a request key resolved to
    locks/<key>.lock           flock(2) targets for per-key locks across processes

A reader never sees a half entry: an entry directory only appears by an atomic rename of a complete
directory, and ``get`` only returns directories holding ``entry.json``. A build's entry is fsynced
before that rename (one syncfs, then entry.json): losing it to a power cut would cost a rebuild of minutes.
An entry restored from the shared service is not (``put(durable=False)``): the syncfs flushes the whole
filesystem (every other process's dirty data too: 0.3 s to seconds on a busy builder) to protect bytes
that can be downloaded again, and durability is not what keeps an entry safe to use. Every use of an
entry checks it: ``copy_entry`` hashes each file against entry.json (or finds every name with the stats
it had when last verified), a push re-hashes each file; an entry a crash left torn (a file empty or
short, entry.json missing or cut) fails that check, is removed and is a miss. A killed process loses
nothing that was written (the page cache outlives it), so the rename is still all or nothing.

An entry holds regular files and directories only, plus the two symlinks of
``kernel_ci.build.layout.honest_links``, which
the store recreates itself (a symlink in an entry could make a later writer or reader step outside it).
``entry.json`` records the sha256, size and mode (0644 or 0755: no setuid/setgid bits) of every file;
copies out of an entry (``copy_entry``) are checked against it as they are written, and an entry of an
older format, without digests, is never returned (a miss: it is rebuilt and replaced).

Why hand-written file creation (``TreeWriter``) rather than shutil/tarfile: every path is opened one
component at a time relative to a directory descriptor with O_NOFOLLOW and files are created with O_EXCL,
so no symlink, existing file or ``..`` planted by an earlier step (or a concurrent process) can redirect a
write outside the tree being written; shutil follows symlinks in parent directories and tarfile's filters
resolve paths by name before writing.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, Protocol, TypedDict, runtime_checkable

from kernel_ci.build.layout import honest_links, make_honest_links
from kernel_ci.core import proc
from kernel_ci.core.console import console, warn
from kernel_ci.core.digest import sha256_file
from kernel_ci.core.errors import InfrastructureError
from kernel_ci.core.paths import cache_dir

ENTRY_FILE = "entry.json"
MANIFEST_FILE = "manifest.json"
DIGESTS_FILE = "entry-digests.json"  # the per-file digests as the shared cache carries them (remotestore)
RESERVED_NAMES = frozenset({ENTRY_FILE, MANIFEST_FILE, DIGESTS_FILE})
STALE_TMP_SECONDS = 3600.0
ENTRY_SCHEMA = 2  # 2: per-file sha256 digests, no stored symlinks; older entries are never trusted
SAFE_MODES = frozenset({0o644, 0o755})
CHUNK = 1024 * 1024
MAX_PATH = 4096
MAX_OPEN_DIRS = 512  # directory descriptors one TreeWriter keeps (see TreeWriter)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,199}")


class CacheStoreError(InfrastructureError):
    """The store could not do what was asked; the message says what and what to do about it."""


class UnsafeEntryError(CacheStoreError):
    """An entry (local or downloaded) holds something the store refuses: a link, a device, an escaping
    name, a file whose bytes do not match its recorded digest."""


class FileRecord(TypedDict):
    sha256: str
    size: int
    mode: int


def check_rel_path(rel: object, what: str = "path") -> tuple[str, ...]:
    """The components of a relative POSIX path of plain names (no '', '.', '..', absolute path or NUL)."""
    if not isinstance(rel, str) or not 0 < len(rel) <= MAX_PATH or "\0" in rel or rel.startswith("/"):
        raise UnsafeEntryError(f"unsafe {what} {rel!r}: expected a relative path")
    parts = tuple(rel.split("/"))
    # membership and max() loop in C: a restore checks ~30,000 paths
    if "" in parts or "." in parts or ".." in parts or max(map(len, parts)) > 255:
        raise UnsafeEntryError(f"unsafe {what} {rel!r}: empty, '.' or '..' component")
    return parts


def safe_mode(mode: int) -> int:
    """0755 for a file someone may execute, else 0644: nothing setuid/setgid/sticky or world-writable."""
    return 0o755 if mode & 0o111 else 0o644


_HEX_DIGITS = "0123456789abcdef"


def check_record(rel: str, record: object) -> FileRecord:
    """A FileRecord read from a document someone else wrote (entry.json, a downloaded digest list).

    Exact type checks and str.strip instead of isinstance and a regex per field: a restore checks ~11,600
    records (json gives exactly dict, str and int; a bool is not a size)."""
    check_rel_path(rel)
    if type(record) is not dict:
        raise UnsafeEntryError(f"bad file record for {rel!r}: {record!r} (sha256, size, mode 0644/0755)")
    digest, size, mode = record.get("sha256"), record.get("size"), record.get("mode")
    if (
        type(digest) is not str
        or len(digest) != 64
        or digest.strip(_HEX_DIGITS)
        or type(size) is not int
        or size < 0
        or mode not in SAFE_MODES
        or type(mode) is not int
    ):
        raise UnsafeEntryError(f"bad file record for {rel!r}: {record!r} (sha256, size, mode 0644/0755)")
    return {"sha256": digest, "size": size, "mode": mode}


def read_entry_info(entry: Path) -> dict | None:
    """entry.json of an entry of the current format with valid file records, or None."""
    try:
        info = json.loads((entry / ENTRY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(info, dict)
        or info.get("schema") != ENTRY_SCHEMA
        or not isinstance(info.get("files"), dict)
    ):
        return None
    return info


class WrittenTree:
    """What a restore wrote into its own private staging directory, as it wrote it: every directory a
    TreeWriter made or opened there, and every file it created (O_CREAT|O_EXCL, with its record's mode)
    and wrote in full from bytes that matched its record before any of them was written.
    ``LocalStore.put(written=...)`` publishes from it instead of scanning the directory again."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.dirs: set[str] = set()

    def file(self, rel: str) -> None:
        """rel was written and verified (set.add: safe from the writer threads)."""
        self.files.add(rel)


class TreeWriter:
    """Creates directories and files below root without ever following a symlink or replacing a file
    (with create=False: opens existing ones for reading, the same way). written: where the directories
    it makes or opens are recorded (a restore's WrittenTree).

    It keeps the descriptors of the directories it opened, at most MAX_OPEN_DIRS of them: past that, the
    next directory not kept closes all but root's (kbuild/ has 3,700 directories, a restore several
    writers, and a user's hard limit on open files may be 4096). A descriptor it returned is valid
    until the next call of directory() on the same writer."""

    def __init__(self, root: Path, *, create: bool = True, written: WrittenTree | None = None) -> None:
        self.root = root
        self.create_dirs = create
        self.written = written
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        self._fds: dict[tuple[str, ...], int] = {(): os.open(root, flags)}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> TreeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def directory(self, parts: tuple[str, ...]) -> int:
        """A descriptor of root/parts, created (0755) where missing; a symlink on the way is an error."""
        fd = self._fds.get(parts)
        if fd is not None:
            return fd
        if len(self._fds) > MAX_OPEN_DIRS:  # before opening any: no descriptor of this call is closed
            for kept, open_fd in list(self._fds.items()):
                if kept:
                    os.close(open_fd)
                    del self._fds[kept]
        return self._open(parts)

    def _open(self, parts: tuple[str, ...]) -> int:
        fd = self._fds.get(parts)
        if fd is not None:
            return fd
        if not parts:
            raise CacheStoreError(f"TreeWriter of {self.root} used after close")
        parent = self._open(parts[:-1])
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        made = False
        try:
            if self.create_dirs:
                # mkdir first: a writer mostly makes new trees (a restore: 3,700 directories), where trying
                # to open first cost a failed lookup each; mkdirat never follows a symlink (EEXIST), the
                # open below refuses one
                with contextlib.suppress(FileExistsError):
                    os.mkdir(parts[-1], 0o755, dir_fd=parent)
                    made = True
            fd = os.open(parts[-1], flags, dir_fd=parent)
        except OSError as exc:  # ELOOP: a symlink; ENOTDIR: a file; ENOENT: missing (reading)
            raise UnsafeEntryError(f"{'/'.join(parts)} is not a plain directory ({exc.strerror})") from exc
        self._fds[parts] = fd
        if made and _UMASK & 0o755:
            os.fchmod(fd, 0o755)  # the umask took bits away (scan_tree would have put them back)
        if self.written is not None:
            self.written.dirs.add("/".join(parts))
        return fd

    def create_fd(self, parts: tuple[str, ...], mode: int) -> int:
        """A new file root/parts open for writing (raw descriptor); a second file of that name is an error."""
        return create_file_at(self.directory(parts[:-1]), parts[-1], mode, "/".join(parts))

    def create(self, parts: tuple[str, ...], mode: int) -> BinaryIO:
        """create_fd as a file object."""
        return os.fdopen(self.create_fd(parts, mode), "wb")

    def open_fd(self, parts: tuple[str, ...]) -> int:
        """An existing regular file root/parts open for reading; a symlink anywhere on the way is an error."""
        try:
            return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.directory(parts[:-1]))
        except OSError as exc:  # missing, or a symlink planted in the tree
            raise UnsafeEntryError(f"{'/'.join(parts)}: {exc.strerror}") from exc


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def create_file_at(parent: int, name: str, mode: int, rel: str) -> int:
    """A new file name in the directory parent (a descriptor), open for writing; never through a symlink
    (O_NOFOLLOW) nor over an existing name (O_EXCL: "appears twice"). Safe to call from several threads."""
    try:
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            safe_mode(mode),
            dir_fd=parent,
        )
    except FileExistsError as exc:
        raise UnsafeEntryError(f"{rel} appears twice") from exc
    if _UMASK & safe_mode(mode):
        os.fchmod(fd, safe_mode(mode))  # the umask took bits away
    return fd


def _copy_fd_verified(source: int, out: int, record: FileRecord, rel: str) -> None:
    """Copy the descriptor source to the descriptor out hashing what is written; raises if it is not exactly
    the recorded bytes (copy_entry's loop over ~11,000 files: raw descriptors, no file objects)."""
    size = record["size"]
    digest = hashlib.sha256()
    count = 0
    while chunk := os.read(source, min(CHUNK, size - count + 1)):
        count += len(chunk)
        if count > size:
            break
        digest.update(chunk)
        write_all(out, chunk)
    if count != size or digest.hexdigest() != record["sha256"]:
        raise UnsafeEntryError(
            f"{rel}: its bytes do not match the recorded digest "
            f"({size} bytes, sha256 {record['sha256'][:12]})"
        )


def write_all(fd: int, data: bytes | memoryview) -> None:
    """All of data to the descriptor fd (os.write may write less than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def scan_tree(
    root: Path, dropped: dict[str, str] | None = None, hashed: Mapping[str, FileRecord] | None = None
) -> tuple[dict[str, FileRecord], list[str]]:
    """The file records and directories of an output tree; refuses anything but files, directories and
    the honest links (which are dropped here, into dropped: the store recreates them).

    hashed: records of files the caller wrote itself from bytes it had checked against them (a restore
    from the service): such a file, if it still has its recorded size, keeps its record's
    digest instead of being read and hashed a second time."""
    honest = honest_links(root)
    dropped = {} if dropped is None else dropped
    files: dict[str, FileRecord] = {}
    dirs: list[str] = []
    # os.scandir and str paths, not os.walk and pathlib: a restore scans ~15,000 names, and pathlib's
    # parsing of each was most of this function's time (0.4 s); one lstat per name, as before
    pending = [("", os.fspath(root))]
    while pending:
        rel_dir, folder = pending.pop()
        with os.scandir(folder) as listing:
            found = list(listing)  # unsorted: the records and directories are sorted once, at the end
        for entry in found:
            rel = rel_dir + entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                if rel not in honest:
                    raise UnsafeEntryError(
                        f"{rel} is a symlink (to {os.readlink(entry.path)}): an entry holds only files and "
                        "directories (and the modules' build/source links, which the store makes itself)"
                    )
                dropped[rel] = os.readlink(entry.path)
                os.unlink(entry.path)
            elif stat.S_ISDIR(st.st_mode):
                if stat.S_IMODE(st.st_mode) != 0o755:
                    os.chmod(entry.path, 0o755)
                dirs.append(rel)
                pending.append((rel + "/", entry.path))
            elif stat.S_ISREG(st.st_mode):
                mode = safe_mode(st.st_mode)
                if stat.S_IMODE(st.st_mode) != mode:
                    os.chmod(entry.path, mode)
                known = hashed.get(rel) if hashed is not None else None
                if known and known["size"] == st.st_size:
                    digest = known["sha256"]
                else:
                    digest = sha256_file(Path(entry.path))
                files[rel] = FileRecord(sha256=digest, size=st.st_size, mode=mode)
            else:
                raise UnsafeEntryError(
                    f"{rel} is not a regular file or directory ({stat.filemode(st.st_mode)})"
                )
    return dict(sorted(files.items())), sorted(dirs)


def _written_records(
    written: WrittenTree, expected: Mapping[str, FileRecord]
) -> tuple[dict[str, FileRecord], list[str]]:
    """The file records and directories of a tree its writer recorded (see LocalStore.put): each file
    written is listed (the writer refused any other), and each listed one must have been written, else
    the entry would promise a file it lacks (a digest list naming a file no output brings)."""
    if written.files != expected.keys():
        found = {rel: expected.get(rel, FileRecord(sha256="", size=-1, mode=0)) for rel in written.files}
        compare_records(found, expected, "the restored tree")
    files = {rel: FileRecord(**expected[rel]) for rel in sorted(expected)}
    return files, sorted(written.dirs)


def compare_records(found: Mapping[str, FileRecord], expected: Mapping[str, FileRecord], where: str) -> None:
    """Raise naming the first differences when found is not exactly expected."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    differ = sorted(rel for rel in set(found) & set(expected) if found[rel] != expected[rel])
    if missing or extra or differ:
        raise UnsafeEntryError(
            f"{where} does not match its per-file digests: missing {missing[:3]}, unlisted {extra[:3]}, "
            f"different {differ[:3]}"
        )


def copy_entry(entry: Path, dest: Path) -> None:
    """Copy a published entry to dest (replaced atomically), verifying every file against entry.json.

    A copy, never hard links: editing dest must not change the cache. Each file is read once, hashed and
    written; a file that does not match its digest aborts the copy (dest keeps its previous content) and
    the damaged entry is removed from the store, so the next run rebuilds it.
    """
    dest = Path(dest)
    stamp = _restore_stamp_path(entry, dest)
    if _holds_restore(stamp, entry, dest):
        return  # dest is the untouched result of restoring this very entry (whose entry.json was valid)
    info = read_entry_info(entry)
    if info is None:
        raise CacheStoreError(
            f"{entry} is not a build cache entry of the current format (no valid {ENTRY_FILE})"
        )
    if _update_restore(stamp, entry, info, dest):
        return  # dest was the untouched restore of another entry: only what differs was written
    with contextlib.suppress(FileNotFoundError):
        stamp.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.restore.{os.getpid()}.{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        with TreeWriter(tmp) as writer:
            for rel in info.get("dirs", []):
                writer.directory(check_rel_path(rel))
            with TreeWriter(entry, create=False) as reader:
                for rel, raw in info["files"].items():
                    parts = check_rel_path(rel)
                    _copy_one(reader, writer, parts, parts, check_record(rel, raw), rel)
        make_honest_links(tmp)
        for name in (ENTRY_FILE, MANIFEST_FILE):
            if (entry / name).is_file():
                shutil.copyfile(entry / name, tmp / name)
        if dest.is_symlink() or dest.is_file():
            dest.unlink()
        elif dest.exists():
            aside = dest.parent / f".{dest.name}.old.{os.getpid()}.{secrets.token_hex(4)}"
            os.rename(dest, aside)
            shutil.rmtree(aside, ignore_errors=True)
        files = _tree_stats(tmp)  # after every write and utime: what an untouched restore looks like
        os.rename(tmp, dest)
        _write_restore_stamp(stamp, entry, dest, files)
    except UnsafeEntryError as exc:
        _remove(tmp)
        raise _damaged(entry, exc) from exc
    except OSError as exc:
        _remove(tmp)
        raise CacheStoreError(f"could not copy build cache entry {entry} to {dest}: {exc}") from exc
    except BaseException:
        _remove(tmp)
        raise


# -- skipping a restore that is already in place ------------------------------------------------------
# A local hit restores the entry into out/ as a verified copy (~15,000 files). When out/ still is the
# untouched result of restoring the same entry, that copy would write the same bytes again: the stamp
# records the inode, size, mode, mtime and ctime of every name copy_entry left in dest. ctime cannot be
# set back by any tool (an edit, chmod, utime, or a file renamed over another all change it or the
# inode), so equal stats for every name, and no other name, mean dest holds exactly what was verified.
# The entry's own files are compared the same way, so that a damaged entry is still found and removed.
# The stamp lives in the entry's store (restored/), never in out/, whose contents are the entry's alone.
# It holds a sha256 of each tree's sorted stats, not the stats: a hit reads a few hundred bytes instead
# of decoding 30,000 records (75 ms), and which name differs does not matter (any difference copies).


def _restore_stamp_path(entry: Path, dest: Path) -> Path:
    root = entry.parent.parent.parent  # <root>/entries/<key[:2]>/<key>
    where = hashlib.sha256(str(dest.absolute()).encode()).hexdigest()
    return root / "restored" / f"{where}.json"


# find(1)'s -printf of the names _tree_stats compares: relative name, inode, size, type and mode, mtime and
# ctime to the nanosecond; each field list ends in NUL (a name may hold a newline, never a NUL).
FIND_STATS = r"%P\0%i %s %y%m %T@ %C@\0"


def _tree_stats(root: Path) -> str:
    return _trees_stats(root)[0]


def _trees_stats(*roots: Path) -> list[str]:
    """For each root, the sha256 of the lstat (inode, size, mode, mtime, ctime) of every file and symlink
    under it (not directories), by relative name, sorted; "" for a tree without any.

    One `find` per root, all at once: a build-cache hit compares two trees of ~11,600 names, and the lstat
    calls are most of its time (~8 us each in a VM, 0.2 s for both trees walked in Python); a process per
    tree puts them on two cores (threads in Python did not: the walk holds the GIL between calls). An
    error (a name vanishing mid-walk, no permission) is an OSError: the caller treats the tree as changed."""
    if len(roots) == 1:
        return [_find_stats(roots[0])]
    with ThreadPoolExecutor(len(roots)) as pool:
        return list(pool.map(_find_stats, roots))


def _find_stats(root: Path) -> str:
    argv = ["find", os.fspath(root), "-mindepth", "1", "!", "-type", "d", "-printf", FIND_STATS]
    try:
        fields = proc.capture(argv).split("\0")
    except proc.CommandError as exc:
        raise OSError(f"could not list {root}: {exc}") from exc
    found = sorted(f"{name}\0{stats}" for name, stats in zip(fields[0::2], fields[1::2], strict=False))
    if not found:
        return ""
    return hashlib.sha256("\n".join(found).encode(errors="surrogateescape")).hexdigest()


def _entry_id(entry: Path) -> str:
    return hashlib.sha256((entry / ENTRY_FILE).read_bytes()).hexdigest()


def _write_restore_stamp(stamp: Path, entry: Path, dest: Path, files: str) -> None:
    with contextlib.suppress(OSError):  # only an optimisation: without a stamp the next hit copies
        stamp.parent.mkdir(exist_ok=True)
        tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.{secrets.token_hex(4)}")
        doc = {
            "entry": _entry_id(entry),
            "entry_dir": os.fspath(entry.absolute()),
            "dest_ino": os.stat(dest).st_ino,
            "files_stats": files,
            "entry_files_stats": _tree_stats(entry),
        }
        tmp.write_text(json.dumps(doc))
        os.rename(tmp, stamp)


def _holds_restore(stamp: Path, entry: Path, dest: Path) -> bool:
    try:
        doc = json.loads(stamp.read_text())
        if doc["entry"] != _entry_id(entry) or doc["dest_ino"] != os.stat(dest).st_ino:
            return False
        recorded, source = doc["files_stats"], doc["entry_files_stats"]
        # the entry too: one damaged since (bit rot aside) must still fail the restore and be removed
        return bool(recorded) and _trees_stats(dest, entry) == [recorded, source]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _update_restore(stamp: Path, entry: Path, info: dict, dest: Path) -> bool:
    """Turn dest, the untouched restore of an older entry (its stamp says which), into a restore of entry by
    writing only the files whose records differ and removing the ones entry lacks; False (nothing done)
    when that cannot be known: no stamp, dest touched since, the older entry gone or of other links.

    An incremental build's entry differs from the last one in a handful of files (bzImage, System.map,
    vmlinux.xz, metadata.json) of ~11,600: the full copy wrote 73 MB in 1-2 s. The files kept were
    verified when written, and equal stats mean they were not touched since (see the stamp); the changed
    ones are verified copies like copy_entry's. Each is written to a temporary name, then all are renamed
    into place at once: interrupted before that, dest is still the older restore (its stray temporary
    files fail the next stamp check); during the renames, dest mixes the two, and holds no stamp: the next
    restore copies it whole.
    """
    try:
        doc = json.loads(stamp.read_text())
        older, here = Path(doc["entry_dir"]), entry.absolute()
        if older == here or older.parent.parent.parent != here.parent.parent.parent:  # this store's only
            return False
        if doc["dest_ino"] != os.stat(dest).st_ino:
            return False
        old_info = read_entry_info(older)
        if old_info is None or _entry_id(older) != doc["entry"]:
            return False
        if old_info.get("links") != info.get("links") or _tree_stats(dest) != doc["files_stats"]:
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    old_files: dict = old_info["files"]
    new_files: dict = info["files"]
    old_dirs, new_dirs = set(old_info.get("dirs", [])), set(info.get("dirs", []))
    if old_dirs & set(new_files) or new_dirs & set(old_files):
        return False  # a file became a folder or the other way round: the full copy handles it
    changed = [rel for rel, record in new_files.items() if old_files.get(rel) != record]
    staged: list[tuple[tuple[str, ...], str]] = []
    added = sorted(new_dirs - old_dirs)
    try:
        with TreeWriter(dest) as writer, TreeWriter(entry, create=False) as reader:
            for rel in added:
                writer.directory(check_rel_path(rel))
            for rel in changed:
                parts = check_rel_path(rel)
                temporary = (*parts[:-1], f".{parts[-1]}.kci-restore.{secrets.token_hex(4)}")
                staged.append((parts, temporary[-1]))
                _copy_one(reader, writer, parts, temporary, check_record(rel, new_files[rel]), rel)
            stamp.unlink()  # from here until the new stamp, dest is not known to be any entry's restore
            _swap_in(writer, staged, [check_rel_path(rel) for rel in old_files if rel not in new_files])
        for rel in sorted(old_dirs - new_dirs, reverse=True):
            os.rmdir(dest / rel)  # deepest first; empty now, as in the older entry without its files
        for name in (ENTRY_FILE, MANIFEST_FILE):
            if (entry / name).is_file():
                _replace_file(entry / name, dest / name)
    except UnsafeEntryError as exc:
        _remove_staged(dest, staged, added)
        raise _damaged(entry, exc) from exc
    except OSError:
        _remove_staged(dest, staged, added)
        return False  # without a stamp for dest: the full copy replaces it
    _write_restore_stamp(stamp, entry, dest, _tree_stats(dest))
    return True


def _swap_in(
    writer: TreeWriter, staged: list[tuple[tuple[str, ...], str]], gone: list[tuple[str, ...]]
) -> None:
    """The staged files renamed over their names, then the files the new entry lacks removed."""
    for parts, temporary in staged:
        folder = writer.directory(parts[:-1])
        os.rename(temporary, parts[-1], src_dir_fd=folder, dst_dir_fd=folder)
    for parts in gone:
        os.unlink(parts[-1], dir_fd=writer.directory(parts[:-1]))


def _copy_one(
    reader: TreeWriter,
    writer: TreeWriter,
    parts: tuple[str, ...],
    to: tuple[str, ...],
    record: FileRecord,
    rel: str,
) -> None:
    """The entry's file parts verified into the tree being written, at to, with the entry file's mtime."""
    source = reader.open_fd(parts)
    try:
        out = writer.create_fd(to, record["mode"])
        try:
            _copy_fd_verified(source, out, record, rel)
            st = os.fstat(source)
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))  # kbuild compares mtimes
        finally:
            os.close(out)
    finally:
        os.close(source)


def _remove_staged(dest: Path, staged: list[tuple[tuple[str, ...], str]], added: list[str]) -> None:
    """Undo an update that failed before its renames: its temporary files, then the folders it made."""
    for parts, temporary in staged:
        with contextlib.suppress(OSError):
            (dest.joinpath(*parts[:-1]) / temporary).unlink()
    for rel in reversed(added):
        with contextlib.suppress(OSError):
            os.rmdir(dest / rel)


def _replace_file(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _put_back_links(tmp: Path, dropped: Mapping[str, str]) -> None:
    """Undo make_honest_links in a failed put's tmp dir before its files move back to the outputs."""
    for rel in honest_links(tmp):
        with contextlib.suppress(OSError):
            (tmp / rel).unlink()
    for rel, target in dropped.items():
        with contextlib.suppress(OSError):
            os.symlink(target, tmp / rel)


def _damaged(entry: Path, exc: UnsafeEntryError) -> CacheStoreError:
    """A restore found entry damaged: it is removed from the store (the next run rebuilds it), and the
    error that says so, for the caller to raise."""
    _discard_entry(entry)
    return CacheStoreError(
        f"build cache entry {entry} is damaged ({exc}); it was removed from the cache: rerun to rebuild it"
    )


def _discard_entry(entry: Path) -> None:
    """Move a damaged entry out of entries/ (atomically: no reader sees it half-deleted), then delete it."""
    tmp_dir = entry.parent.parent.parent / "tmp"  # <root>/entries/<shard>/<key> -> <root>/tmp
    aside = (tmp_dir if tmp_dir.is_dir() else entry.parent) / f"{entry.name}.damaged.{secrets.token_hex(4)}"
    with contextlib.suppress(OSError):
        os.rename(entry, aside)
        _remove(aside)


@runtime_checkable
class BuildStore(Protocol):
    """What the pipeline needs from a build cache (local directory today, a remote service later)."""

    def get(self, key: str) -> Path | None:
        """The local directory holding the entry's files, or None when the key is not cached."""
        ...

    def put(self, key: str, outputs: Path, manifest: Mapping[str, str], *, move: bool = False) -> Path:
        """Publish the files of the outputs directory under key, atomically; returns the entry directory.

        With move=True the outputs directory may be consumed (moved instead of copied).
        """
        ...

    def manifests(self) -> Iterator[tuple[str, dict[str, str]]]:
        """(key, input manifest) of every entry, newest first."""
        ...

    def get_alias(self, request_key: str) -> str | None:
        """The build key a request key was last resolved to, or None."""
        ...

    def put_alias(self, request_key: str, key: str) -> None:
        """Remember that request_key resolves to the build key key."""
        ...

    def lock(self, key: str) -> AbstractContextManager[None]:
        """An exclusive lock on key, across processes (not re-entrant)."""
        ...


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise CacheStoreError(
            f"invalid {what} {value!r}: expected 2-200 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (a sha256 hex digest is typical)"
        )
    return value


def _check_manifest(manifest: Mapping[str, str]) -> dict[str, str]:
    bad = [(k, v) for k, v in manifest.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise CacheStoreError(f"the input manifest must map str to str; offending entries: {bad[:5]!r}")
    return dict(manifest)


def _copy_file(source: str, destination: str) -> object:
    """How put copies each output file (a module-level name so a test can make it fail mid-way)."""
    return shutil.copy2(source, destination)


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def _fsync_tree(root: Path) -> None:
    """Everything under root on stable storage: one syncfs(2) of its filesystem (an entry has thousands of
    files; fsync of each costs seconds), falling back to fsync of each file and directory."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) == 0:
            return
    finally:
        os.close(fd)
    for current, _dirs, files in os.walk(root):
        for name in files:
            path = Path(current, name)
            if not path.is_symlink():
                _fsync_path(path)
        _fsync_path(Path(current), directory=True)


def _write_json_synced(path: Path, document: object, durable: bool = True) -> None:
    # one line, not indent=2: json's C encoder runs only without indent, and entry.json lists every file
    # (~11,000 records: 0.2 s of each restore in the pure-Python encoder)
    text = json.dumps(document, sort_keys=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.write("\n")
        if durable:
            handle.flush()
            os.fsync(handle.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flock_is_held(path: Path) -> bool:
    """Whether some live process holds an flock on path (a writer holds one on its tmp dir)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class LocalStore:
    """A BuildStore in a local directory (default: the per-user cache, ``builds``)."""

    def __init__(self, root: Path | None = None, *, clean: bool = True) -> None:
        self.root = Path(root) if root is not None else cache_dir("builds")
        self.entries_dir = self.root / "entries"
        self.tmp_dir = self.root / "tmp"
        self.aliases_dir = self.root / "aliases"
        self.locks_dir = self.root / "locks"
        try:
            for directory in (self.entries_dir, self.tmp_dir, self.aliases_dir, self.locks_dir):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheStoreError(
                f"cannot create the build cache at {self.root}: {exc}; "
                "set KERNEL_CI_CACHE to a writable directory"
            ) from exc
        if clean:
            self.clean_stale_tmp()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- entries ---------------------------------------------------------------------------------

    def entry_dir(self, key: str) -> Path:
        """Where the entry for key lives (whether or not it exists)."""
        _check_name(key, "build key")
        return self.entries_dir / key[:2] / key

    def get(self, key: str) -> Path | None:
        path = self.entry_dir(key)
        if not (path / ENTRY_FILE).is_file():
            return None
        if read_entry_info(path) is None:  # an older format (no per-file digests) is not trusted: a miss
            return None
        return path

    def put(
        self,
        key: str,
        outputs: Path,
        manifest: Mapping[str, str],
        *,
        move: bool = False,
        expected: Mapping[str, FileRecord] | None = None,
        verified: bool = False,
        durable: bool = True,
        written: WrittenTree | None = None,
    ) -> Path:
        """Publish outputs (a directory) as the entry for key; returns the entry directory.

        The files are copied (``move=True``: moved, when on the same filesystem, and the outputs
        directory is consumed) into a private tmp directory, fsynced, completed with manifest.json and
        entry.json and renamed into place. If the entry already exists (another writer won), ours is
        discarded and the existing one returned. On any error nothing is published; with ``move=True``
        the moved files are put back into outputs.

        Only files and directories are stored (see scan_tree); with ``expected`` (per-file records a
        download came with), the files must be exactly those, else nothing is published. ``verified``: the
        caller wrote every file of outputs itself, into a private directory, from bytes it checked against
        ``expected`` as they were written (RemoteStore.restore): names, sizes and modes are checked here,
        the bytes are not hashed a second time (whoever could change them in between owns the store too).

        ``durable=False`` (a restore from the service): no syncfs or fsync (the module docstring says why).

        ``written`` (with ``verified`` and ``expected``, outputs moved within the filesystem): the restore's
        own record of every directory it made and every file it created (O_EXCL, listed mode) and wrote
        from checked bytes, in its private staging directory; the records and directories are taken from
        it instead of a scan of ~15,000 names (0.2 s). The scan's checks hold by construction (a writer
        makes nothing but listed files and directories, a file's size is that of its checked bytes, its
        mode the listed one, directories 0755) except one: that every listed file was written, which is
        checked here (written must name exactly the listed files).
        """
        final = self.entry_dir(key)
        outputs = Path(outputs)
        if not outputs.is_dir():
            raise CacheStoreError(f"cannot cache build {key[:12]}: outputs {outputs} is not a directory")
        clashes = sorted(name for name in RESERVED_NAMES if os.path.lexists(outputs / name))
        if clashes:
            raise CacheStoreError(
                f"cannot cache build {key[:12]}: {outputs} contains {', '.join(clashes)}, a name the store "
                "uses for its own metadata; rename that output file"
            )
        inputs = _check_manifest(manifest)

        existing = self.get(key)
        if existing is not None:
            if move:
                shutil.rmtree(outputs)
            return existing

        tmp = self.tmp_dir / f"{key}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.mkdir()
        guard = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        moved: list[str] = []
        dropped: dict[str, str] = {}  # the links of outputs that scan_tree replaced (put back on failure)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if move and os.stat(outputs).st_dev == os.stat(tmp).st_dev:
                for child in sorted(outputs.iterdir()):
                    os.rename(child, tmp / child.name)
                    moved.append(child.name)
            else:
                shutil.copytree(outputs, tmp, symlinks=True, dirs_exist_ok=True, copy_function=_copy_file)
            if written is not None and verified and expected is not None and moved:
                files, dirs = _written_records(written, expected)  # exactly expected's records, or raises
            else:
                files, dirs = scan_tree(tmp, dropped, expected if verified else None)
                if expected is not None:
                    compare_records(files, expected, f"build {key[:12]}")
            links = make_honest_links(tmp)
            if durable:
                _fsync_tree(tmp)
            _write_json_synced(tmp / MANIFEST_FILE, inputs, durable)
            created = time.time()
            _write_json_synced(
                tmp / ENTRY_FILE,
                {
                    "schema": ENTRY_SCHEMA,
                    "key": key,
                    "created": created,
                    "created_utc": datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat(),
                    "file_count": len(files),
                    "total_bytes": sum(record["size"] for record in files.values()),
                    "files": files,
                    "dirs": dirs,
                    "links": links,
                },
                durable,
            )
            if durable:
                _fsync_path(tmp, directory=True)
            published = self._publish(tmp, final, durable)
        except BaseException as exc:
            if moved:
                _put_back_links(tmp, dropped)
            for name in moved:
                with contextlib.suppress(OSError):
                    os.rename(tmp / name, outputs / name)
            _remove(tmp)
            if isinstance(exc, Exception) and not isinstance(exc, CacheStoreError):
                raise CacheStoreError(
                    f"could not store build {key[:12]} from {outputs} in {self.root}: {exc} "
                    "(nothing was published; check free space and permissions, then rerun)"
                ) from exc
            raise
        finally:
            os.close(guard)
        if move:
            shutil.rmtree(outputs, ignore_errors=True)
        return published

    def _publish(self, tmp: Path, final: Path, durable: bool = True) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        for _attempt in range(2):
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                if read_entry_info(final) is not None:
                    _remove(tmp)  # a concurrent writer published first: keep theirs
                    return final
                # a damaged entry (no entry.json) or one of an older format: move it aside and try again
                aside = self.tmp_dir / f"{final.name}.damaged.{os.getpid()}.{secrets.token_hex(4)}"
                warn(f"build cache entry {final} is incomplete or of an older format; replacing it")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(final, aside)
                _remove(aside)
                continue
            if durable:
                _fsync_path(final.parent, directory=True)
            return final
        raise CacheStoreError(f"could not publish build cache entry {final}: it keeps reappearing damaged")

    def manifests(self) -> Iterator[tuple[str, dict[str, str]]]:
        found: list[tuple[float, str, Path]] = []
        for shard in sorted(self.entries_dir.iterdir()):
            if not shard.is_dir():
                continue
            for entry in sorted(shard.iterdir()):
                try:
                    info = json.loads((entry / ENTRY_FILE).read_text(encoding="utf-8"))
                    found.append((float(info["created"]), entry.name, entry))
                except FileNotFoundError:
                    continue
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    warn(f"skipping unreadable build cache entry {entry}: {exc}")
        found.sort(key=lambda item: (-item[0], item[1]))
        for _created, key, entry in found:
            try:
                manifest = json.loads((entry / MANIFEST_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                warn(f"skipping build cache entry {entry} with an unreadable {MANIFEST_FILE}: {exc}")
                continue
            yield key, {str(k): str(v) for k, v in manifest.items()}

    # -- aliases ---------------------------------------------------------------------------------

    def get_alias(self, request_key: str) -> str | None:
        path = self.aliases_dir / _check_name(request_key, "request key")
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if not _NAME_RE.fullmatch(text):
            warn(f"ignoring build cache alias {path}: it does not hold a build key")
            return None
        return text

    def put_alias(self, request_key: str, key: str) -> None:
        path = self.aliases_dir / _check_name(request_key, "request key")
        _check_name(key, "build key")
        tmp = self.tmp_dir / f"alias-{request_key}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            _write_text_synced(tmp, key + "\n")
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    # -- locking and housekeeping ----------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        path = self.locks_dir / f"{_check_name(key, 'lock name')}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                console.log(f"waiting for another kernel-ci process that holds {key[:12]} (lock {path})")
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def clean_stale_tmp(self, max_age: float = STALE_TMP_SECONDS) -> list[Path]:
        """Remove leftovers of killed writers from tmp/; returns what was removed.

        A leftover is removed when no live process holds its flock and either the pid in its name
        (``<key>.<pid>.<random>``) is dead or it is older than max_age seconds.
        """
        removed: list[Path] = []
        now = time.time()
        for path in sorted(self.tmp_dir.iterdir()):
            if _flock_is_held(path):
                continue
            parts = path.name.rsplit(".", 2)
            pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
            try:
                age = now - path.lstat().st_mtime
            except FileNotFoundError:
                continue
            if (pid is not None and not _pid_alive(pid)) or age > max_age:
                _remove(path)
                removed.append(path)
        return removed


def _write_text_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
