"""ccache answers kept in a worker's memory: key -> the answer of a verified read, for small objects.

A hit served from disk costs a SQLite read transaction and an open/fstat/read/close; from here, a dict
look-up and an 8-byte compare. What keeps it exact is the index's change generation (generation.py):
an answer is kept with the counter value read BEFORE the index look-up that produced it, and served
only while the counter still has that value. Every change of an existing key's answer, in any process
(another worker, `cache scrub`), moves the counter; a miss is never kept, so a put of a new key needs no
change. The bytes kept are those the normal read returned (verified, see blobs.py).

Bounded in bytes (least recently served out first) and per object. Only the event loop's thread uses
it (the ccache fast path answers there, without awaiting between its look-up and its ``put``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, NamedTuple, TypeVar

from kernel_ci.cache.server.generation import Generation

T = TypeVar("T")
ENTRY_OVERHEAD = 200  # bytes counted per entry besides the object (key, tuple, dict slot)


class _Kept(NamedTuple, Generic[T]):
    generation: bytes
    answer: T
    size: int


class AnswerCache(Generic[T]):
    def __init__(self, generation: Generation, max_bytes: int = 64 << 20, max_object: int = 1 << 20) -> None:
        self.generation = generation
        self.max_bytes = max_bytes
        self.max_object = max_object
        self.used = 0
        self._kept: OrderedDict[str, _Kept[T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, key: str) -> T | None:
        kept = self._kept.get(key)
        if kept is None:
            return None
        if kept.generation == self.generation.current():
            self._kept.move_to_end(key)
            return kept.answer
        self._drop_stale()  # the index changed: every answer kept before the change is useless now
        return None

    def snapshot(self) -> bytes | None:
        """The counter to read BEFORE a look-up whose answer may be kept; None: a change is committing
        (keep nothing)."""
        value = self.generation.current()
        return value if Generation.stable(value) else None

    def put(self, key: str, generation: bytes, answer: T, size: int) -> None:
        """Keep the answer of a look-up made after ``generation`` was read (``snapshot``)."""
        if size > self.max_object:
            return
        self._remove(key)
        self._kept[key] = _Kept(generation, answer, size)
        self.used += size + ENTRY_OVERHEAD
        while self.used > self.max_bytes and self._kept:
            self._remove(next(iter(self._kept)))

    def _remove(self, key: str) -> None:
        kept = self._kept.pop(key, None)
        if kept is not None:
            self.used -= kept.size + ENTRY_OVERHEAD

    def _drop_stale(self) -> None:
        current = self.generation.current()
        for key in [k for k, kept in self._kept.items() if kept.generation != current]:
            self._remove(key)
