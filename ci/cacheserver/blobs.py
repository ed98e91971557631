"""Content-addressed blob storage: sha256 hex digest -> bytes, verified when written and when read.

Every writer streams into a private temporary object and only publishes it (rename, or completing an S3
multipart upload) once its sha256 and size match what the caller announced: a reader never sees partial or
wrong bytes under a digest. Every reader re-hashes before handing the bytes out; a mismatch (bit rot, a
hand-edited file) is logged, the bad copy is moved aside, and the blob is reported as missing.
"""

from __future__ import annotations

import contextlib
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

log = logging.getLogger("kernel_ci.cacheserver")

DIGEST_RE = re.compile(r"[0-9a-f]{64}")
CHUNK = 1024 * 1024
SMALL_BLOB = 1024 * 1024  # blobs up to this size are read into memory (ccache objects)


class BlobError(Exception):
    """A blob could not be stored; ``status`` is the HTTP status that describes why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class DigestMismatch(BlobError):
    def __init__(self, message: str) -> None:
        super().__init__(message, 422)


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise BlobError(f"invalid blob digest {digest!r}: expected 64 lowercase hex characters (sha256)")
    return digest


@dataclass
class Blob:
    """A verified blob: either its bytes (small blobs) or an open file positioned at 0 (the caller closes)."""

    size: int
    data: bytes | None = None
    file: BinaryIO | None = None

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


def _hash_file(handle: BinaryIO) -> tuple[str, int]:
    digest = hashlib.sha256()
    count = 0
    while chunk := handle.read(CHUNK):
        digest.update(chunk)
        count += len(chunk)
    return digest.hexdigest(), count


class LocalBlobStore:
    """Blobs as files ``<root>/<d[:2]>/<digest>``; writes go to ``<root>/tmp`` and are renamed in."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.corrupt = self.root / "corrupt"
        for directory in (self.root, self.tmp, self.corrupt):
            directory.mkdir(parents=True, exist_ok=True)
        self._clean_tmp()

    def describe(self) -> str:
        return f"local directory {self.root}"

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

    def put(self, digest: str, size: int, stream: BinaryIO) -> bool:
        final = self.path(digest)
        verifier = _Verifier(digest, size)
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix=f"{digest[:16]}.")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK):
                    verifier.update(chunk)
                    out.write(chunk)
                verifier.check()
                out.flush()
                os.fsync(out.fileno())
            if final.exists():
                tmp.unlink()
                return False
            final.parent.mkdir(exist_ok=True)
            os.rename(tmp, final)  # same digest from a concurrent writer: same bytes, either wins
            return True
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def get(self, digest: str) -> Blob | None:
        path = self.path(digest)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - handed to the caller
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(handle.fileno()).st_size
            if size <= SMALL_BLOB:
                data = handle.read()
                handle.close()
                if hashlib.sha256(data).hexdigest() != digest:
                    self._set_aside(digest, path)
                    return None
                return Blob(size, data=data)
            got, _count = _hash_file(handle)
            if got != digest:
                handle.close()
                self._set_aside(digest, path)
                return None
            handle.seek(0)
            return Blob(size, file=handle)
        except BaseException:
            handle.close()
            raise

    def _set_aside(self, digest: str, path: Path) -> None:
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
