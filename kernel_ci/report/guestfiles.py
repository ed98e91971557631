"""Read what an untrusted guest left in the results share, without trusting any of it.

The guest runs patch authors' tests as root and can leave anything in the share: symlinks to host files,
FIFOs, device nodes, sparse files of any size, names with control characters, directories nested without
end. The host reads the share only through this module:

- every path component is opened relative to its parent's descriptor with O_NOFOLLOW, so no symlink
  (at any level) can point the host at another file;
- an entry is lstat'ed before it is opened and only a regular file or directory is opened at all
  (opening a device can have side effects; O_NONBLOCK covers a swap to a FIFO between the two calls),
  then fstat must agree (same inode, still regular);
- at most a caller-given number of bytes is read, and whether the file was cut is returned;
- names are checked (one printable component, no `.`/`..`) before they are shown or used;
- walks are bounded in depth and entries.

pathlib follows symlinks and reads whole files, which is why this is hand-written. Under the 9p
`mapped-xattr` model (kernel_ci/guest/qemu.py) guest symlinks and devices are already plain files on the
host; the
mode the guest gave them is in the `user.virtfs.mode` xattr, which is checked too, so the report says
"a symlink" under either model.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MAX_DEPTH = 16  # directory levels a walk enters below its root
MAX_NAME_BYTES = 255
VIRTFS_MODE_XATTR = "user.virtfs.mode"  # QEMU 9p mapped-xattr: the guest's st_mode, 32-bit little endian
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISLNK, "a symlink"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


class GuestFileError(Exception):
    """An entry the host will not read; the message names what it is (\"a symlink\", \"a FIFO\")."""


@dataclass(frozen=True)
class GuestFile:
    data: bytes  # at most the limit asked for
    size: int  # the file's size on the host
    truncated: bool

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclass
class Walk:
    """A bounded walk: regular files (relative path, size), entries refused with why, what was cut."""

    files: list[tuple[str, int]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)
    full: bool = False  # max_files reached: nothing more was looked at


def invalid_name(name: str) -> str | None:
    """Why name is not acceptable as one entry name from the guest, or None when it is."""
    if name in ("", ".", ".."):
        return "empty, '.' or '..'"
    if "/" in name:
        return "more than one path component"
    if not name.isprintable():  # control characters, and undecodable bytes (surrogate escapes)
        return "not printable"
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes"
    return None


def describe(mode: int) -> str:
    """What a non-regular entry is, in words."""
    return next((what for test, what in _KINDS if test(mode)), f"not a regular file (mode {mode:o})")


def safe_repr(name: str) -> str:
    """A name from the guest, escaped so that it can be printed and put in XML."""
    return ascii(name)[1:-1] if invalid_name(name) else name


def _guest_mode(fd: int) -> int | None:
    """The st_mode the guest gave this entry (mapped-xattr), or None when the host made it."""
    try:
        raw = os.getxattr(fd, VIRTFS_MODE_XATTR)
    except OSError:
        return None
    return int.from_bytes(raw[:4], "little") if len(raw) >= 4 else None


def _check_kind(fd: int, want_dir: bool) -> os.stat_result:
    st = os.fstat(fd)
    ok = stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)
    if not ok:
        raise GuestFileError(describe(st.st_mode))
    mode = _guest_mode(fd)
    if mode is not None and stat.S_IFMT(mode) and stat.S_IFMT(mode) != stat.S_IFMT(st.st_mode):
        raise GuestFileError(f"{describe(mode)} (as the guest made it)")
    return st


