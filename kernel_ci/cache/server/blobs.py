"""Content-addressed blob storage: sha256 hex digest -> bytes, verified when written and at rest.

Every writer streams into a private temporary object (``stage``) and only publishes it (rename, or an S3
upload) once its sha256 and size match what the caller announced: a reader never sees partial or wrong
bytes under a digest. Publishing is a separate step so that the index can do it inside its transaction
(a blob re-uploaded while garbage collection deletes it is never lost: see ``index.blob_add``).

Blobs are verified once, as they are written, and ``verify`` (``kernel-ci cache scrub``) checks them at
rest. A small blob (a ccache object) is re-hashed on read only when its file no longer carries the
"verified" stamp of ITS digest: the modification time ``verified_stamp(digest)`` given to it when it was
renamed in (a re-hash was a third of a ccache GET's server time). A file written or replaced since (an
edit, a copy of another blob even with its timestamps kept) has another mtime and is re-hashed; one
that passes is stamped again, so a store written by an older version becomes fast after one read. Bit
rot in place keeps the mtime: the scrub finds it, and the clients verify anyway (ccache checks its
objects' own checksums; a build restore checks every file against entry-digests.json). Large blobs are
never re-hashed per request (an anonymous reader could otherwise keep every worker hashing gigabytes).
A mismatch is logged, the bad copy is moved aside, the blob is missing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from kernel_ci.core.digest import sha256_stream

log = logging.getLogger("kernel_ci.cacheserver")

DIGEST_RE = re.compile(r"[0-9a-f]{64}")
CHUNK = 1024 * 1024
SMALL_BLOB = 1024 * 1024  # blobs up to this size are read into memory (ccache objects)
_STAMP_EPOCH_NS = 946_684_800 * 10**9  # 2000-01-01: far from any real write time


def verified_stamp(digest: str) -> int:
    """The mtime (ns) of a blob file verified against ``digest``: one value per digest, never "now"."""
    return _STAMP_EPOCH_NS + int(digest[:13], 16)  # < 2**52 ns (~52 days) past the epoch


class BlobError(Exception):
    """A blob could not be stored; ``status`` is the HTTP status that describes why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class DigestMismatch(BlobError):
    def __init__(self, message: str) -> None:
        super().__init__(message, 422)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def disk_full_is_507(where: str) -> Iterator[None]:
    """A full filesystem is the store's state, not a bug: 507 with what filled up, not a 500."""
    try:
        yield
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise BlobError(
                f"the blob store is out of space ({where}: {exc.strerror}); try later", 507
            ) from exc
        raise


class BlobWriter(Protocol):
    """An upload fed chunk by chunk (each write is short: the HTTP layer never parks a thread on a slow
    client between chunks); finish() verifies size and digest."""

    def write(self, chunk: bytes) -> None: ...

    def finish(self) -> Staged: ...

    def abort(self) -> None: ...


class Staged(Protocol):
    """A verified upload waiting to be published under its digest."""

    def publish(self) -> bool:
        """Make it visible under its digest; False if that digest was already stored (same bytes)."""
        ...

    def discard(self) -> None: ...


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise BlobError(f"invalid blob digest {digest!r}: expected 64 lowercase hex characters (sha256)")
    return digest


FileStamp = tuple[int, int, int, int]  # inode, size, mtime, ctime (ns): changes with any write or rename


def file_stamp(stat: os.stat_result) -> FileStamp:
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@dataclass
class Blob:
    """A verified blob: either its bytes (small blobs) or an open file positioned at 0 (the caller closes)."""

    size: int
    data: bytes | None = None
    file: BinaryIO | None = None
    # of a local file: its FileStamp as it was when opened for this read (see LocalBlobStore.stamp)
    stamp: FileStamp | None = None

    def chunks(self) -> Iterator[bytes]:
        if self.data is not None:
            yield self.data
            return
        assert self.file is not None
        try:
            while chunk := self.file.read(CHUNK):
                yield chunk
        finally:
            self.file.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@runtime_checkable
