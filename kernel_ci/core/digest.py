"""The one sha256-of-a-file helper: the build cache, the cache service, the source download and the rootfs
key all hash files the same way (streamed in chunks, so a 100 MiB tarball is never read whole).

hashlib.file_digest (3.11) streams too but does not count bytes, which the cache's uploads need.
"""

from __future__ import annotations

import hashlib
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
