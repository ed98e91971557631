"""The tar blobs of a build cache entry: written by the pusher (``write_tar``), read and extracted by a
restore (``extract_blob``, ``extract_members``), by hand for the subset an entry's tar holds.

Why by hand and not tarfile: tarfile spends ~40 us of Python per member (header objects, copies, its own
file object per member): 0.5 s of a restore of kbuild/'s 11,600 members, and ~4 s of a push. The reader
takes only what ``write_tar`` writes (ustar headers checked against their checksums, PAX
``path``/``size``/``mtime`` records) and refuses everything else (links, devices, sparse or GNU members,
global PAX headers), which the restore refused anyway once tarfile had parsed it. ``write_tar`` writes that
subset byte for byte as tarfile's PAX format did, so blobs pushed by older clients still deduplicate.

Trust: a blob comes from the service, where anyone with a write token can publish any bytes. Every member
is checked against the entry's digest list (name, size, mode, sha256) before it is written, and written
by ``cachestore.TreeWriter`` (never through a symlink, never over an existing file); see cache/remote.py
for the restore around it and SECURITY.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import struct
import tarfile
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from kernel_ci.build.layout import honest_links
from kernel_ci.cache.store import (
    ENTRY_FILE,
    CacheStoreError,
    FileRecord,
    TreeWriter,
    UnsafeEntryError,
    WrittenTree,
    check_rel_path,
    create_file_at,
    write_all,
)

CHUNK = 1024 * 1024

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


class Blob:
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


def _members(blob: Blob) -> Iterator[_Member]:
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
    extract_blob(Blob(chunks, None, f"tar of {output}"), destination, output, records, writer)


def extract_blob(
    blob: Blob,
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
    blob: Blob, parent: int, parts: tuple[str, ...], member: _Member, record: FileRecord
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
