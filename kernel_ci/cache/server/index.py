"""The index: build key -> manifest, blob sizes and references, LRU access times, pins, ccache key -> blob.

One SQL implementation over two engines: SQLite (default, a file next to the blobs, zero set-up) and
PostgreSQL (``postgresql://...``: several stateless service replicas share it). Blobs are only deleted
when nothing references them (no build, no test run, no ccache key) and they are older than a grace
period (so that a blob uploaded for a manifest that is not published yet survives eviction).

One clock: every time the index stores or compares (created, last access, the garbage collector's cut-off)
is the database's own ``now`` (``NOW`` below), never a replica's ``time.time()``: replicas whose clocks
disagree would otherwise collect each other's fresh uploads. Publishing a blob's bytes and deleting them
both happen inside the index transaction that records it, under the reference lock, so that a blob
re-uploaded while the collector deletes it is either kept by the collector or re-published after it.

Failures are typed for HTTP: an unreachable or locked database is ``IndexError_`` 503, a full disk 507;
a transaction whose COMMIT fails is rolled back, so the connection is never left inside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kernel_ci.cache.server.generation import Generation

log = logging.getLogger("kernel_ci.cacheserver")
NOW = "{now}"  # replaced by each engine's expression for "seconds since the epoch, database clock"

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS blobs (
        digest TEXT PRIMARY KEY, size BIGINT NOT NULL, created DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS builds (
        key TEXT PRIMARY KEY, doc TEXT NOT NULL, inputs TEXT NOT NULL, summary TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL, last_access DOUBLE PRECISION NOT NULL,
        pinned INTEGER NOT NULL DEFAULT 0, bytes BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS builds_created ON builds (created)",
    "CREATE INDEX IF NOT EXISTS builds_access ON builds (last_access)",
    """CREATE TABLE IF NOT EXISTS refs (
        key TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (key, digest))""",
    "CREATE INDEX IF NOT EXISTS refs_digest ON refs (digest)",
    """CREATE TABLE IF NOT EXISTS runs (
        key TEXT NOT NULL, run_id TEXT NOT NULL, doc TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (key, run_id))""",
    """CREATE TABLE IF NOT EXISTS ccache (
        key TEXT PRIMARY KEY, digest TEXT NOT NULL, size BIGINT NOT NULL,
        last_access DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS ccache_digest ON ccache (digest)",
    "CREATE INDEX IF NOT EXISTS ccache_access ON ccache (last_access)",
    "CREATE TABLE IF NOT EXISTS aliases (request_key TEXT PRIMARY KEY, key TEXT NOT NULL)",
]


@dataclass
class BuildRow:
    key: str
    doc: dict[str, Any]
    created: float
    last_access: float
    pinned: bool
    bytes: int
    runs: list[dict[str, Any]]


@dataclass
class BuildSummary:
    key: str
    summary: dict[str, Any]
    created: float
    pinned: bool
    bytes: int
    runs: list[dict[str, Any]]


class Index(Protocol):
    def describe(self) -> str: ...
    def blob_add(self, digest: str, size: int, publish: Callable[[], bool] | None = None) -> bool: ...
    def blob_sizes(self, digests: Iterable[str]) -> dict[str, int]: ...
    def blob_forget(self, digest: str) -> None: ...
    def build_put(
        self, key: str, doc: dict[str, Any], inputs: dict[str, str], summary: dict[str, Any], size: int
    ) -> str: ...
    def build_get(self, key: str) -> BuildRow | None: ...
    def build_list(self, limit: int, offset: int) -> list[BuildSummary]: ...
    def build_count(self) -> int: ...
    def all_inputs(self) -> list[tuple[str, dict[str, str]]]: ...
    def build_pin(self, key: str, pinned: bool) -> bool: ...
    def run_put(self, key: str, run_id: str, doc: dict[str, Any], digests: Sequence[str]) -> str: ...
    def alias_get(self, request_key: str) -> str | None: ...
    def alias_put(self, request_key: str, key: str) -> None: ...
    def ccache_get(self, key: str) -> tuple[str, int] | None: ...
    def ccache_put(self, key: str, digest: str, size: int) -> None: ...
    def ccache_delete(self, key: str) -> bool: ...
    def touch(self, builds: dict[str, float], ccache: dict[str, float]) -> None: ...
    def totals(self) -> dict[str, int]: ...
    def evict_lru(self, count: int) -> list[tuple[str, str]]: ...
    def collect_garbage(self, grace_seconds: float, delete: Callable[[str], None]) -> list[str]: ...
    def all_blobs(self) -> list[str]: ...
    def transaction(self, write: bool = False) -> contextlib.AbstractContextManager[_Tx]: ...
    def close(self) -> None: ...


