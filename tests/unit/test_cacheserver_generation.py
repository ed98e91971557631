"""The SQLite index's change generation (cache/server/generation.py), the lock that keeps ccache answers in a
worker's memory exact: odd while a change commits, a new even value after it, in every process sharing the
index; a writer that dies mid-change leaves memory answers off until the index is opened again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kernel_ci.cache.server.generation import Generation
from kernel_ci.cache.server.index import SqliteIndex
from kernel_ci.cache.server.memory import AnswerCache
from tests.cacheservice import REPO

KEY = "k" * 33
DIGEST, OTHER = "a" * 64, "b" * 64


def test_a_change_is_seen_by_another_opening_of_the_index_while_it_commits_and_after(tmp_path: Path) -> None:
    writer, reader = SqliteIndex(tmp_path / "index.sqlite3"), SqliteIndex(tmp_path / "index.sqlite3")
    memory: AnswerCache[bytes] = AnswerCache(reader.generation)
    writer.ccache_put(KEY, DIGEST, 3)
    before = memory.snapshot()
    assert before is not None
    memory.put(KEY, before, b"old", 3)
    assert memory.get(KEY) == b"old"
    with writer._tx(write=True) as tx:
        writer._invalidate(tx)
        tx.x("UPDATE ccache SET digest = ? WHERE key = ?", (OTHER, KEY))
        # not committed yet: nothing is served from memory, and nothing read now may be kept
        assert memory.get(KEY) is None and memory.snapshot() is None
    after = memory.snapshot()
    assert after is not None and after != before and len(memory) == 0


def test_only_changes_of_existing_answers_move_the_generation(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "index.sqlite3")
    start = index.generation.current()
    index.ccache_put(KEY, DIGEST, 3)  # a new key: nobody kept its (missing) answer
    index.ccache_put(KEY, DIGEST, 3)  # the same bytes again
    assert not index.ccache_delete("x" * 33)
    assert index.generation.current() == start
    index.ccache_put(KEY, OTHER, 3)
    replaced = index.generation.current()
    assert replaced != start and Generation.stable(replaced)
    assert index.ccache_delete(KEY)
    assert index.generation.current() != replaced


def test_a_writer_that_dies_mid_change_stops_memory_answers_until_the_index_is_opened_again(
    tmp_path: Path,
) -> None:
    path = tmp_path / "index.sqlite3"
    index = SqliteIndex(path)
    memory: AnswerCache[bytes] = AnswerCache(index.generation)
    dying = (
        "import os, sys; from pathlib import Path; from kernel_ci.cache.server.index import SqliteIndex\n"
        "index = SqliteIndex(Path(sys.argv[1])); index.generation.begin(); os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", dying, str(path)], cwd=REPO, check=True, timeout=60)
    assert memory.snapshot() is None  # odd: a change may have committed, nothing is kept or served
    SqliteIndex(path)  # the next process to open the index (a restarted worker) ends the dead change
    assert memory.snapshot() is not None


def test_memory_is_bounded_in_bytes_least_recently_served_out_first(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "index.sqlite3")
    memory: AnswerCache[bytes] = AnswerCache(index.generation, max_bytes=3 * (1000 + 200), max_object=1000)
    generation = memory.snapshot()
    assert generation is not None
    for name in "abc":
        memory.put(name, generation, name.encode() * 1000, 1000)
    assert memory.get("a") == b"a" * 1000  # served: now the most recent
    memory.put("d", generation, b"d" * 1000, 1000)  # one too many: "b", the least recently served, goes
    assert [memory.get(name) is not None for name in "abcd"] == [True, False, True, True]
    memory.put("big", generation, b"x" * 1001, 1001)  # over max_object: never kept
    assert memory.get("big") is None and len(memory) == 3 and memory.used <= memory.max_bytes
