"""Faults the cache service must survive with a clear status and no half state: a full disk (a real tmpfs),
PostgreSQL or S3 going away (a real PostgreSQL / s3rver behind a proxy the test cuts), a COMMIT that
fails, garbage collection with replicas whose clocks disagree, and a blob re-uploaded while it is being
collected. Secrets: the database password never reaches a log line or /healthz."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from kernel_ci.cache.server.blobs import LocalBlobStore
from kernel_ci.cache.server.index import IndexError_, SqliteIndex
from kernel_ci.cache.server.server import ServerConfig
from kernel_ci.cache.server.service import CacheService, Limits
from tests.cacheservice import REPO, TOKEN, TcpProxy, free_port, server_in_thread, sha

CCACHE_KEY = "0123" + "abcdefghijklmnopqrstuv0123456"


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real, small filesystem (root only): what a full disk looks like to the service."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_is_a_507_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    with (
        tmpfs(tmp_path / "small", "1m") as data,
        server_in_thread(ServerConfig(data=data / "d")) as server,
        server.client() as client,
    ):
        big = os.urandom(2 << 20)
        response = client.put(f"/api/v1/blobs/{sha(big)}", content=big)
        assert response.status_code == 507, response.text
        assert "space" in response.json()["error"]
        assert list((data / "d" / "blobs" / "tmp").iterdir()) == []  # the partial copy is gone
        assert client.head(f"/api/v1/blobs/{sha(big)}").status_code == 404
        response = client.put(f"/ccache/{CCACHE_KEY}", content=big[: 1 << 20])
        assert response.status_code == 507, response.text
        small = b"still works"
        assert client.put(f"/api/v1/blobs/{sha(small)}", content=small).status_code == 201
        assert client.get(f"/api/v1/blobs/{sha(small)}").content == small


def test_a_failed_commit_leaves_the_connection_usable(tmp_path: Path) -> None:
    """SQLite keeps a transaction open when its COMMIT fails (here: the WAL cannot grow on a full disk);
    the next transaction on the same connection must work once there is room again."""
    with tmpfs(tmp_path / "small", "256k") as data:
        index = SqliteIndex(data / "index.sqlite3")
        filler = data / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as out:
            while True:
                out.write(b"\0" * 4096)
                out.flush()
        failed = None
        for i in range(2000):
            try:
                index.blob_add(sha(str(i).encode()), i)
            except (IndexError_, Exception) as exc:
                failed = exc
                break
        assert failed is not None, "the index never ran out of space"
        filler.unlink()
        index.blob_add(sha(b"after"), 5)  # the same thread, the same connection
        assert index.blob_sizes([sha(b"after")]) == {sha(b"after"): 5}
        assert getattr(failed, "status", None) == 507, repr(failed)  # and the full disk was a 507


# -- one clock, and a re-upload during collection ----------------------------------------------------


def test_gc_uses_the_index_clock_not_a_replica_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica B's clock runs an hour ahead: its collector must not see A's fresh upload as old."""
    config = ServerConfig(data=tmp_path / "d", limits=Limits(gc_grace_seconds=600))
    with server_in_thread(config) as server, server.client() as client:
        data = b"uploaded for a manifest that comes next"
        assert client.put(f"/api/v1/blobs/{sha(data)}", content=data).status_code == 201
        replica_b = CacheService(
            SqliteIndex(tmp_path / "d" / "index.sqlite3"),
            LocalBlobStore(tmp_path / "d" / "blobs"),
            Limits(gc_grace_seconds=600),
        )
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3600)
        collected = replica_b.collect_garbage()
        monkeypatch.setattr(time, "time", real)
        assert sha(data) not in collected
        assert client.get(f"/api/v1/blobs/{sha(data)}").content == data