class BlobStore(Protocol):
    def writer(self, digest: str, size: int) -> BlobWriter:
        """A writer for size bytes under digest (nothing visible before the Staged is published)."""
        ...

    def stage(self, digest: str, size: int, stream: BinaryIO) -> Staged:
        """Read size bytes from stream and verify them (DigestMismatch: nothing kept); not yet visible."""
        ...

    def verify(self, digest: str) -> bool | None:
        """Re-hash a stored blob (the scrub): True if good, False if corrupt (set aside), None if absent."""
        ...

    def put(self, digest: str, size: int, stream: BinaryIO) -> bool:
        """Store size bytes read from stream under digest, verified; False if it was already there.

        Raises DigestMismatch (nothing stored) when the bytes do not hash to digest or are not size long.
        """
        ...

    def get(self, digest: str) -> Blob | None:
        """The verified blob, or None when absent or corrupt (a corrupt copy is logged and set aside)."""
        ...

    def exists(self, digest: str) -> bool: ...

    def delete(self, digest: str) -> None: ...

    def size(self, digest: str) -> int | None: ...

    def describe(self) -> str: ...
    def close(self) -> None: ...


class _Verifier:
    """Hashes and counts what passes through; raises once the count passes the announced size."""

    def __init__(self, digest: str, size: int) -> None:
        self.digest = digest
        self.size = size
        self.hash = hashlib.sha256()
        self.count = 0

    def update(self, chunk: bytes) -> None:
        self.count += len(chunk)
        if self.count > self.size:
            raise DigestMismatch(f"blob {self.digest[:12]}: more than the announced {self.size} bytes")
        self.hash.update(chunk)

    def check(self) -> None:
        if self.count != self.size:
            raise DigestMismatch(
                f"blob {self.digest[:12]}: received {self.count} bytes, announced {self.size}"
            )
        got = self.hash.hexdigest()
        if got != self.digest:
            raise DigestMismatch(f"blob {self.digest[:12]}: the bytes hash to {got}, not to the digest")


class LocalBlobStore:
    """Blobs as files ``<root>/<d[:2]>/<digest>``; writes go to ``<root>/tmp`` and are renamed in."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.corrupt = self.root / "corrupt"
        for directory in (self.root, self.tmp, self.corrupt):
            directory.mkdir(parents=True, exist_ok=True)
        # the ccache read path opens blobs relative to the store's directory: two path components to look
        # up, not the whole path (a third of the open(2) with the bench's paths)
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._clean_tmp()

    def describe(self) -> str:
        return f"local directory {self.root}"

    def close(self) -> None:
        """Close the store's directory handle; the store is not used afterwards."""
        fd, self._root_fd = self._root_fd, -1
        if fd >= 0:
            os.close(fd)

    def _clean_tmp(self, max_age: float = 24 * 3600) -> None:
        # leftovers of a killed server process (a live upload is never older than this)
        now = time.time()
        for path in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > max_age:
                    path.unlink()

    def path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / digest[:2] / digest

    def writer(self, digest: str, size: int) -> _LocalWriter:
        return _LocalWriter(self, digest, size)

    def stage(self, digest: str, size: int, stream: BinaryIO) -> Staged:
        return stage_from(self.writer(digest, size), stream)

    def put(self, digest: str, size: int, stream: BinaryIO) -> bool:
        staged = self.stage(digest, size, stream)
        try:
            return staged.publish()
        finally:
            staged.discard()

    def verify(self, digest: str) -> bool | None:
        path = self.path(digest)
        try:
            with open(path, "rb") as handle:
                got, _count = sha256_stream(handle)
        except FileNotFoundError:
            return None
        if got != digest:
            self._set_aside(digest, path)
            return False
        return True

    def get(self, digest: str) -> Blob | None:
        check_digest(digest)
        path = f"{digest[:2]}/{digest}"  # relative to _root_fd; a str, not pathlib: the ccache read path
        # os.open/os.read, not open(): a buffered file object costs an fstat, an ioctl and three Python
        # objects more, a tenth of a ccache GET's time on the event loop
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._root_fd)
        except FileNotFoundError:
            return None
        try:
            stat = os.fstat(fd)
            if stat.st_size > SMALL_BLOB:
                # large: verified when written and by the scrub, not per request (see the module docstring)
                return Blob(stat.st_size, file=os.fdopen(fd, "rb"))  # the caller closes it
        except BaseException:
            os.close(fd)
            raise
        try:
            return self._small(digest, fd, stat)
        finally:
            os.close(fd)

    def _small(self, digest: str, fd: int, stat: os.stat_result) -> Blob | None:
        """A small blob's bytes, re-hashed unless its file carries its digest's stamp (module docstring)."""
        data = _read_all(fd, stat.st_size)
        if stat.st_mtime_ns == verified_stamp(digest) and len(data) == stat.st_size:
            return Blob(stat.st_size, data=data, stamp=file_stamp(stat))  # verified on write
        if hashlib.sha256(data).hexdigest() != digest:
            self._set_aside(digest, self.path(digest))
            return None
        with contextlib.suppress(OSError):  # the inode just read is the one stamped
            os.utime(fd, ns=(stat.st_atime_ns, verified_stamp(digest)))
        return Blob(len(data), data=data, stamp=file_stamp(stat))  # the stamp before utime: one more read

    def stamp(self, digest: str) -> FileStamp | None:
        """The FileStamp of a blob's file now (None: gone): one stat, for an answer kept in memory to be
        served only while the file it was read from is untouched (a file replaced or edited at rest is
        then read, and judged, as _small does)."""
        try:
            return file_stamp(os.stat(f"{digest[:2]}/{digest}", dir_fd=self._root_fd))
        except FileNotFoundError:
            return None

    def _set_aside(self, digest: str, path: Path | str) -> None:
        aside = self.corrupt / f"{digest}.{int(time.time())}.{secrets.token_hex(3)}"
        log.error("blob %s is corrupt on disk (its bytes no longer hash to it): moved to %s", digest, aside)
        with contextlib.suppress(OSError):
            os.rename(path, aside)

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int | None:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()


