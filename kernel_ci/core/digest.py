"""The one sha256-of-a-file helper: the build cache, the cache service, the source download and the rootfs
key all hash files the same way (streamed in chunks, so a 100 MiB tarball is never read whole).

hashlib.file_digest (3.11) streams too but does not count bytes, which the cache's uploads need.

tree_digest: the same for a whole folder (the reuse keys of kselftests and external modules).
SourceDigests: tree_digest remembered for a folder whose name says its content (kernel-ci's own trees).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


def sha256_stream(handle: BinaryIO) -> tuple[str, int]:
    """(hex sha256, bytes read) of what is left in handle."""
    digest = hashlib.sha256()
    size = 0
    while chunk := handle.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def file_digest(path: Path) -> tuple[str, int]:
    """(hex sha256, size) of a file."""
    with open(path, "rb") as handle:
        return sha256_stream(handle)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file."""
    return file_digest(path)[0]


def tree_digest(root: Path, parts: Iterable[str] = ("",)) -> str:
    """The hex sha256 of everything under root/part for each part (a folder, a file, or absent), for keys
    that must change whenever any byte there does: every entry's path relative to root, its kind, and a
    file's content and executable bit, a symlink's target (never followed), an absent part as such.
    Walked in sorted order, so the digest does not depend on the order the filesystem lists entries in."""
    digest = hashlib.sha256()

    def add(*fields: str) -> None:
        digest.update("\0".join(fields).encode("utf-8", "surrogateescape") + b"\n")

    def visit_dir(path: str, name: str) -> None:
        add("dir", name)
        with os.scandir(path) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
        for entry in entries:
            child = f"{name}/{entry.name}" if name else entry.name
            if entry.is_symlink():
                add("link", child, os.readlink(entry.path))
            elif entry.is_dir(follow_symlinks=False):
                visit_dir(entry.path, child)
            elif entry.is_file(follow_symlinks=False):
                mode = entry.stat(follow_symlinks=False).st_mode
                add("file", child, oct(mode & 0o111), sha256_file(Path(entry.path)))
            else:
                add("other", child)

    for part in parts:
        path = root / part if part else root
        name = path.relative_to(root).as_posix() if part else ""
        if path.is_symlink():
            add("link", name, os.readlink(path))
        elif path.is_dir():
            visit_dir(os.fspath(path), name)
        elif path.is_file():
            add("file", name, oct(path.stat().st_mode & 0o111), sha256_file(path))
        else:
            add("other" if path.exists() else "absent", name)
    return digest.hexdigest()


@dataclass(frozen=True)
class SourceDigests:
    """Digests of parts of a source tree; remembered in memo (a JSON file) when there is one.

    Only for a tree that never changes under its name: kernel-ci's own patched trees, named by a digest
    of their source tarball and patches, which every key already trusts them to hold (the build key is
    computed from those, never from the tree's files). Their configure and kselftest digests (~20,000
    files read on every build) are then computed once per tree. A user's tree (--tree) has no memo: its
    files are read every time."""

    root: Path
    memo: Path | None = None

    def digest(self, name: str, parts: Callable[[], Iterable[str]]) -> str:
        """tree_digest(root, parts()) under name (the same name must always mean the same parts)."""
        known = self._read()
        if name in known:
            return known[name]
        value = tree_digest(self.root, list(parts()))
        if self.memo is not None:
            self._write(known | {name: value})
        return value

    def _read(self) -> dict[str, str]:
        if self.memo is None:
            return {}
        try:
            data = json.loads(self.memo.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}

    def _write(self, known: dict[str, str]) -> None:
        assert self.memo is not None
        tmp = self.memo.with_name(f".{self.memo.name}.{os.getpid()}.tmp")
        try:  # only a saving: a failed write computes the digest again next time
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
            os.replace(tmp, self.memo)
        except OSError:
            tmp.unlink(missing_ok=True)
