"""A BuildStore backed by the shared cache service (``kernel-ci cache serve``), in front of the local store.

Look-ups go to the local store first, then to the service; a remote hit is downloaded, verified blob by
blob and published into the local store atomically (``LocalStore.put``), so everything downstream still
reads a local directory. After a successful build the entry is pushed: missing blobs first, the manifest
last (the service refuses a manifest whose blobs are not all there). The service being down never fails a
build: a failed look-up is a miss and a failed push a warning.

How an entry is uploaded: its top-level files (bzImage, config, System.map, metadata.json) and the files of
``patches/`` one blob each (people download those from the web page), every other directory (``kbuild/``:
~11,000 files, ``modules/``, ``extmod/``) as ONE tar blob. One request per file would cost thousands of
round trips and index rows per build for no benefit (nobody fetches one kbuild header alone), and a tar
keeps modes and mtimes (kbuild compares them when building out-of-tree modules). The tar is reproducible
for a given entry (sorted names, uid/gid 0, no user names, no hard-link records) so pushing the same entry
twice uploads nothing. No compression: the service is on a LAN or loopback, where zstd/gzip would cost
more CPU time than it saves.

Trust: anyone holding a write token can publish any bytes under any key, so a restore trusts nothing it
downloads. Each entry carries ``entry-digests.json`` (the sha256, size and mode of every file, from the
pusher's entry.json); its blob is checked against the manifest like every other. A tar member must be a
regular file or directory below its output's name, listed there, with exactly the listed bytes: no
symlinks, hard links, devices, FIFOs, setuid bits, absolute names or ``..``. Members are written by
``cachestore.TreeWriter`` (never through a symlink, never over an existing file) into a staging directory
that is published only once all of it matches (``LocalStore.put(expected=...)``); the modules' build and
source links are made by the client. tarfile's own extraction (even with ``filter="data"``) is not used:
it accepts symlinks and hard links inside the destination and cannot check a member against a digest
before it is on disk. An entry without the digests (an older client pushed it) is a miss.

Why a hand-written tar reader (``_members``) and not tarfile for reading: tarfile spends ~40 us of Python
per member, 0.5 s of each restore of kbuild/'s 11,600 members (a third of it, after the rest was cut).
The reader takes only the subset ``write_tar`` writes (ustar headers checked against their checksums, PAX
``path``/``size``/``mtime`` records) and refuses everything else, which the restore refused anyway once
tarfile had parsed it. Each member is hashed and compared before it is written; verified members are
written by two threads (``_FileWriters``), because creating ~11,600 inodes is most of what is left and
the kernel does it with the GIL released. ``write_tar`` writes the same subset by hand, byte for byte
as tarfile's PAX format, for the same reason (tarfile was ~4 s of a push).

Configuration (first found wins, read once by kernel_ci.core.settings): ``--cache-url``,
``$KERNEL_CI_CACHE_URL`` (+ ``$KERNEL_CI_CACHE_TOKEN``, ``$KERNEL_CI_CACHE_READ_TOKEN``), the ``[cache]``
table of ``$KERNEL_CI_CONFIG`` or ``~/.config/kernel-ci/config.toml``::

    [cache]
    url = "http://cache.example:8080"
    token = "..."            # needed to push; reads may be anonymous
    read_token = "..."       # what the builder container gets for ccache (a --read-token of the service)
    ccache = true            # also use the service as ccache remote storage (default true)

The builder container runs patch code, so its ccache credential is the read token (or none), never the
write token, unless the user says the series is trusted (``--trusted-ccache-writes``): see SECURITY.md.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from kernel_ci.build.layout import honest_links
from kernel_ci.cache.store import (
    DIGESTS_FILE,
    ENTRY_FILE,
    ENTRY_SCHEMA,
    MANIFEST_FILE,
    RESERVED_NAMES,
    CacheStoreError,
    FileRecord,
    LocalStore,
    TreeWriter,
    UnsafeEntryError,
    WrittenTree,
    check_record,
    check_rel_path,
    create_file_at,
    read_entry_info,
    write_all,
)
from kernel_ci.core.console import console, warn
from kernel_ci.core.digest import file_digest
from kernel_ci.core.errors import InfrastructureError
from kernel_ci.core.settings import TOKEN_ENV, Settings, ccache_storage

FILE_BY_FILE_DIRS = frozenset({"patches"})
CHUNK = 1024 * 1024
DIGESTS_OUTPUT = DIGESTS_FILE
MAX_DIGESTS_BYTES = 64 * 1024 * 1024


class RemoteCacheError(InfrastructureError):
    pass


@dataclass
class RemoteConfig:
    url: str
    token: str | None = None
    ccache: bool = True
    read_token: str | None = None  # for the builder container's ccache: it runs untrusted patch code

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteConfig | None:
        """The service the settings name, if any (Settings.load read flags, environment and file)."""
        if settings.cache_url is None:
            return None
        ccache = settings.ccache_remote is not None
        return cls(
            url=settings.cache_url,
            token=settings.cache_token,
            ccache=ccache,
            read_token=settings.cache_read_token,
        )

    @classmethod
    def resolve(cls, cli_url: str | None = None) -> RemoteConfig | None:
        return cls.from_settings(Settings.load(cli_url))

    def ccache_storage(self, *, trusted_writes: bool = False) -> str:
        """CCACHE_REMOTE_STORAGE for this service (ccache sends the token as ``Authorization: Bearer``).

        The builder container gets it, and patch code runs there: by default the read token (or none) and
        ccache's ``read-only`` attribute, so that the shared ccache cannot be poisoned by a series; the write
        token only when the user vouches for the series (trusted_writes, ``--trusted-ccache-writes``)."""
        token = self.token if trusted_writes else self.read_token
        return ccache_storage(self.url, token, writable=trusted_writes)


class CacheClient:
    """The service's build API over HTTP (httpx)."""

    def __init__(self, config: RemoteConfig, timeout: float = 60.0) -> None:
        import httpx

        self._httpx = httpx
        self.config = config
        headers = {"User-Agent": "kernel-ci"}
        if config.token:
            headers["Authorization"] = f"Bearer {config.token}"
        self.http = httpx.Client(base_url=config.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _check(self, response: Any, what: str) -> None:
        if response.status_code >= 400:
            try:
                reason = response.json().get("error", response.text)
            except ValueError:
                reason = response.text[:300]
            raise RemoteCacheError(f"{what}: HTTP {response.status_code}: {reason}")

    def get_manifest(self, key: str) -> dict[str, Any] | None:
        response = self.http.get(f"/api/v1/builds/{key}")
        if response.status_code == 404:
            return None
        self._check(response, f"manifest {key[:12]}")
        return response.json()

    def get_alias(self, request_key: str) -> str | None:
        response = self.http.get(f"/api/v1/aliases/{request_key}")
        if response.status_code == 404:
            return None
        self._check(response, "alias")
        return response.json()["key"]

    def put_alias(self, request_key: str, key: str) -> None:
        self._check(self.http.put(f"/api/v1/aliases/{request_key}", json={"key": key}), "alias")

    def missing(self, digests: list[str]) -> list[str]:
        response = self.http.post("/api/v1/missing-blobs", json={"digests": digests})
        self._check(response, "missing blobs")
        return response.json()["missing"]

    def put_blob(self, digest: str, size: int, path: Path) -> None:
        def body() -> Iterator[bytes]:
            with open(path, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    yield chunk

        response = self.http.put(
            f"/api/v1/blobs/{digest}",
            content=body(),
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )
        self._check(response, f"upload of blob {digest[:12]}")

    def put_manifest(self, key: str, doc: dict[str, Any]) -> str:
        response = self.http.put(f"/api/v1/builds/{key}", json=doc)
        self._check(response, f"publishing build {key[:12]}")
        return response.json()["status"]

    def download(self, digest: str, size: int, out: BinaryIO) -> None:
        """The blob into out, verified against its digest and size (raises on a mismatch)."""
        hasher = hashlib.sha256()
        count = 0
        with self.http.stream("GET", f"/api/v1/blobs/{digest}") as response:
            self._check(response, f"blob {digest[:12]}")
            for chunk in response.iter_bytes():  # as received: re-chunking would copy every byte again
                hasher.update(chunk)
                count += len(chunk)
                if count > size:
                    break
                out.write(chunk)
        if count != size or hasher.hexdigest() != digest:
            raise RemoteCacheError(
                f"blob {digest[:12]}: got {count} bytes hashing to {hasher.hexdigest()[:12]}, "
                f"expected {size} bytes hashing to {digest[:12]}"
            )

    def fetch_bytes(self, digest: str, size: int, limit: int) -> bytes:
        """A small blob in memory, verified against its digest and size."""
        if size > limit:
            raise RemoteCacheError(f"blob {digest[:12]}: {size} bytes, more than the {limit} allowed")
        response = self.http.get(f"/api/v1/blobs/{digest}")
        self._check(response, f"blob {digest[:12]}")
        data = response.content
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise RemoteCacheError(f"blob {digest[:12]}: its bytes do not match its digest")
        return data

    def extract(
        self,
        digest: str,
        size: int,
        destination: Path,
        output: str,
        records: Mapping[str, FileRecord],
        writer: TreeWriter | None = None,
    ) -> None:
        """Unpack the tar blob of output into destination as it downloads, checking every member against
        records (see extract_members); raises if the service sends more or fewer than size bytes.

        The blob's own sha256 is not computed: what a restore keeps of a tar is its members' bytes, each
        checked against its listed sha256, and their names and modes, checked against the same list; the
        rest (headers, padding) is parsed strictly, each header against its checksum. The service chose
        that digest itself, so matching it would prove nothing more (SECURITY.md: nothing it sends is
        trusted), and it cost a second sha256 pass over every byte."""
        with self.http.stream("GET", f"/api/v1/blobs/{digest}") as response:
            self._check(response, f"blob {digest[:12]}")
            # the chunks as they are received (64 KiB reads), not re-chunked to CHUNK: httpx's re-chunking
            # copied every byte twice more (~0.05-0.1 s of this thread for kbuild/'s 64 MB tar)
            blob = _Blob(response.iter_bytes(), size, f"blob {digest[:12]}")
            _extract(blob, destination, output, records, writer)
            blob.drain()
        if blob.count != size:
            raise RemoteCacheError(f"blob {digest[:12]}: got {blob.count} bytes, expected {size}")

    def put_run(self, key: str, run_id: str, doc: dict[str, Any]) -> dict[str, Any]:
        response = self.http.put(f"/api/v1/builds/{key}/runs/{run_id}", json=doc)
        self._check(response, f"attaching run {run_id}")
        return response.json()


# -- reading a tar blob -------------------------------------------------------------------------------
# Why by hand and not tarfile: tarfile spends ~40 us of Python per member (header objects, copies, its
# own file object per member): 0.5 s of a kbuild/ tar's 11,600 members, the largest CPU cost of a restore.
# An entry's tar is the subset write_tar makes (POSIX ustar headers, PAX records for long names, regular
# files and directories): that subset is read here and everything else is refused, which the restore did
# anyway after tarfile had parsed it (links, devices, sparse or GNU members, global PAX headers).

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
BIG_MEMBER = 16 * 1024 * 1024  # members above this are hashed and written as they arrive (bounded memory)
MAX_PAX_BYTES = 64 * 1024  # a PAX header of an entry holds a path and perhaps a size or mtime
PAX_KEYS = frozenset({"path", "size", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname"})
WRITER_THREADS = 2
BATCH_FILES = 64
BATCH_BYTES = 4 * 1024 * 1024
MAX_PENDING_BATCHES = 16  # at most 64 MiB of verified members waiting for a writer thread

_TYPE_NAMES = {
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
    tarfile.CONTTYPE: "contiguous file",
    tarfile.GNUTYPE_SPARSE: "sparse file",
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link name",
    tarfile.XGLTYPE: "global PAX header",
}

Bytes = bytes | memoryview


class _Blob:
    """The bytes of a blob as it downloads, handed out in exact sizes (a memoryview into the downloaded
    chunk where possible: no copy); never more than limit bytes in all (a service cannot stream forever)."""

    def __init__(self, chunks: Iterator[bytes], limit: int | None, what: str) -> None:
        self._chunks = chunks
        self._limit = limit
        self._what = what
        self._view = memoryview(b"")
        self._pos = 0
        self.count = 0

    def _next(self) -> bytes | None:
        chunk = next(self._chunks, None)
        if chunk is not None:
            self.count += len(chunk)
            if self._limit is not None and self.count > self._limit:
                raise UnsafeEntryError(f"{self._what}: more than the {self._limit} bytes it was said to hold")
        return chunk

    def take(self, size: int) -> memoryview | None:
        """The next size bytes; None when the blob ended right here; raises when it ends within them."""
        end = self._pos + size
        if end <= len(self._view):
            piece = self._view[self._pos : end]
            self._pos = end
            return piece
        parts: list[Bytes] = [self._view[self._pos :]]
        have = len(parts[0])
        while have < size:
            chunk = self._next()
            if chunk is None:
                if have == 0:
                    return None
                raise UnsafeEntryError(f"{self._what}: truncated ({have} of {size} bytes)")
            parts.append(chunk)
            have += len(chunk)
        self._view = memoryview(b"".join(parts))
        self._pos = size
        return self._view[:size]

    def pieces(self, size: int) -> Iterator[memoryview]:
        """The next size bytes as they arrive (a big member: never all in memory)."""
        while size:
            if self._pos >= len(self._view):
                chunk = self._next()
                if chunk is None:
                    raise UnsafeEntryError(f"{self._what}: truncated ({size} bytes missing)")
                self._view, self._pos = memoryview(chunk), 0
            end = min(len(self._view), self._pos + size)
            piece = self._view[self._pos : end]
            size -= end - self._pos
            self._pos = end
            yield piece

    def exact(self, size: int) -> memoryview:
        piece = self.take(size)
        if piece is None:
            raise UnsafeEntryError(f"{self._what}: truncated ({size} bytes missing)")
        return piece

    def drain(self) -> None:
        """Read to the end (the end-of-archive blocks): the connection goes back to the pool."""
        self._view, self._pos = memoryview(b""), 0
        while self._next() is not None:
            pass


@dataclass(slots=True)
class _Member:
    name: str
    type: bytes
    mode: int
    size: int
    mtime: int


# A ustar header's fields, in order: name, mode, uid, gid, size, mtime, checksum, type, link name, magic,
# version, user and group names, device numbers, prefix (one unpack instead of a dozen slices).
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s5s3s32s32s8s8s155s12x")
_OCTAL_DIGITS = b"01234567"


def _octal(field: bytes, what: str) -> int:
    """write_tar's numbers: octal digits, then spaces and NULs (the checksum: "\\0 ")."""
    digits = field.rstrip(b"\0 ")
    if digits.strip(_OCTAL_DIGITS):  # base-256, signs, spaces before the digits, other characters
        raise UnsafeEntryError(f"tar header: {what} field {field!r} is not an octal number")
    return int(digits or b"0", 8)


def _text(field: bytes) -> str:
    try:
        return field.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsafeEntryError(f"tar header: a name that is not UTF-8 ({field[:60]!r})") from exc


def _header(block: bytes, pax: Mapping[str, str]) -> _Member:
    """A ustar header (already known not to be a zero block), with the PAX records that precede it."""
    (raw_name, mode, _uid, _gid, size, mtime, checksum, kind, _link, magic, _version, _user, _group, _major,
     _minor, prefix) = _USTAR.unpack(block)  # fmt: skip
    if magic != b"ustar":
        raise UnsafeEntryError("tar header: not a POSIX ustar header")
    # the four numbers checked at once (each: octal digits, then spaces and NULs): their digits joined
    # are octal digits only; _octal names the field that is not
    numbers = [field.rstrip(b"\0 ") for field in (mode, size, mtime, checksum)]
    if b"".join(numbers).strip(_OCTAL_DIGITS):
        for field, what in ((mode, "mode"), (size, "size"), (mtime, "mtime"), (checksum, "checksum")):
            _octal(field, what)
    mode_value, size_value, mtime_value, checksum_value = [int(n or b"0", 8) for n in numbers]
    # the checksum is the sum of the header's bytes with its own field counted as spaces; a header is
    # mostly NULs, and summing only the others (translate drops them, in C) is a fifth of the work
    if checksum_value != sum(block.translate(None, b"\0")) - sum(checksum) + 8 * 32:
        raise UnsafeEntryError("tar header: bad checksum (a damaged or forged header)")
    name = _text(raw_name)
    if prefix[0]:
        name = f"{_text(prefix)}/{name}"
    member = _Member(pax.get("path", name), kind, mode_value, size_value, mtime_value)
    if pax:
        if "size" in pax:
            member.size = _pax_int(pax["size"], "size")
        if "mtime" in pax:  # tarfile writes one for a time before 1970 too ("-5"), or with a fraction
            seconds = pax["mtime"].split(".", 1)[0]
            negative = seconds.startswith("-")
            member.mtime = _pax_int(seconds.removeprefix("-"), "mtime") * (-1 if negative else 1)
    if kind == tarfile.DIRTYPE and member.name.endswith("/"):
        member.name = member.name[:-1]  # tarfile names directories "name/"
    return member


def _pax_int(value: str, key: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise UnsafeEntryError(f"tar PAX record {key}={value[:40]!r} is not a whole number")
    return int(value)


def _pax_records(data: memoryview) -> dict[str, str]:
    """The records of a PAX extended header ("<length> <key>=<value>\\n" each), only keys write_tar may
    write; anything else (link names, sparse maps, binary charsets, vendor keys) is refused."""
    raw = bytes(data)
    records: dict[str, str] = {}
    pos = 0
    while pos < len(raw):
        space = raw.find(b" ", pos, pos + 20)
        digits = raw[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise UnsafeEntryError("tar PAX header: a record without a length")
        end = pos + int(digits)
        if end > len(raw) or end <= space + 1 or raw[end - 1 : end] != b"\n":
            raise UnsafeEntryError("tar PAX header: a record of a wrong length")
        key, equals, value = raw[space + 1 : end - 1].partition(b"=")
        try:
            text_key, text_value = key.decode("ascii"), value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnsafeEntryError("tar PAX header: a record that is not UTF-8") from exc
        if not equals or text_key not in PAX_KEYS:
            raise UnsafeEntryError(f"tar PAX record {text_key[:40]!r}: not one an entry's tar has")
        records[text_key] = text_value
        pos = end
    return records


def _members(blob: _Blob) -> Iterator[_Member]:
    """The members of a tar blob, each header checked; the caller reads each member's data (and padding)
    before asking for the next. Ends at the first zero block, or when the blob ends between members."""
    pax: dict[str, str] | None = None  # the PAX records for the next member, once a PAX header was read
    while True:
        view = blob.take(BLOCK)
        if view is None or view == ZERO_BLOCK:
            if pax is not None:
                raise UnsafeEntryError("tar: a PAX header without its member")
            return
        member = _header(bytes(view), pax or {})
        if member.type == tarfile.XHDTYPE:
            if pax is not None:
                raise UnsafeEntryError("tar: two PAX headers in a row")
            if member.size > MAX_PAX_BYTES:
                raise UnsafeEntryError(f"tar: a PAX header of {member.size} bytes")
            pax = _pax_records(blob.exact(member.size))
            blob.exact(-member.size % BLOCK)
            continue
        pax = None
        yield member


# one writer operation: (path components, mode, bytes, mtime, name); bytes None: make the directory
_Op = tuple[tuple[str, ...], int, Bytes | None, int, str]


class _FileWriters:
    """Writes verified members through a few threads while the caller parses and hashes the next ones.

    Creating a file is most of a restore (11,600 of them; on ext4 an inode allocation each), and it runs
    in the kernel with the GIL released. Each thread makes the directories it needs too (3,700 mkdirat
    and openat, then each directory's mtime at the end: not on the parsing thread, which is the restore's
    critical path), through its own TreeWriter of root (every component opened with O_NOFOLLOW, files
    created O_EXCL; two threads making one directory: one mkdirat finds it made, both open it). Members
    go in batches of consecutive ones (a batch per directory made 3,500 batches of ~3 files: the hand-off
    cost more than the writes), at most MAX_PENDING_BATCHES waiting (bounded memory)."""

    def __init__(self, root: Path, threads: int = WRITER_THREADS, written: WrittenTree | None = None) -> None:
        self._root = root
        self._written = written
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kci-restore") if threads else None
        self._batch: list[_Op] = []
        self._bytes = 0
        self._pending: deque[Future[None]] = deque()
        self._local = threading.local()
        self._trees: list[TreeWriter] = []

    def _tree(self) -> TreeWriter:
        """This thread's TreeWriter of root."""
        tree: TreeWriter | None = getattr(self._local, "tree", None)
        if tree is None:
            tree = self._local.tree = TreeWriter(self._root, written=self._written)
            self._trees.append(tree)  # list.append: atomic
        return tree

    def _write(self, batch: list[_Op]) -> None:
        """Make and write verified members: a directory (made 0755 where missing), or a file: one openat
        with O_CREAT|O_EXCL|O_NOFOLLOW and the mode, the bytes, the mtime by descriptor, close; each file
        recorded in written once it is complete."""
        tree, written = self._tree(), self._written
        for parts, mode, data, mtime, rel in batch:
            if data is None:
                tree.directory(parts)
                continue
            fd = create_file_at(tree.directory(parts[:-1]), parts[-1], mode, rel)
            try:
                write_all(fd, data)
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
            if written is not None:
                written.file(rel)

    def _set_mtimes(self, mtimes: list[tuple[tuple[str, ...], int]]) -> None:
        tree = self._tree()
        for parts, mtime in mtimes:
            os.utime(parts[-1], (mtime, mtime), dir_fd=tree.directory(parts[:-1]), follow_symlinks=False)

    def directory(self, parts: tuple[str, ...]) -> None:
        self._add((parts, 0, None, 0, "/".join(parts)), 0)

    def file(self, parts: tuple[str, ...], mode: int, data: Bytes, mtime: int, rel: str) -> None:
        self._add((parts, mode, data, mtime, rel), len(data))

    def _add(self, op: _Op, size: int) -> None:
        self._batch.append(op)
        self._bytes += size
        if len(self._batch) >= BATCH_FILES or self._bytes >= BATCH_BYTES:
            self._submit()

    def _submit(self) -> None:
        batch, self._batch, self._bytes = self._batch, [], 0
        if not batch:
            return
        if self._pool is None:
            self._write(batch)
            return
        self._pending.append(self._pool.submit(self._write, batch))
        while self._pending and (len(self._pending) > MAX_PENDING_BATCHES or self._pending[0].done()):
            self._pending.popleft().result()  # raises the first failure of a writer thread

    def _wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def finish(self, mtimes: list[tuple[tuple[str, ...], int]]) -> None:
        """Every member written, then each directory's mtime set (writing into a directory changes it);
        raises a writer's failure."""
        self._submit()
        self._wait()
        if self._pool is None:
            self._set_mtimes(mtimes)
            return
        half = len(mtimes) // 2
        for part in (mtimes[:half], mtimes[half:]):
            self._pending.append(self._pool.submit(self._set_mtimes, part))
        self._wait()

    def __enter__(self) -> _FileWriters:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:  # every started batch done before any descriptor is closed
            self._pool.shutdown(wait=True, cancel_futures=True)
        for tree in self._trees:
            tree.close()


def extract_members(
    stream: Any,
    destination: Path,
    output: str,
    records: Mapping[str, FileRecord],
    writer: TreeWriter | None = None,
) -> None:
    """Write the members of a tar stream (a binary file object) into destination, refusing any member that
    is not a directory or a regular file named ``<output>/...`` (plain components), listed in records with
    exactly its bytes. writer: the restore's TreeWriter of destination, else a new one."""
    chunks = iter(lambda: stream.read(CHUNK), b"")
    _extract(_Blob(chunks, None, f"tar of {output}"), destination, output, records, writer)


def _extract(
    blob: _Blob,
    destination: Path,
    output: str,
    records: Mapping[str, FileRecord],
    writer: TreeWriter | None,
) -> None:
    mtimes: list[tuple[tuple[str, ...], int]] = []
    seen: set[str] = set()
    with (
        contextlib.nullcontext(writer) if writer else TreeWriter(destination) as writer,
        _FileWriters(writer.root, written=writer.written) as files,
    ):
        for member in _members(blob):
            name = member.name
            if member.type not in (tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.AREGTYPE):
                raise UnsafeEntryError(
                    f"tar member {name!r} is a {_TYPE_NAMES.get(member.type, repr(member.type))}: "
                    "an entry holds only regular files and directories"
                )
            # a listed file's name was checked with the list (parse_digests); anything else is checked here
            parts = tuple(name.split("/")) if name in records else check_rel_path(name, "tar member name")
            if parts[0] != output:
                raise UnsafeEntryError(f"tar member {name!r} is outside its output {output!r}")
            if member.type == tarfile.DIRTYPE:
                if member.mode & ~0o777 or member.mode & 0o022:
                    raise UnsafeEntryError(f"tar member {name!r}: unsafe directory mode {oct(member.mode)}")
                if member.size:
                    raise UnsafeEntryError(f"tar member {name!r}: a directory with {member.size} bytes")
                files.directory(parts)
                mtimes.append((parts, member.mtime))
            else:
                record = _check_member(member, records, seen)
                if member.size > BIG_MEMBER:
                    _write_streamed(blob, writer.directory(parts[:-1]), parts, member, record)
                    if writer.written is not None:
                        writer.written.file(name)
                else:
                    data = blob.exact(member.size)
                    if hashlib.sha256(data).hexdigest() != record["sha256"]:
                        raise _mismatch(name, record)
                    files.file(parts, record["mode"], data, member.mtime, name)
                blob.exact(-member.size % BLOCK)
        files.finish(mtimes)  # the directories' mtimes last: writing files into one changes it


def _check_member(member: _Member, records: Mapping[str, FileRecord], seen: set[str]) -> FileRecord:
    """The record of a regular member, which must be listed, once, with its mode and size."""
    name = member.name
    record = records.get(name)
    if record is None:
        raise UnsafeEntryError(f"tar member {name!r} is not listed in the entry's digests")
    if name in seen:
        raise UnsafeEntryError(f"{name} appears twice")
    seen.add(name)
    if stat.S_IMODE(member.mode) != record["mode"] or member.mode & ~0o777:
        raise UnsafeEntryError(f"tar member {name!r}: mode {oct(member.mode)}, listed {oct(record['mode'])}")
    if member.size != record["size"]:
        raise UnsafeEntryError(f"tar member {name!r}: {member.size} bytes, listed {record['size']}")
    return record


def _mismatch(name: str, record: FileRecord) -> UnsafeEntryError:
    return UnsafeEntryError(
        f"{name}: its bytes do not match the recorded digest ({record['size']} bytes, "
        f"sha256 {record['sha256'][:12]})"
    )


def _write_streamed(
    blob: _Blob, parent: int, parts: tuple[str, ...], member: _Member, record: FileRecord
) -> None:
    """A big member hashed and written as it arrives; a mismatch is found at its end (the partial file is
    in the staging directory, which the failure discards)."""
    hasher = hashlib.sha256()
    fd = create_file_at(parent, parts[-1], record["mode"], member.name)
    try:
        for piece in blob.pieces(member.size):
            hasher.update(piece)
            write_all(fd, piece)
        if hasher.hexdigest() != record["sha256"]:
            raise _mismatch(member.name, record)
        os.utime(fd, (member.mtime, member.mtime))
    finally:
        os.close(fd)


def write_tar(
    directory: Path, arcname: str, out: BinaryIO, records: Mapping[str, FileRecord] | None = None
) -> tuple[str, int]:
    """A reproducible tar of directory: sorted, uid/gid 0, no names, regular files never as hard links;
    returns its sha256 and size.

    Only directories and regular files: the honest links are left out (every client makes its own) and
    any other symlink is refused. With records (entry.json's, keyed by path below the entry), each file
    must still hold its recorded bytes: a damaged local entry is never pushed.

    The bytes are those tarfile's PAX format gives the same members (a test compares them), so an entry
    pushed by an older client is not uploaded again; written here because tarfile spent ~4 s of Python
    on kbuild/'s 15,000 members (TarInfo objects, copies, pathlib), most of a push.
    """
    tar = _TarWriter(out)
    _write_tree(tar, os.fspath(directory), arcname, set(honest_links(directory.parent)), records)
    return tar.close()


RECORD = 20 * BLOCK  # tarfile (like tar -b20) pads an archive to a multiple of this
_USTAR_MAGIC = b"ustar\x0000"


class _TarWriter:
    """Writes tar members to out, hashing and counting what it writes."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, data: Bytes) -> None:
        self.out.write(data)
        self.hash.update(data)
        self.count += len(data)

    def close(self) -> tuple[str, int]:
        end = 2 * BLOCK  # two zero blocks, then zeros up to a whole record
        self.write(bytes(end + (-(self.count + end) % RECORD)))
        return self.hash.hexdigest(), self.count


def _write_tree(
    tar: _TarWriter, folder: str, prefix: str, skip: set[str], records: Mapping[str, FileRecord] | None
) -> None:
    """The members below folder (named prefix/...), in os.walk's order as write_tar always wrote them: a
    directory's subdirectories, then its other names, each group sorted; then each subdirectory's."""
    with os.scandir(folder) as listing:
        entries = list(listing)
    subdirs = sorted((e for e in entries if e.is_dir(follow_symlinks=False)), key=lambda e: e.name)
    others = sorted((e for e in entries if not e.is_dir(follow_symlinks=False)), key=lambda e: e.name)
    for entry in [*subdirs, *others]:
        st = entry.stat(follow_symlinks=False)
        member = f"{prefix}/{entry.name}"
        mode, mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
        if stat.S_ISDIR(st.st_mode):
            tar.write(_tar_header(member + "/", tarfile.DIRTYPE, mode, 0, mtime))
        elif stat.S_ISREG(st.st_mode):
            record = None
            if records is not None:
                record = records.get(member)
                if record is None:
                    raise CacheStoreError(f"cannot push {member}: not listed in the entry's {ENTRY_FILE}")
            tar.write(_tar_header(member, tarfile.REGTYPE, mode, st.st_size, mtime))
            _write_member_data(tar, entry.path, member, st.st_size, record)
        elif stat.S_ISLNK(st.st_mode):
            if member not in skip:
                raise CacheStoreError(f"cannot push {entry.path}: a symlink (an entry holds files only)")
        else:
            raise CacheStoreError(f"cannot push {entry.path}: not a regular file or directory")
    for entry in subdirs:
        _write_tree(tar, entry.path, f"{prefix}/{entry.name}", skip, records)


def _write_member_data(tar: _TarWriter, path: str, member: str, size: int, record: FileRecord | None) -> None:
    """size bytes of the file at path and their padding; with record, they must be its bytes."""
    hasher = hashlib.sha256()
    count = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, min(CHUNK, size - count + 1)):
            count += len(chunk)
            if count > size:
                break
            hasher.update(chunk)
            tar.write(chunk)
    finally:
        os.close(fd)
    if count != size:
        raise CacheStoreError(f"cannot push {member}: it changed size while it was read")
    if record is not None and (size, hasher.hexdigest()) != (record["size"], record["sha256"]):
        raise CacheStoreError(f"cannot push {member}: it no longer matches its digest (damaged entry)")
    tar.write(bytes(-size % BLOCK))


def _tar_header(name: str, kind: bytes, mode: int, size: int, mtime: int) -> bytes:
    """A ustar header as tarfile's PAX format writes it, after a PAX header for a name over 100
    characters or not ASCII, or a size or mtime out of the octal fields' range."""
    pax: dict[str, str] = {}
    if not name.isascii() or len(name) > 100:
        pax["path"] = name
    if not 0 <= size < 8**11:
        pax["size"], size = str(size), 0
    if not 0 <= mtime < 8**11:
        pax["mtime"], mtime = str(mtime), 0
    head = _pax_header(pax) if pax else b""
    return head + _ustar(name.encode("ascii", "replace")[:100], kind, mode, size, mtime)


def _ustar(name: bytes, kind: bytes, mode: int, size: int, mtime: int) -> bytes:
    fields = b"".join(
        (
            name.ljust(100, b"\0"),
            b"%07o\0" % (mode & 0o7777),
            b"0000000\0" * 2,  # uid, gid
            b"%011o\0" % size,
            b"%011o\0" % mtime,
            b" " * 8,  # the checksum, counted as spaces
            kind,
            bytes(100),  # link name
            _USTAR_MAGIC,
        )
    ).ljust(BLOCK, b"\0")  # user and group names, device numbers, prefix: empty
    checksum = sum(fields)
    return fields[:148] + b"%06o\0" % checksum + fields[155:]


def _pax_header(pax: Mapping[str, str]) -> bytes:
    """A PAX extended header of records as tarfile writes it (its "././@PaxHeader" name, zero times)."""
    records = b""
    for key, value in pax.items():
        try:
            line = b" %s=%s\n" % (key.encode(), value.encode("utf-8"))
        except UnicodeEncodeError as exc:  # a file name that is not UTF-8: tarfile's hdrcharset=BINARY
            raise CacheStoreError(f"cannot push {value!r}: a name that is not UTF-8") from exc
        length = len(line)
        while len(str(length)) + len(line) != length:  # the length counts its own digits
            length = len(str(length)) + len(line)
        records += str(length).encode() + line
    header = _ustar(b"././@PaxHeader", tarfile.XHDTYPE, 0, len(records), 0)
    return header + records + bytes(-len(records) % BLOCK)


def parse_digests(data: bytes, key: str) -> tuple[dict[str, FileRecord], list[str]]:
    """The per-file records and directories of a downloaded entry-digests.json (validated)."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise UnsafeEntryError(f"{DIGESTS_FILE} is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != ENTRY_SCHEMA or doc.get("key") != key:
        raise UnsafeEntryError(f"{DIGESTS_FILE} is not of entry format {ENTRY_SCHEMA} for build {key[:12]}")
    files, dirs = doc.get("files"), doc.get("dirs", [])
    if not isinstance(files, dict) or not isinstance(dirs, list):
        raise UnsafeEntryError(f"{DIGESTS_FILE}: files must be an object and dirs a list")
    records = {rel: check_record(rel, record) for rel, record in files.items()}  # checks each path
    for rel in dirs:
        check_rel_path(rel)
    for rel in [*records, *dirs]:
        if rel.split("/", 1)[0] in RESERVED_NAMES:
            raise UnsafeEntryError(f"{DIGESTS_FILE} lists {rel!r}, a name reserved for the store")
    return records, [str(d) for d in dirs]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a restore: its ~100,000 short-lived objects (headers, names,
    tuples; no cycles) triggered a collection every 700 allocations, each also walking the ~12,000 records
    of the digest list (~0.1 s of a restore). Whatever cycles it does leave are collected afterwards."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class RemoteStore:
    """BuildStore: local first, then the service; pushes what is built."""

    def __init__(self, local: LocalStore, client: CacheClient, push: bool = True) -> None:
        self.local = local
        self.client = client
        self.push_enabled = push and bool(client.config.token)
        self.root = local.root

    def __repr__(self) -> str:
        return f"RemoteStore({self.local!r}, {self.client.config.url!r})"

    # -- BuildStore ---------------------------------------------------------------------------

    def get(self, key: str) -> Path | None:
        found = self.local.get(key)
        if found is not None:
            return found
        try:
            return self.restore(key)
        except Exception as exc:
            warn(f"shared build cache {self.client.config.url}: look-up of {key[:12]} failed ({exc}); a miss")
            return None

    def put(self, key: str, outputs: Path, manifest: Mapping[str, str], *, move: bool = False) -> Path:
        entry = self.local.put(key, outputs, manifest, move=move)
        if self.push_enabled:
            try:
                self.push(key, entry)
            except Exception as exc:
                warn(f"could not push build {key[:12]} to {self.client.config.url}: {exc}")
        return entry

    def manifests(self) -> Iterator[tuple[str, dict[str, str]]]:
        return self.local.manifests()

    def get_alias(self, request_key: str) -> str | None:
        found = self.local.get_alias(request_key)
        if found is not None:
            return found
        try:
            return self.client.get_alias(request_key)
        except Exception as exc:
            warn(f"shared build cache {self.client.config.url}: alias look-up failed ({exc})")
            return None

    def put_alias(self, request_key: str, key: str) -> None:
        self.local.put_alias(request_key, key)
        if self.push_enabled:
            try:
                self.client.put_alias(request_key, key)
            except Exception as exc:
                warn(f"could not push a build alias to {self.client.config.url}: {exc}")

    def lock(self, key: str) -> AbstractContextManager[None]:
        return self.local.lock(key)

    # -- transfer -----------------------------------------------------------------------------

    def restore(self, key: str) -> Path | None:
        """Download a remote entry into the local store (verified, published atomically); None on a miss."""
        with _gc_paused():
            return self._restore(key)

    def _restore(self, key: str) -> Path | None:
        doc = self.client.get_manifest(key)
        if doc is None:
            return None
        started = time.monotonic()
        outputs = {output["name"]: output for output in doc["outputs"]}
        listing = outputs.pop(DIGESTS_FILE, None)
        if listing is None:
            console.print(
                f"[dim]shared build cache: build {key[:12]} has no per-file digests (an older client pushed "
                "it); not trusted, a miss[/]"
            )
            return None
        records, dirs = parse_digests(
            self.client.fetch_bytes(listing["sha256"], listing["size"], MAX_DIGESTS_BYTES), key
        )
        staging = Path(tempfile.mkdtemp(prefix=f"restore-{key[:12]}.", dir=self.local.tmp_dir))
        try:
            # the largest output (kbuild/'s tar: ~11,600 files) in this thread with one writer for it (each
            # directory made and opened once), the others meanwhile in another thread (the downloads and
            # their hashing and writing mostly release the GIL), each with its own TreeWriter
            largest = max(outputs, key=lambda name: int(outputs[name]["size"]), default=None)
            written = WrittenTree()  # what was written and verified, for the publish (no second scan)
            with TreeWriter(staging, written=written) as writer:
                with ThreadPoolExecutor(1, "kci-restore-rest") as rest:
                    others = rest.submit(self._restore_outputs, outputs, largest, staging, records, written)
                    total = 0
                    if largest is not None:
                        total += self._restore_output(outputs[largest], largest, staging, records, writer)
                    total += others.result()
                # the listed directories a tar did not bring (a tar holds every directory of its output,
                # made as its member arrives, while the writer threads write the files before it)
                for rel in dirs:
                    writer.directory(tuple(rel.split("/")))  # each was checked by parse_digests
            # every file was checked against records before it was written, and written recorded each one:
            # put publishes from that record; not durable: it can be downloaded again and every use
            # re-verifies it (cachestore)
            entry = self.local.put(
                key,
                staging,
                doc.get("inputs", {}),
                move=True,
                expected=records,
                verified=True,
                durable=False,
                written=written,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        seconds = time.monotonic() - started
        console.print(
            f"[green]shared build cache hit[/]: {key[:16]} downloaded from {self.client.config.url} "
            f"({total / 1e6:.1f} MB in {seconds:.1f} s)"
        )
        return entry

    def _restore_outputs(
        self,
        outputs: Mapping[str, Mapping[str, Any]],
        skip: str | None,
        staging: Path,
        records: Mapping[str, FileRecord],
        written: WrittenTree,
    ) -> int:
        """Every output but skip into staging, one after the other (one TreeWriter of this thread); their
        total size."""
        with TreeWriter(staging, written=written) as writer:
            return sum(
                self._restore_output(output, name, staging, records, writer)
                for name, output in outputs.items()
                if name != skip
            )

    def _restore_output(
        self,
        output: Mapping[str, Any],
        name: str,
        staging: Path,
        records: Mapping[str, FileRecord],
        writer: TreeWriter,
    ) -> int:
        """One output of the manifest into staging, checked (see restore); its size."""
        parts = check_rel_path(name, "output name")
        if parts[0] in RESERVED_NAMES:
            raise UnsafeEntryError(f"the service sent an unsafe output name {name!r}")
        if output.get("kind") == "tar":
            if len(parts) != 1:
                raise UnsafeEntryError(f"tar output {name!r} must be a top-level name")
            # unpacked while it streams in (no temporary copy), every member checked; the blob's digest is
            # checked at the end: any failure discards the whole staging directory
            self.client.extract(output["sha256"], output["size"], staging, name, records, writer)
        else:
            self._download_file(output, name, parts, records, writer)
        return int(output["size"])

    def _download_file(
        self,
        output: Mapping[str, Any],
        name: str,
        parts: tuple[str, ...],
        records: Mapping[str, FileRecord],
        writer: TreeWriter,
    ) -> None:
        """A plain-file output into staging: it must be listed, with the blob's digest and size."""
        record = records.get(name)
        if record is None or (record["sha256"], record["size"]) != (output["sha256"], output["size"]):
            raise UnsafeEntryError(f"output {name!r} does not match the entry's per-file digests")
        # TreeWriter refuses a symlink on the way (there is none: staging never gets one) or a second copy;
        # a failure leaves a partial file in staging, which is discarded as a whole
        with writer.create(parts, record["mode"]) as out:
            self.client.download(output["sha256"], output["size"], out)
        if writer.written is not None:
            writer.written.file(name)

    def pack(self, entry: Path, workdir: Path) -> list[tuple[dict[str, Any], Path]]:
        """The outputs of an entry as (output record, file to upload) pairs; tars and the per-file digests
        are written to workdir. Every file must still match the entry's entry.json."""
        info = read_entry_info(entry)
        if info is None:
            raise CacheStoreError(
                f"cannot push {entry}: no valid {ENTRY_FILE} of entry format {ENTRY_SCHEMA}"
            )
        records = {rel: check_record(rel, record) for rel, record in info["files"].items()}
        packed: list[tuple[dict[str, Any], Path]] = []
        for child in sorted(entry.iterdir()):
            name = child.name
            if name in RESERVED_NAMES:
                continue
            if child.is_symlink():
                raise CacheStoreError(f"cannot push {entry}: top-level symlink {name}")
            if child.is_dir() and name in FILE_BY_FILE_DIRS:
                for path in sorted(p for p in child.rglob("*") if p.is_file() and not p.is_symlink()):
                    packed.append(self._record(path.relative_to(entry).as_posix(), path, "file", records))
            elif child.is_dir():
                tar_path = workdir / f"{name}.tar"
                with open(tar_path, "wb") as out:
                    digest, size = write_tar(child, name, out, records)
                packed.append(({"name": name, "sha256": digest, "size": size, "kind": "tar"}, tar_path))
            elif child.is_file():
                packed.append(self._record(name, child, "file", records))
        digests = workdir / DIGESTS_FILE
        document = {
            "schema": ENTRY_SCHEMA,
            "key": info["key"],
            "files": records,
            "dirs": info.get("dirs", []),
        }
        digests.write_text(json.dumps(document, sort_keys=True, separators=(",", ":")))
        packed.append(self._record(DIGESTS_FILE, digests, "file"))
        return packed

    @staticmethod
    def _record(
        name: str, path: Path, kind: str, records: Mapping[str, FileRecord] | None = None
    ) -> tuple[dict[str, Any], Path]:
        digest, size = file_digest(path)
        if records is not None:
            record = records.get(name)
            if record is None or (record["sha256"], record["size"]) != (digest, size):
                raise CacheStoreError(f"cannot push {path}: it does not match the entry's {ENTRY_FILE}")
        return {"name": name, "sha256": digest, "size": size, "kind": kind}, path

    def push(self, key: str, entry: Path) -> str:
        """Upload the entry's missing blobs, then its manifest; returns the service's status."""
        started = time.monotonic()
        inputs = json.loads((entry / MANIFEST_FILE).read_text())
        metadata_path = entry / "metadata.json"
        metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
        workdir = Path(tempfile.mkdtemp(prefix=f"push-{key[:12]}.", dir=self.local.tmp_dir))
        try:
            packed = self.pack(entry, workdir)
            missing = set(self.client.missing([record["sha256"] for record, _ in packed]))
            sent = 0
            for record, path in packed:
                if record["sha256"] in missing:
                    self.client.put_blob(record["sha256"], record["size"], path)
                    missing.discard(record["sha256"])
                    sent += record["size"]
            doc = {"outputs": [record for record, _ in packed], "inputs": inputs, "metadata": metadata}
            status = self.client.put_manifest(key, doc)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        console.print(
            f"pushed build {key[:16]} to {self.client.config.url}: {status} "
            f"({sent / 1e6:.1f} MB uploaded in {time.monotonic() - started:.1f} s)"
        )
        return status

    def push_run(
        self, key: str, run_id: str, junit: Path | None, console_log: Path | None, outcome: str | None = None
    ) -> dict[str, Any]:
        """Attach a test run's JUnit XML and console log to a published build."""
        doc: dict[str, Any] = {}
        if outcome:
            doc["outcome"] = outcome
        for part, path in (("junit", junit), ("console", console_log)):
            if path is None or not path.is_file():
                continue
            digest, size = file_digest(path)
            if self.client.missing([digest]):
                self.client.put_blob(digest, size, path)
            doc[part] = {"sha256": digest, "size": size}
        return self.client.put_run(key, run_id, doc)


def attach_test_run(store: object, kernel_dir: Path, output: Path, outcome: str) -> None:
    """After `kernel-ci test`: attach the run's JUnit XML and console log to the build on the service."""
    if not isinstance(store, RemoteStore) or not store.push_enabled:
        return
    try:
        key = json.loads((kernel_dir / "metadata.json").read_text())["build_key"]
        run_dir = (output / "latest").resolve()
        run_id = re.sub(r"[^A-Za-z0-9._-]", "-", run_dir.name).lstrip(".-_")[:64] or "run"
        done = store.push_run(key, run_id, run_dir / "junit.xml", run_dir / "console.log", outcome)
        counts = done.get("counts") or {}
        console.print(
            f"attached test run {run_id} to build {key[:16]} on {store.client.config.url} "
            f"({counts.get('passed', 0)} passed, {counts.get('failed', 0) + counts.get('errors', 0)} failed)"
        )
    except Exception as exc:
        warn(f"could not attach the test run to the shared build cache: {exc}")


def open_store(settings: Settings, local: LocalStore | None = None) -> LocalStore | RemoteStore:
    """The build store the CLI hands to kernel_ci.flow.build.build: remote-backed when one is configured.

    The ccache remote storage travels apart, in the BuildRequest (settings.ccache_remote: read-only unless
    --trusted-ccache-writes), never through this process's environment.
    """
    local = local or LocalStore(settings.cache_root / "builds")
    config = RemoteConfig.from_settings(settings)
    if config is None:
        return local
    if not config.token:
        console.print(f"[dim]shared build cache {config.url}: read-only (no {TOKEN_ENV})[/]")
    return RemoteStore(local, CacheClient(config))
