"""Fleet mode: two `kernel-ci cache serve` replicas over one PostgreSQL index and one S3 store (s3rver).

.ci/services.sh starts both on loopback and exports where they are; without them these tests skip
locally and fail under CI (where they must run).
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import psycopg
import pytest

from tests.cacheservice import TOKEN, Running, server_process, sha

pytestmark = pytest.mark.slow

KEY = "f1" * 32
CCACHE_KEY = "0123" + "abcdefghijklmnopqrstuv0123456"


def _services() -> tuple[str, str]:
    dsn, endpoint = os.environ.get("KERNEL_CI_TEST_PG_DSN"), os.environ.get("KERNEL_CI_TEST_S3_ENDPOINT")
    if not dsn or not endpoint:
        message = "PostgreSQL/s3rver not configured: source .ci/services.sh first"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return dsn, endpoint


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Running, Running, str, str]]:
    dsn, endpoint = _services()
    schema = f"t_{secrets.token_hex(4)}"
    bucket = f"kci-{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    index = f"{dsn}?options=-csearch_path%3D{schema}"
    blobs = f"s3://{bucket}/blobs?endpoint={endpoint}"
    env = {
        "AWS_ACCESS_KEY_ID": os.environ.get("KERNEL_CI_TEST_S3_KEY_ID", "S3RVER"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("KERNEL_CI_TEST_S3_SECRET", "S3RVER"),
    }
    extra = ("--index", index, "--blobs", blobs)
    try:
        with (
            server_process(tmp_path / "replica-a", *extra, env=env) as a,
            server_process(tmp_path / "replica-b", *extra, env=env) as b,
        ):
            yield a, b, bucket, endpoint
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _client(server: Running) -> httpx.Client:
    return server.client(TOKEN)


def test_two_replicas_share_builds_ccache_and_pins(fleet: tuple[Running, Running, str, str]) -> None:
    a, b, _bucket, _endpoint = fleet
    big = os.urandom(20 << 20)  # above boto3's multipart threshold
    small = b"kernel config"
    with _client(a) as ca, _client(b) as cb:
        assert ca.put(f"/api/v1/blobs/{sha(big)}", content=big).status_code == 201
        assert cb.put(f"/api/v1/blobs/{sha(big)}", content=big).status_code == 200  # B sees A's blob
        assert cb.put(f"/api/v1/blobs/{sha(small)}", content=small).status_code == 201
        doc = {
            "outputs": [
                {"name": "kbuild", "sha256": sha(big), "size": len(big), "kind": "tar"},
                {"name": "config", "sha256": sha(small), "size": len(small)},
            ],
            "inputs": {"source": "linux-5.10.223"},
        }
        assert cb.put(f"/api/v1/builds/{KEY}", json=doc).status_code == 201
        assert ca.get(f"/api/v1/builds/{KEY}").json()["outputs"][0]["size"] == len(big)
        assert ca.get(f"/api/v1/blobs/{sha(big)}").content == big
        assert ca.put(f"/ccache/{CCACHE_KEY[:2]}/{CCACHE_KEY[2:]}", content=b"object").status_code == 201
        assert cb.get(f"/ccache/{CCACHE_KEY}").content == b"object"
        assert cb.put(f"/api/v1/builds/{KEY}/pin").status_code == 200
        assert ca.get("/api/v1/builds").json()["builds"][0]["pinned"] is True
        assert "S3 bucket" in ca.get("/healthz").json()["blob_store"]
        assert "PostgreSQL" in cb.get("/healthz").json()["index"]


def test_concurrent_publishers_on_two_replicas(fleet: tuple[Running, Running, str, str]) -> None:
    a, b, _bucket, _endpoint = fleet
    files = {f"out{i}": os.urandom(100_000) for i in range(3)}
    codes: list[int] = []
    barrier = threading.Barrier(2)

    def publish(server: Running) -> None:
        with _client(server) as client:
            outputs = []
            for name, data in files.items():
                assert client.put(f"/api/v1/blobs/{sha(data)}", content=data).status_code in (200, 201)
                outputs.append({"name": name, "sha256": sha(data), "size": len(data)})
            barrier.wait()
            codes.append(client.put(f"/api/v1/builds/{KEY}", json={"outputs": outputs}).status_code)

    threads = [threading.Thread(target=publish, args=(s,)) for s in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(codes) == [200, 201]
    with _client(a) as client:
        assert client.get("/healthz").json()["builds"] == 1


def test_a_corrupted_object_in_s3_is_a_miss_on_every_replica(
    fleet: tuple[Running, Running, str, str],
) -> None:
    a, b, bucket, endpoint = fleet
    data = b"the real object bytes"
    with _client(a) as ca, _client(b) as cb:
        assert ca.put(f"/api/v1/blobs/{sha(data)}", content=data).status_code == 201
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=os.environ.get("KERNEL_CI_TEST_S3_KEY_ID", "S3RVER"),
            aws_secret_access_key=os.environ.get("KERNEL_CI_TEST_S3_SECRET", "S3RVER"),
        )
        digest = sha(data)
        s3.put_object(Bucket=bucket, Key=f"blobs/{digest[:2]}/{digest}", Body=b"the fake object bytes")
        assert cb.get(f"/api/v1/blobs/{digest}").status_code == 404
        assert ca.get(f"/api/v1/blobs/{digest}").status_code == 404
        assert ca.head(f"/api/v1/blobs/{digest}").status_code == 404  # forgotten by the shared index