class _LocalStaged:
    def __init__(self, tmp: Path, final: Path) -> None:
        self.tmp = tmp
        self.final = final

    def publish(self) -> bool:
        existed = self.final.exists()
        self.final.parent.mkdir(exist_ok=True)
        # verified by the writer: stamped so that reads need not re-hash it (see the module docstring)
        os.utime(self.tmp, ns=(time.time_ns(), verified_stamp(self.final.name)))
        # always renamed in, even over an existing copy (same bytes): garbage collection may be deleting
        # that copy right now, and the index's lock orders the two (see index.blob_add)
        os.rename(self.tmp, self.final)
        return not existed

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


class _LocalWriter:
    def __init__(self, store: LocalBlobStore, digest: str, size: int) -> None:
        self.final = store.path(digest)
        self.where = str(store.tmp)
        self.verifier = _Verifier(digest, size)
        with disk_full_is_507(self.where):
            fd, name = tempfile.mkstemp(dir=store.tmp, prefix=f"{digest[:16]}.")
        self.tmp = Path(name)
        self.out = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        try:
            self.verifier.update(chunk)
            with disk_full_is_507(self.where):
                self.out.write(chunk)
        except BaseException:
            self.abort()
            raise

    def finish(self) -> _LocalStaged:
        try:
            self.verifier.check()
            with disk_full_is_507(self.where):
                self.out.flush()
                os.fsync(self.out.fileno())
                self.out.close()
        except BaseException:
            self.abort()
            raise
        return _LocalStaged(self.tmp, self.final)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.out.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


def _read_all(fd: int, size: int) -> bytes:
    """Up to size bytes from fd (a regular file: one read(2) unless a signal cuts it short)."""
    data = os.read(fd, size)
    while len(data) < size and (more := os.read(fd, size - len(data))):
        data += more
    return data


def stage_from(writer: BlobWriter, stream: BinaryIO) -> Staged:
    """Feed a whole blocking stream to a writer (callers that already run in a worker thread)."""
    try:
        while chunk := stream.read(CHUNK):
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()