class _Tx(Protocol):
    def q(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...
    def x(self, sql: str, params: Sequence[Any] = ()) -> int: ...
    def many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...


class IndexError_(RuntimeError):
    """The index database is unusable (bad URL, unreachable server); ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


_TRACK_LOCK = threading.Lock()


class SqlIndex:
    """The index over any DB-API engine; subclasses provide ``_tx`` (a transaction) and ``describe``."""

    now_sql = "0"

    def _tx(self, write: bool = False) -> contextlib.AbstractContextManager[_Tx]:
        raise NotImplementedError

    def transaction(self, write: bool = False) -> contextlib.AbstractContextManager[_Tx]:
        """A transaction for a table of another module (cache.server.history), in the same database."""
        return self._tx(write)

    def _track(self, conn: Any) -> Any:
        """Remember a connection (one per thread) for close()."""
        with _TRACK_LOCK:
            self.__dict__.setdefault("_opened", []).append(conn)
        return conn

    def close(self) -> None:
        """Close every connection this index opened, in any thread; the index is not used afterwards (a
        service closes it when it stops: tests start hundreds in one process)."""
        with _TRACK_LOCK:
            opened, self.__dict__["_opened"] = self.__dict__.get("_opened", []), []
        for conn in opened:
            with contextlib.suppress(Exception):
                conn.close()

    def _now(self, sql: str) -> str:
        return sql.replace(NOW, self.now_sql)

    def _create(self) -> None:
        with self._tx(write=True) as tx:
            for statement in SCHEMA:
                tx.x(statement)

    # -- blobs --------------------------------------------------------------------------------

    def blob_add(self, digest: str, size: int, publish: Callable[[], bool] | None = None) -> bool:
        """Record a blob; ``publish`` (make its bytes visible) runs inside the same transaction, under the
        shared reference lock, so the collector cannot delete the bytes between publishing and recording.
        Returns what publish returned (True: new bytes), True without one."""
        with self._tx(write=True) as tx:
            self._lock_refs(tx, exclusive=False)
            created = publish() if publish is not None else True
            tx.x(
                self._now(
                    f"INSERT INTO blobs (digest, size, created) VALUES (?, ?, {NOW}) "
                    "ON CONFLICT (digest) DO UPDATE SET created = excluded.created"
                ),
                (digest, size),
            )
        return created

    def all_blobs(self) -> list[str]:
        with self._tx() as tx:
            return [str(r[0]) for r in tx.q("SELECT digest FROM blobs ORDER BY digest")]

    def blob_sizes(self, digests: Iterable[str]) -> dict[str, int]:
        wanted = sorted(set(digests))
        found: dict[str, int] = {}
        with self._tx() as tx:
            for start in range(0, len(wanted), 500):
                part = wanted[start : start + 500]
                marks = ",".join("?" * len(part))
                for digest, size in tx.q(f"SELECT digest, size FROM blobs WHERE digest IN ({marks})", part):
                    found[digest] = int(size)
        return found

    def blob_forget(self, digest: str) -> None:
        with self._tx(write=True) as tx:
            if tx.x("DELETE FROM blobs WHERE digest = ?", (digest,)):
                self._invalidate(tx)  # keys using it now answer 404 (ccache_read): memory answers go

    # -- builds -------------------------------------------------------------------------------

    def build_put(
        self, key: str, doc: dict[str, Any], inputs: dict[str, str], summary: dict[str, Any], size: int
    ) -> str:
        """'created', 'exists' (a complete entry is already there: kept), or 'missing:<digests>'."""
        digests = sorted({o["sha256"] for o in doc["outputs"]})
        with self._tx(write=True) as tx:
            self._lock_refs(tx, exclusive=False)
            marks = ",".join("?" * len(digests))
            present = {row[0] for row in tx.q(f"SELECT digest FROM blobs WHERE digest IN ({marks})", digests)}
            missing = [d for d in digests if d not in present]
            if missing:
                return "missing:" + ",".join(missing)
            old = tx.q("SELECT doc FROM builds WHERE key = ?", (key,))
            if old:
                old_digests = {o["sha256"] for o in json.loads(old[0][0])["outputs"]}
                marks_old = ",".join("?" * len(old_digests))
                still = tx.q(
                    f"SELECT count(*) FROM blobs WHERE digest IN ({marks_old})", sorted(old_digests)
                )[0][0]
                if int(still) == len(old_digests):
                    return "exists"
                # the old entry lost a blob (found corrupt and set aside): the new upload replaces it
                tx.x("DELETE FROM builds WHERE key = ?", (key,))
                tx.x("DELETE FROM refs WHERE key = ? AND digest NOT IN (SELECT digest FROM blobs)", (key,))
            inserted = tx.x(
                self._now(
                    "INSERT INTO builds (key, doc, inputs, summary, created, last_access, pinned, bytes) "
                    f"VALUES (?, ?, ?, ?, {NOW}, {NOW}, 0, ?) ON CONFLICT (key) DO NOTHING"
                ),
                (key, json.dumps(doc), json.dumps(inputs), json.dumps(summary), size),
            )
            if not inserted:  # a concurrent publisher (another replica) committed it first: keep theirs
                return "exists"
            tx.many(
                "INSERT INTO refs (key, digest) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [(key, d) for d in digests],
            )
        return "created"

    def _lock_refs(self, tx: _Tx, exclusive: bool) -> None:
        """Serialise reference changes against garbage collection (SQLite: BEGIN IMMEDIATE does it)."""

    def _invalidate(self, tx: _Tx) -> None:
        """This write transaction changes what an existing ccache key answers: called before its COMMIT.
        SQLite: the change generation (generation.py) that the workers' memory answers depend on. The
        PostgreSQL index has none (its replicas are on other hosts: they keep no answers in memory)."""

    def build_get(self, key: str) -> BuildRow | None:
        with self._tx() as tx:
            rows = tx.q("SELECT doc, created, last_access, pinned, bytes FROM builds WHERE key = ?", (key,))
            if not rows:
                return None
            doc, created, last_access, pinned, size = rows[0]
            runs = [json.loads(r[0]) for r in tx.q(_RUNS_SQL + " WHERE key = ? ORDER BY created", (key,))]
        return BuildRow(key, json.loads(doc), created, last_access, bool(pinned), int(size), runs)

    def build_list(self, limit: int, offset: int) -> list[BuildSummary]:
        with self._tx() as tx:
            rows = tx.q(
                "SELECT key, summary, created, pinned, bytes FROM builds "
                "ORDER BY created DESC, key LIMIT ? OFFSET ?",
                (limit, offset),
            )
            result = []
            for key, summary, created, pinned, size in rows:
                runs = [json.loads(r[0]) for r in tx.q(_RUNS_SQL + " WHERE key = ? ORDER BY created", (key,))]
                result.append(BuildSummary(key, json.loads(summary), created, bool(pinned), int(size), runs))
        return result

    def build_count(self) -> int:
        with self._tx() as tx:
            return int(tx.q("SELECT count(*) FROM builds")[0][0])

    def all_inputs(self) -> list[tuple[str, dict[str, str]]]:
        with self._tx() as tx:
            rows = tx.q("SELECT key, inputs FROM builds ORDER BY created DESC, key")
        return [(key, json.loads(inputs)) for key, inputs in rows]

    def build_pin(self, key: str, pinned: bool) -> bool:
        with self._tx(write=True) as tx:
            return tx.x("UPDATE builds SET pinned = ? WHERE key = ?", (1 if pinned else 0, key)) > 0

    def run_put(self, key: str, run_id: str, doc: dict[str, Any], digests: Sequence[str]) -> str:
        """'created', 'replaced', 'no-build' or 'missing:<digests>'."""
        with self._tx(write=True) as tx:
            self._lock_refs(tx, exclusive=False)
            if not tx.q("SELECT 1 FROM builds WHERE key = ?", (key,)):
                return "no-build"
            wanted = sorted(set(digests))
            if wanted:
                marks = ",".join("?" * len(wanted))
                present = {r[0] for r in tx.q(f"SELECT digest FROM blobs WHERE digest IN ({marks})", wanted)}
                missing = [d for d in wanted if d not in present]
                if missing:
                    return "missing:" + ",".join(missing)
            replaced = bool(tx.q("SELECT 1 FROM runs WHERE key = ? AND run_id = ?", (key, run_id)))
            tx.x(
                self._now(
                    f"INSERT INTO runs (key, run_id, doc, created) VALUES (?, ?, ?, {NOW}) "
                    "ON CONFLICT (key, run_id) DO UPDATE SET doc = excluded.doc, created = excluded.created"
                ),
                (key, run_id, json.dumps(doc)),
            )
            tx.many(
                "INSERT INTO refs (key, digest) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [(key, d) for d in wanted],
            )
        return "replaced" if replaced else "created"

    # -- aliases ------------------------------------------------------------------------------

    def alias_get(self, request_key: str) -> str | None:
        with self._tx() as tx:
            rows = tx.q("SELECT key FROM aliases WHERE request_key = ?", (request_key,))
        return rows[0][0] if rows else None

    def alias_put(self, request_key: str, key: str) -> None:
        with self._tx(write=True) as tx:
            tx.x(
                "INSERT INTO aliases (request_key, key) VALUES (?, ?) "
                "ON CONFLICT (request_key) DO UPDATE SET key = excluded.key",
                (request_key, key),
            )

    # -- ccache -------------------------------------------------------------------------------

    def ccache_get(self, key: str) -> tuple[str, int] | None:
        with self._tx() as tx:
            rows = tx.q("SELECT digest, size FROM ccache WHERE key = ?", (key,))
        return (rows[0][0], int(rows[0][1])) if rows else None

    def ccache_put(self, key: str, digest: str, size: int) -> None:
        with self._tx(write=True) as tx:
            # a new key needs no invalidation (a miss is never kept in memory), nor the same digest again
            # (the same verified bytes); a key re-pointed to other bytes does
            old = tx.q("SELECT digest FROM ccache WHERE key = ?", (key,))
            if old and old[0][0] != digest:
                self._invalidate(tx)
            tx.x(
                self._now(
                    f"INSERT INTO ccache (key, digest, size, last_access) VALUES (?, ?, ?, {NOW}) "
                    "ON CONFLICT (key) DO UPDATE SET digest = excluded.digest, size = excluded.size, "
                    "last_access = excluded.last_access"
                ),
                (key, digest, size),
            )

    def ccache_delete(self, key: str) -> bool:
        with self._tx(write=True) as tx:
            deleted = tx.x("DELETE FROM ccache WHERE key = ?", (key,)) > 0
            if deleted:
                self._invalidate(tx)
            return deleted

    # -- LRU, totals, eviction ----------------------------------------------------------------

    def touch(self, builds: dict[str, float], ccache: dict[str, float]) -> None:
        """Mark keys used; the time is the index's now at the flush (one clock), not the host's."""
        if not builds and not ccache:
            return
        with self._tx(write=True) as tx:
            for table, keys in (("builds", builds), ("ccache", ccache)):
                if keys:
                    tx.many(
                        self._now(f"UPDATE {table} SET last_access = {NOW} WHERE key = ?"),
                        [(k,) for k in keys],
                    )

    def totals(self) -> dict[str, int]:
        with self._tx() as tx:
            blobs, size = tx.q("SELECT count(*), coalesce(sum(size), 0) FROM blobs")[0]
            builds = tx.q("SELECT count(*) FROM builds")[0][0]
            pinned = tx.q("SELECT count(*) FROM builds WHERE pinned = 1")[0][0]
            ccache = tx.q("SELECT count(*) FROM ccache")[0][0]
        return {
            "blobs": int(blobs),
            "bytes": int(size),
            "builds": int(builds),
            "pinned": int(pinned),
            "ccache": int(ccache),
        }

    def evict_lru(self, count: int) -> list[tuple[str, str]]:
        """Drop the count least recently used unpinned builds / ccache keys; returns (kind, key) dropped."""
        with self._tx(write=True) as tx:
            self._lock_refs(tx, exclusive=True)
            victims = tx.q(
                "SELECT kind, key FROM ("
                "SELECT 'build' AS kind, key, last_access FROM builds WHERE pinned = 0 "
                "UNION ALL SELECT 'ccache' AS kind, key, last_access FROM ccache"
                ") AS lru ORDER BY last_access, key LIMIT ?",
                (count,),
            )
            if any(kind == "ccache" for kind, _ in victims):
                self._invalidate(tx)
            for kind, key in victims:
                if kind == "build":
                    tx.x("DELETE FROM builds WHERE key = ?", (key,))
                    tx.x("DELETE FROM refs WHERE key = ?", (key,))
                    tx.x("DELETE FROM runs WHERE key = ?", (key,))
                    tx.x("DELETE FROM aliases WHERE key = ?", (key,))
                else:
                    tx.x("DELETE FROM ccache WHERE key = ?", (key,))
        return [(str(kind), str(key)) for kind, key in victims]

    def collect_garbage(self, grace_seconds: float, delete: Callable[[str], None]) -> list[str]:
        """Delete blobs that nothing references and that are older than grace_seconds (index clock).

        ``delete`` removes the bytes inside this transaction, under the exclusive reference lock: an upload
        of the same digest waits (blob_add) and publishes its bytes again afterwards. A blob whose bytes
        could not be deleted keeps its row (tried again next time). Returns the digests deleted.
        """
        deleted: list[str] = []
        # no _invalidate: only blobs that no ccache key references go, and whatever stopped a key from
        # referencing one (a delete, an eviction, a re-pointing put) invalidated memory answers already
        with self._tx(write=True) as tx:
            self._lock_refs(tx, exclusive=True)
            rows = tx.q(
                self._now(
                    f"SELECT digest FROM blobs WHERE created < {NOW} - ? "
                    "AND NOT EXISTS (SELECT 1 FROM refs WHERE refs.digest = blobs.digest) "
                    "AND NOT EXISTS (SELECT 1 FROM ccache WHERE ccache.digest = blobs.digest)"
                ),
                (grace_seconds,),
            )
            for (digest,) in rows:
                try:
                    delete(digest)
                except Exception as exc:  # S3 down, a permission: keep the row, retry on the next pass
                    log.warning("could not delete unreferenced blob %s: %s", digest, exc)
                    continue
                deleted.append(str(digest))
            tx.many("DELETE FROM blobs WHERE digest = ?", [(d,) for d in deleted])
        return deleted


_RUNS_SQL = "SELECT doc FROM runs"


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.invalidating = False  # Generation.begin() called: end() is due after COMMIT or ROLLBACK

    def q(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, tuple(params)).fetchall()

    def x(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, tuple(params)).rowcount

    def many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sql, [tuple(r) for r in rows])


class SqliteIndex(SqlIndex):
    """The index in one SQLite file (WAL mode: readers never wait for the writer); a connection per thread."""

    now_sql = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._create()
        self.generation = Generation(self.path.with_name(self.path.name + "-generation"))

    def describe(self) -> str:
        return f"SQLite {self.path}"

    def close(self) -> None:
        super().close()
        self.generation.close()

    def _invalidate(self, tx: _Tx) -> None:
        assert isinstance(tx, _SqliteTx)
        if not tx.invalidating:
            self.generation.begin()
            tx.invalidating = True

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._track(
                sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=OFF")
            self._local.conn = conn
        return conn

    def ccache_get(self, key: str) -> tuple[str, int] | None:
        # one statement: atomic on its own, no BEGIN/COMMIT around it (the hot path of ccache reads: a
        # try, not the _sqlite_errors() context manager, whose generator cost a third of the look-up)
        try:
            row = self._conn().execute("SELECT digest, size FROM ccache WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError as exc:
            with _sqlite_errors():
                raise exc
        return (row[0], int(row[1])) if row else None

    @contextlib.contextmanager
    def _tx(self, write: bool = False) -> Iterator[_Tx]:
        with _sqlite_errors():
            conn = self._conn()
            if conn.in_transaction:  # never expected: a transaction some bug left open; do not join it
                conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            tx = _SqliteTx(conn)
            try:
                yield tx
                conn.execute("COMMIT")
            finally:
                # the body raised, or COMMIT itself failed (disk full, I/O error): SQLite then keeps the
                # transaction open, and every later BEGIN on this thread's connection would fail
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if tx.invalidating:  # after COMMIT/ROLLBACK: readers may keep answers again
                    self.generation.end()


@contextlib.contextmanager
def _sqlite_errors() -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "full" in text:
            raise IndexError_(f"the index is out of space ({text}); try later", 507) from exc
        if "locked" in text or "busy" in text or "disk I/O" in text or "unable to open" in text:
            raise IndexError_(f"the index is unavailable ({text}); retry later", 503) from exc
        raise


class _PgTx:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    def q(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(self._sql(sql), tuple(params))
            return list(cur.fetchall())

    def x(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self.conn.cursor() as cur:
            cur.execute(self._sql(sql), tuple(params))
            return int(cur.rowcount)

    def many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = [tuple(r) for r in rows]
        if rows:
            with self.conn.cursor() as cur:
                cur.executemany(self._sql(sql), rows)


_GC_LOCK = 0x6B6369  # the advisory lock that orders reference changes against garbage collection


class PostgresIndex(SqlIndex):
    """The index in PostgreSQL (psycopg 3): shared by every service replica; a connection per thread."""

    def __init__(self, dsn: str) -> None:
        import psycopg  # only needed in fleet mode

        self._psycopg = psycopg
        self.dsn = dsn
        self._local = threading.local()
        try:
            with self._tx(write=True) as tx:
                tx.x("SELECT pg_advisory_xact_lock(?)", (_GC_LOCK + 1,))  # one schema creator at a time
                for statement in SCHEMA:
                    tx.x(statement)
        except psycopg.Error as exc:
            raise IndexError_(
                f"cannot use the PostgreSQL index at {_redact(dsn)}: {redact_text(str(exc), dsn)}"
            ) from exc

    def describe(self) -> str:
        return f"PostgreSQL {_redact(self.dsn)}"

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = self._track(self._psycopg.connect(self.dsn, autocommit=True))
            self._local.conn = conn
        return conn

    now_sql = "extract(epoch from clock_timestamp())::double precision"

    @contextlib.contextmanager
    def _tx(self, write: bool = False) -> Iterator[_Tx]:
        psycopg = self._psycopg
        conn = None
        try:
            conn = self._conn()
            with conn.transaction():
                yield _PgTx(conn)
        except psycopg.errors.DiskFull as exc:  # an OperationalError too, but the store is full, not down
            reason = redact_text(str(exc).strip().splitlines()[0], self.dsn)
            raise IndexError_(f"the PostgreSQL index is out of space ({reason}); try later", 507) from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._discard(conn)
            reason = redact_text(str(exc).strip(), self.dsn)
            raise IndexError_(f"the PostgreSQL index is unavailable ({reason}); retry later") from exc
        except BaseException:
            # a failed COMMIT or ROLLBACK: never hand this connection to the next request mid-transaction
            if conn is not None and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self._discard(conn)
            raise

    def _discard(self, conn: Any) -> None:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        self._local.conn = None

    def _lock_refs(self, tx: _Tx, exclusive: bool) -> None:
        fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        tx.q(f"SELECT {fn}(?)", (_GC_LOCK,))


_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_SECRET_PARAMS = {"password", "sslpassword", "passfile", "sslkey"}


def _redact(url: str) -> str:
    """A database URL (or libpq key=value string) without its password, wherever the password is:
    ``user:PASS@host``, ``?password=PASS``, ``password=PASS`` (conninfo)."""
    if "://" not in url:
        return _CONNINFO_PASSWORD.sub(r"\1***", url)
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            creds, host = netloc.rsplit("@", 1)
            user = creds.split(":", 1)[0]
            netloc = f"{user}:***@{host}" if ":" in creds else f"{user}@{host}"
        query = urlencode(
            [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in parse_qsl(parts.query, True)],
            safe="*/:=%",
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return url.split("://", 1)[0] + "://***"  # unparseable: show nothing of it


def dsn_secrets(url: str | None) -> list[str]:
    """The password(s) in a database URL, as they may appear in text (raw and percent-decoded)."""
    if not url:
        return []
    found: list[str] = [m.group(2).strip("'") for m in _CONNINFO_PASSWORD.finditer(url)]
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        if parts.password:
            found.append(parts.password)
        found += [v for k, v in parse_qsl(parts.query, True) if k.lower() in _SECRET_PARAMS]
        if "@" in parts.netloc and ":" in parts.netloc.rsplit("@", 1)[0]:
            found.append(parts.netloc.rsplit("@", 1)[0].split(":", 1)[1])  # as written (percent-encoded)
    from urllib.parse import unquote

    return sorted({s for f in found for s in (f, unquote(f)) if s}, key=len, reverse=True)


def redact_text(text: str, url: str | None) -> str:
    """text with every password of url replaced by *** (database errors may quote the connection string)."""
    for secret in dsn_secrets(url):
        text = text.replace(secret, "***")
    return text


def open_index(url: str | None, data: Path) -> Index:
    if not url:
        return SqliteIndex(data / "index.sqlite3")
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresIndex(url)
    if url.startswith("sqlite:///"):
        return SqliteIndex(Path(url.removeprefix("sqlite://")))
    raise IndexError_(f"unsupported index URL {_redact(url)!r}: use postgresql://... or sqlite:///PATH", 400)