def test_a_blob_re_uploaded_while_it_is_collected_is_not_lost(tmp_path: Path) -> None:
    config = ServerConfig(data=tmp_path / "d", limits=Limits(gc_grace_seconds=0))
    with server_in_thread(config) as server, server.client() as client:
        service = server.service
        assert service is not None
        data = b"unreferenced for a moment, then wanted again"
        digest = sha(data)
        assert client.put(f"/api/v1/blobs/{digest}", content=data).status_code == 201
        time.sleep(0.05)
        codes: list[int] = []

        def reupload() -> None:
            with server.client() as other:
                codes.append(other.put(f"/api/v1/blobs/{digest}", content=data).status_code)

        real_delete = service.blobs.delete
        uploader = threading.Thread(target=reupload)

        def delete_with_an_upload_in_between(victim: str) -> None:
            if victim == digest and not uploader.is_alive() and not codes:
                uploader.start()
                uploader.join(timeout=2)  # finishes now (unordered) or waits for the collector's lock
            real_delete(victim)

        service.blobs.delete = delete_with_an_upload_in_between  # type: ignore[method-assign]
        try:
            service.collect_garbage()
        finally:
            service.blobs.delete = real_delete  # type: ignore[method-assign]
        uploader.join(timeout=60)
        assert codes and codes[0] in (200, 201)
        got = client.get(f"/api/v1/blobs/{digest}")
        assert got.status_code == 200 and got.content == data


# -- PostgreSQL and S3 going away ---------------------------------------------------------------------


def _pg_dsn() -> str:
    dsn = os.environ.get("KERNEL_CI_TEST_PG_DSN")
    if not dsn:
        if os.environ.get("CI"):
            pytest.fail("KERNEL_CI_TEST_PG_DSN is not set: source .ci/services.sh")
        pytest.skip("PostgreSQL not configured: source .ci/services.sh first")
    return dsn


@pytest.fixture
def pg_schema() -> Iterator[tuple[str, str]]:
    dsn = _pg_dsn()
    schema = f"t_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield dsn, schema
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_postgresql_down_is_a_503_then_recovers_and_the_password_stays_out_of_logs(
    tmp_path: Path, pg_schema: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    dsn, schema = pg_schema
    parts = urlsplit(dsn)
    password = parts.password or ""
    assert password
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    proxy.start()
    # the password as a query parameter: a form the old redaction missed
    user = parts.username
    index = f"postgresql://{user}@{proxy.address}{parts.path}?password={password}&options=-csearch_path%3D{schema}"
    caplog.set_level(logging.DEBUG)
    try:
        with (
            server_in_thread(ServerConfig(data=tmp_path / "d", index_url=index)) as server,
            server.client() as client,
        ):
            assert client.put(f"/ccache/{CCACHE_KEY}", content=b"object").status_code == 201
            assert password not in client.get("/healthz").text  # full detail for a token holder
            proxy.stop()
            for method, path in (
                ("GET", "/api/v1/builds"),
                ("GET", f"/ccache/{CCACHE_KEY}"),
                ("PUT", f"/ccache/{CCACHE_KEY}"),
                ("GET", "/healthz"),
            ):
                response = client.request(method, path, content=b"object")
                assert response.status_code == 503, (method, path, response.status_code, response.text)
                assert password not in response.text
            proxy.start()
            assert client.get(f"/ccache/{CCACHE_KEY}").content == b"object"  # reconnected
            assert client.get("/api/v1/builds").status_code == 200
    finally:
        proxy.stop()
    logged = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert "503" in logged or "unavailable" in logged
    assert password not in logged


@pytest.mark.parametrize(
    "index",
    [
        "postgresql://kci@127.0.0.1:{port}/db?password=S3cretPw-query",
        "postgresql://kci:S3cretPw-url@127.0.0.1:{port}/db",
        "host=127.0.0.1 port={port} password=S3cretPw-conninfo dbname=db",
    ],
)
def test_the_database_password_is_in_no_output_of_a_failing_server(tmp_path: Path, index: str) -> None:
    url = index.format(port=free_port())  # nothing listens there
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kernel_ci.cli.main",
            "cache",
            "serve",
            "--data",
            str(tmp_path / "d"),
            "--index",
            url,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KERNEL_CI_CACHE_SERVER_TOKENS": TOKEN},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and output.strip()
    assert "S3cretPw" not in output, output[-2000:]


def test_s3_down_is_a_503_then_recovers(tmp_path: Path) -> None:
    endpoint = os.environ.get("KERNEL_CI_TEST_S3_ENDPOINT")
    if not endpoint:
        if os.environ.get("CI"):
            pytest.fail("KERNEL_CI_TEST_S3_ENDPOINT is not set: source .ci/services.sh")
        pytest.skip("s3rver not configured: source .ci/services.sh first")
    parts = urlsplit(endpoint)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 80))
    proxy.start()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", os.environ.get("KERNEL_CI_TEST_S3_KEY_ID", "S3RVER"))
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", os.environ.get("KERNEL_CI_TEST_S3_SECRET", "S3RVER"))
    blobs = f"s3://kci-{secrets.token_hex(4)}/b?endpoint=http://{proxy.address}"
    try:
        with (
            server_in_thread(ServerConfig(data=tmp_path / "d", blobs_url=blobs)) as server,
            server.client() as client,
        ):
            data = b"a blob in S3"
            assert client.put(f"/api/v1/blobs/{sha(data)}", content=data).status_code == 201
            proxy.stop()
            other = b"another blob"
            response = client.put(f"/api/v1/blobs/{sha(other)}", content=other)
            assert response.status_code == 503, response.text
            response = client.get(f"/api/v1/blobs/{sha(data)}")
            assert response.status_code == 503, response.text
            assert client.put(f"/ccache/{CCACHE_KEY}", content=other).status_code == 503
            proxy.start()
            assert client.get(f"/api/v1/blobs/{sha(data)}").content == data  # not forgotten meanwhile
            assert client.put(f"/api/v1/blobs/{sha(other)}", content=other).status_code == 201
    finally:
        proxy.stop()


