"""The SQLite index's change generation: one 64-bit counter in a small file next to the index, mapped
into memory by every process that opens the index (each worker of `serve --workers N`, `cache scrub`).

It is what lets a worker keep ccache answers in memory (memory.py) without serving bytes that another
process has since replaced or removed. It works like a sequence lock:

- a writer whose transaction changes what an existing ccache key answers (a key re-pointed to another
  digest, a key deleted or evicted, a blob forgotten as corrupt or missing) calls ``begin`` INSIDE its
  write transaction, before COMMIT: the counter becomes odd; then ``end`` after COMMIT (or ROLLBACK):
  the counter becomes even again, and different from any value it had before;
- a reader reads the counter BEFORE its index look-up and keeps an answer only if that value was even;
  it serves a kept answer only while the counter still has that very value.

Why that is enough: if the reader's look-up saw the row as it was before a writer's change, the look-up
ran before that writer's COMMIT, hence the reader's counter read before the writer's ``end``; either
it read before ``begin`` (then the counter has changed since, and the answer is never served), or it
read the odd value (then the answer is never kept). From ``begin`` on, no kept answer matches an odd
counter, so nothing is served from memory while the change commits; from ``end`` on, nothing kept
before matches. A writer that dies between ``begin`` and ``end`` leaves the counter odd: memory answers
stop (safe) until the next writer's ``end`` or the next process that opens the index (``__init__``).

Writers take a thread lock and ``flock`` from ``begin`` to ``end`` (two changes never interleave their
odd/even steps); they take them inside SQLite's write transaction, which already serialises writers,
so the order of the locks is always the same (no deadlock). Readers take no lock: the 8 bytes are
copied from an aligned address by an 8-byte memcpy (one load on x86-64 and arm64); even if a copy tore,
the counter only grows by 1 or 2 per step, so its high half changes once in 2**31 changes.

The counter starts at 0 in a new file. The file belongs to the index: deleting it while services run
is like deleting the index (processes keep the old file mapped and no longer see each other's changes).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from pathlib import Path

SIZE = 8


class Generation:
    """The shared counter of one index (see the module's docstring for the protocol)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._lock = threading.Lock()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if os.fstat(self._fd).st_size < SIZE:
                os.ftruncate(self._fd, SIZE)  # zeros: an even counter
            self._map = mmap.mmap(self._fd, SIZE)
            if self._map[0] & 1:  # a writer died between begin and end (we hold the lock: none is active)
                self._set(self._value() + 1)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def current(self) -> bytes:
        """The counter as it is now, as 8 bytes (compared as they are: cheaper than an int)."""
        return self._map[:SIZE]

    @staticmethod
    def stable(value: bytes) -> bool:
        """Whether no change was committing when ``value`` was read (an even counter)."""
        return not value[0] & 1

    def begin(self) -> None:
        """Inside a write transaction that changes an existing key's answer, before its COMMIT."""
        self._lock.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._lock.release()
            raise
        value = self._value()
        self._set(value + (2 if value & 1 else 1))  # odd, and never a value seen before

    def end(self) -> None:
        """After that transaction's COMMIT or ROLLBACK (always, once per ``begin``)."""
        try:
            self._set(self._value() + 1)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._lock.release()

    def _value(self) -> int:
        return int.from_bytes(self._map[:SIZE], "little")

    def _set(self, value: int) -> None:
        self._map[:SIZE] = (value % (1 << 64)).to_bytes(SIZE, "little")

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