def open_entry(dir_fd: int, name: str, want_dir: bool) -> int:
    """Open one entry of dir_fd: lstat first (a device or FIFO is never opened), then O_NOFOLLOW."""
    reason = invalid_name(name)
    if reason is not None:
        raise GuestFileError(f"a name that is {reason}")
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)  # FileNotFoundError: absent
    want = stat.S_ISDIR if want_dir else stat.S_ISREG
    if not want(st.st_mode):
        raise GuestFileError(describe(st.st_mode))
    try:
        fd = os.open(name, _OPEN_DIR if want_dir else _OPEN_FILE, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
            raise GuestFileError("replaced while it was opened") from exc
        raise
    try:
        opened = _check_kind(fd, want_dir)
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            raise GuestFileError("replaced while it was opened")
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def open_dir(root: Path, parts: Sequence[str] = ()) -> Iterator[int]:
    """A descriptor of root/parts...: root is the host's own path; each part is the guest's and is
    entered with O_NOFOLLOW. Raises FileNotFoundError when absent, GuestFileError when refused."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            try:
                child = open_entry(fd, part, want_dir=True)
            except GuestFileError as exc:
                raise GuestFileError(f"{safe_repr(part)}/ is {exc}") from None
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def read_at(dir_fd: int, name: str, limit: int) -> GuestFile:
    """At most limit bytes of the regular file name in dir_fd. FileNotFoundError when absent,
    GuestFileError when it is anything but a regular file."""
    fd = open_entry(dir_fd, name, want_dir=False)
    try:
        size = os.fstat(fd).st_size
        chunks: list[bytes] = []
        left = limit
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        return GuestFile(data, size, size > len(data))
    finally:
        os.close(fd)


def read_under(dir_fd: int, parts: Sequence[str], limit: int) -> GuestFile:
    """read_at for dir_fd/parts[0]/.../parts[-1], every component entered with O_NOFOLLOW."""
    *dirs, name = parts
    fd = os.dup(dir_fd)
    try:
        for part in dirs:
            child = open_entry(fd, part, want_dir=True)
            os.close(fd)
            fd = child
        return read_at(fd, name, limit)
    finally:
        os.close(fd)


def walk(dir_fd: int, *, max_files: int, max_depth: int = MAX_DEPTH) -> Walk:
    """The regular files under dir_fd (sorted, relative paths), never following a symlink, at most
    max_files of them and max_depth directory levels; what was refused or cut is said."""
    found = Walk()
    _walk(dir_fd, "", max_files, max_depth, found)
    return found


def _walk(dir_fd: int, prefix: str, max_files: int, depth_left: int, found: Walk) -> None:
    try:
        with os.scandir(dir_fd) as entries:
            names = sorted(entry.name for entry in entries)
    except OSError as exc:
        found.refused.append(f"{prefix or './'}: cannot be listed: {exc.strerror}")
        return
    for name in names:
        if found.full:
            return
        shown = prefix + safe_repr(name)
        if len(found.files) >= max_files:
            found.full = True
            found.cut.append(f"listed {max_files} files; {shown} and the rest not listed")
            return
        reason = invalid_name(name)
        if reason is not None:
            found.refused.append(f"{shown}: a name that is {reason}, not read")
            continue
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            found.refused.append(f"{shown}: {exc.strerror}")
            continue
        if stat.S_ISDIR(st.st_mode):
            if depth_left <= 0:
                found.cut.append(f"{shown}/: deeper than {MAX_DEPTH} levels, not entered")
                continue
            try:
                child = open_entry(dir_fd, name, want_dir=True)
            except (OSError, GuestFileError) as exc:
                found.refused.append(f"{shown}: {exc}, not read")
                continue
            try:
                _walk(child, f"{shown}/", max_files, depth_left - 1, found)
            finally:
                os.close(child)
        elif stat.S_ISREG(st.st_mode):
            try:  # opened (it is a regular file: no side effect) for the guest's own idea of it
                os.close(open_entry(dir_fd, name, want_dir=False))
            except (OSError, GuestFileError) as exc:
                found.refused.append(f"{shown}: {exc}, not read")
                continue
            found.files.append((shown, st.st_size))
        else:
            found.refused.append(f"{shown}: {describe(st.st_mode)}, not read")