def test_a_failed_postgresql_commit_leaves_the_connection_usable(pg_schema: tuple[str, str]) -> None:
    """A deferred constraint trigger refuses one row at COMMIT time: the next transaction on the same
    thread (the same pooled connection) must not find itself inside the failed one. PostgreSQL ends a
    transaction whose COMMIT fails; this keeps _tx from ever relying on anything else."""
    from kernel_ci.cache.server.index import PostgresIndex

    dsn, schema = pg_schema
    index = PostgresIndex(f"{dsn}?options=-csearch_path%3D{schema}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE FUNCTION {schema}.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.size = 13 THEN RAISE EXCEPTION 'refused at commit'; END IF; RETURN NEW; END $$"
        )
        conn.execute(
            f"CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON {schema}.blobs DEFERRABLE INITIALLY DEFERRED "
            f"FOR EACH ROW EXECUTE FUNCTION {schema}.refuse()"
        )
    with pytest.raises(psycopg.Error, match="refused at commit"):
        index.blob_add(sha(b"refused"), 13)
    index.blob_add(sha(b"accepted"), 8)
    assert index.blob_sizes([sha(b"refused"), sha(b"accepted")]) == {sha(b"accepted"): 8}


def test_postgresql_out_of_disk_is_a_507(tmp_path: Path, pg_schema: tuple[str, str]) -> None:
    """PostgreSQL's own "disk full" (SQLSTATE 53100, raised here by a trigger as the server would) is the
    store being full, a 507 like a full blob directory; other outages are 503."""
    dsn, schema = pg_schema
    index = f"{dsn}?options=-csearch_path%3D{schema}"
    with server_in_thread(ServerConfig(data=tmp_path / "d", index_url=index)) as server:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                f"CREATE FUNCTION {schema}.disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "RAISE EXCEPTION 'could not extend file' USING ERRCODE = '53100'; END $$"
            )
            conn.execute(
                f"CREATE TRIGGER disk_full BEFORE INSERT ON {schema}.blobs "
                f"FOR EACH ROW EXECUTE FUNCTION {schema}.disk_full()"
            )
        with server.client() as client:
            data = b"no room in the index"
            response = client.put(f"/api/v1/blobs/{sha(data)}", content=data)
            assert response.status_code == 507, response.text
            assert client.get("/api/v1/builds").status_code == 200  # reads still work


def test_sqlite_ccache_lookup_errors_keep_their_status(tmp_path: Path) -> None:
    """The ccache look-up (a plain try on the hot path, not the _sqlite_errors context manager) still maps
    an index it cannot open to a 503, and lets any other SQLite error through unchanged."""
    index = SqliteIndex(tmp_path / "index" / "index.sqlite3")
    index.ccache_put("k" * 33, "0" * 64, 1)
    assert index.ccache_get("k" * 33) == ("0" * 64, 1)
    index._conn().execute("DROP TABLE ccache")
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        index.ccache_get("k" * 33)
    shutil.rmtree(tmp_path / "index")  # a new thread's connection cannot open the file any more
    raised: list[BaseException] = []

    def look_up() -> None:
        try:
            index.ccache_get("k" * 33)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=look_up)
    thread.start()
    thread.join()
    assert isinstance(raised[0], IndexError_) and raised[0].status == 503, raised
