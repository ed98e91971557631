"""The content-addressed build cache: one directory of build outputs per build key, published atomically.

Layout of a LocalStore root::

    entries/<key[:2]>/<key>/   the output files + manifest.json (input manifest) + entry.json (written last)
    tmp/<key>.<pid>.<random>/  entries being written; renamed into entries/ when complete
    aliases/<request_key>      a file holding the build key a request key resolved to
    locks/<key>.lock           flock(2) targets for per-key locks across processes

A reader never sees a half entry: an entry directory only appears by an atomic rename of a complete,
fsynced directory, and ``get`` only returns directories holding ``entry.json``.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

from kernel_ci.core.console import console, warn
from kernel_ci.core.errors import InfrastructureError
from kernel_ci.core.paths import cache_dir

ENTRY_FILE = "entry.json"
MANIFEST_FILE = "manifest.json"
RESERVED_NAMES = frozenset({ENTRY_FILE, MANIFEST_FILE})
STALE_TMP_SECONDS = 3600.0
ENTRY_SCHEMA = 1

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,199}")


class CacheStoreError(InfrastructureError):
    """The store could not do what was asked; the message says what and what to do about it."""


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


def _write_json_synced(path: Path, document: object) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _file_sizes(root: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for current, _dirs, files in os.walk(root):
        for name in files:
            path = Path(current, name)
            sizes[path.relative_to(root).as_posix()] = path.lstat().st_size
    return dict(sorted(sizes.items()))


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
        return path if (path / ENTRY_FILE).is_file() else None

    def put(self, key: str, outputs: Path, manifest: Mapping[str, str], *, move: bool = False) -> Path:
        """Publish outputs (a directory) as the entry for key; returns the entry directory.

        The files are copied (``move=True``: moved, when on the same filesystem, and the outputs
        directory is consumed) into a private tmp directory, fsynced, completed with manifest.json and
        entry.json and renamed into place. If the entry already exists (another writer won), ours is
        discarded and the existing one returned. On any error nothing is published; with ``move=True``
        the moved files are put back into outputs.
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
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if move and os.stat(outputs).st_dev == os.stat(tmp).st_dev:
                for child in sorted(outputs.iterdir()):
                    os.rename(child, tmp / child.name)
                    moved.append(child.name)
            else:
                shutil.copytree(outputs, tmp, symlinks=True, dirs_exist_ok=True, copy_function=_copy_file)
            sizes = _file_sizes(tmp)
            _fsync_tree(tmp)
            _write_json_synced(tmp / MANIFEST_FILE, inputs)
            created = time.time()
            _write_json_synced(
                tmp / ENTRY_FILE,
                {
                    "schema": ENTRY_SCHEMA,
                    "key": key,
                    "created": created,
                    "created_utc": datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat(),
                    "file_count": len(sizes),
                    "total_bytes": sum(sizes.values()),
                    "files": sizes,
                },
            )
            _fsync_path(tmp, directory=True)
            published = self._publish(tmp, final)
        except BaseException as exc:
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

    def _publish(self, tmp: Path, final: Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        for _attempt in range(2):
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                if (final / ENTRY_FILE).is_file():
                    _remove(tmp)  # a concurrent writer published first: keep theirs
                    return final
                # a damaged entry (no entry.json): move it out of the way and try again
                aside = self.tmp_dir / f"{final.name}.damaged.{os.getpid()}.{secrets.token_hex(4)}"
                warn(f"build cache entry {final} is incomplete (no {ENTRY_FILE}); replacing it")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(final, aside)
                _remove(aside)
                continue
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
