"""The cache service over real HTTP on 127.0.0.1 (uvicorn in a thread): API, ccache protocol, safety."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from kernel_ci.cache.server.server import ServerConfig
from kernel_ci.cache.server.service import Limits
from tests.cacheservice import READ_TOKEN, TOKEN, Running, metric, server_in_thread, server_process, sha

KEY = "ab" * 32
KEY2 = "cd" * 32
CCACHE_KEY = "0123" + "abcdefghijklmnopqrstuv0123456"  # 33 chars of [0-9a-v], as ccache 4.7 names objects


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    with server_in_thread(ServerConfig(data=tmp_path / "data")) as running:
        yield running


def put_blob(client: httpx.Client, data: bytes) -> str:
    digest = sha(data)
    response = client.put(f"/api/v1/blobs/{digest}", content=data)
    assert response.status_code in (200, 201), response.text
    return digest


def publish(client: httpx.Client, key: str, files: dict[str, bytes], **extra: object) -> httpx.Response:
    outputs = [{"name": n, "sha256": put_blob(client, d), "size": len(d)} for n, d in files.items()]
    doc = {"outputs": outputs, "inputs": {"source": "linux-5.10.223", "config:CONFIG_X": "y"}, **extra}
    return client.put(f"/api/v1/builds/{key}", json=doc)


def test_blob_round_trip(server: Running) -> None:
    data = os.urandom(3 << 20)  # larger than the in-memory threshold: streamed both ways
    with server.client() as client:
        digest = sha(data)
        assert client.put(f"/api/v1/blobs/{digest}", content=data).status_code == 201
        assert client.put(f"/api/v1/blobs/{digest}", content=data).status_code == 200  # already there
        got = client.get(f"/api/v1/blobs/{digest}")
        assert got.status_code == 200 and got.content == data
        head = client.head(f"/api/v1/blobs/{digest}")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(data))
        assert client.get(f"/api/v1/blobs/{sha(b'other')}").status_code == 404
        missing = client.post("/api/v1/missing-blobs", json={"digests": [digest, sha(b"x")]}).json()
        assert missing == {"missing": [sha(b"x")]}


def test_build_manifest_round_trip_newest_first_and_pins(server: Running) -> None:
    with server.client() as client:
        metadata = {"kernel": {"version": "5.10.223", "release": "5.10.223-kci"}, "series": ["ci-smoke"]}
        first = publish(
            client, KEY, {"bzImage": b"kernel", "patches/ci-smoke.mbox": b"From x"}, metadata=metadata
        )
        assert first.status_code == 201, first.text
        time.sleep(0.01)
        assert publish(client, KEY2, {"bzImage": b"kernel 2"}).status_code == 201
        doc = client.get(f"/api/v1/builds/{KEY}").json()
        assert [o["name"] for o in doc["outputs"]] == ["bzImage", "patches/ci-smoke.mbox"]
        assert doc["inputs"]["config:CONFIG_X"] == "y" and doc["metadata"] == metadata
        listing = client.get("/api/v1/builds").json()
        assert [b["key"] for b in listing["builds"]] == [KEY2, KEY]
        assert listing["builds"][1]["kernel_version"] == "5.10.223"
        assert client.put(f"/api/v1/builds/{KEY}/pin").json()["pinned"] is True
        assert client.get(f"/api/v1/builds/{KEY}").json()["pinned"] is True
        assert client.delete(f"/api/v1/builds/{KEY}/pin").json()["pinned"] is False
        download = client.get(f"/api/v1/builds/{KEY}/files/patches/ci-smoke.mbox")
        assert download.content == b"From x" and "attachment" in download.headers["content-disposition"]
        assert client.put(f"/api/v1/aliases/{KEY2}", json={"key": KEY}).status_code == 200
        assert client.get(f"/api/v1/aliases/{KEY2}").json()["key"] == KEY


def test_manifest_is_refused_while_a_blob_is_missing(server: Running) -> None:
    with server.client() as client:
        present = put_blob(client, b"present")
        absent = sha(b"never uploaded")
        doc = {
            "outputs": [
                {"name": "bzImage", "sha256": present, "size": 7},
                {"name": "config", "sha256": absent, "size": 14},
            ]
        }
        response = client.put(f"/api/v1/builds/{KEY}", json=doc)
        assert response.status_code == 409 and response.json()["missing"] == [absent]
        assert client.get(f"/api/v1/builds/{KEY}").status_code == 404
        assert client.get("/api/v1/builds").json()["total"] == 0


def test_writes_need_a_token_and_reads_can_be_closed(tmp_path: Path) -> None:
    with server_in_thread(ServerConfig(data=tmp_path / "d")) as server:
        data = b"payload"
        for client in (server.client(token=None), server.client(token="wrong")):
            response = client.put(f"/api/v1/blobs/{sha(data)}", content=data)
            assert response.status_code == 401 and "token" in response.json()["error"]
            assert client.put(f"/ccache/{CCACHE_KEY[:2]}/{CCACHE_KEY[2:]}", content=data).status_code == 401
        assert (
            server.client(token=READ_TOKEN).put(f"/api/v1/blobs/{sha(data)}", content=data).status_code == 403
        )
        assert (
            server.client(token=None).get(f"/api/v1/blobs/{sha(data)}").status_code == 404
        )  # anonymous read
        basic = base64.b64encode(f"ccache:{TOKEN}".encode()).decode()
        response = httpx.put(
            f"{server.url}/ccache/{CCACHE_KEY}", content=data, headers={"Authorization": f"Basic {basic}"}
        )
        assert response.status_code == 201
    config = ServerConfig(data=tmp_path / "closed", anonymous_read=False)
    with server_in_thread(config) as server:
        assert server.client(token=None).get(f"/ccache/{CCACHE_KEY}").status_code == 401
        assert server.client(token=None).get("/").status_code == 401
        assert server.client(token=READ_TOKEN).get(f"/ccache/{CCACHE_KEY}").status_code == 404


def test_digest_or_size_mismatch_is_refused_and_leaves_nothing(server: Running) -> None:
    with server.client() as client:
        claimed = sha(b"the real bytes")
        response = client.put(f"/api/v1/blobs/{claimed}", content=b"other bytes")
        assert response.status_code == 422 and "hash" in response.json()["error"]
        assert client.get(f"/api/v1/blobs/{claimed}").status_code == 404
        assert client.head(f"/api/v1/blobs/{claimed}").status_code == 404
    blobs = server.data / "blobs"
    assert list((blobs / "tmp").iterdir()) == []
    assert not (blobs / claimed[:2] / claimed).exists()


@pytest.mark.parametrize(
    "path",
    [
        "/ccache/../../etc/passwd",
        "/ccache/%2e%2e/%2e%2e/etc/passwd",
        "/ccache/ab/..%2f..%2fetc%2fpasswd",
        "/ccache/ab/cd/ef",
        "/ccache/" + "A" * 33,
        "/api/v1/blobs/..%2f..%2findex.sqlite3",
        "/api/v1/blobs/" + "A" * 64,
        "/api/v1/builds/" + "ab" * 32 + "/files/..%2f..%2findex.sqlite3",
        "/api/v1/builds/..%2f..%2fetc",
        "/builds/..%2findex.sqlite3",
    ],
)
def test_traversal_and_malformed_paths_are_refused(server: Running, path: str) -> None:
    with server.client() as client:
        for method in ("GET", "PUT"):
            response = client.request(method, path, content=b"x")
            assert response.status_code in (400, 404, 405), (method, path, response.status_code)
            assert b"root:" not in response.content and b"SQLite" not in response.content


@pytest.mark.parametrize(
    "name", ["../escape", "/etc/passwd", "a/../../b", ".hidden", "entry.json", "a//b", ""]
)
def test_unsafe_output_names_are_refused(server: Running, name: str) -> None:
    with server.client() as client:
        digest = put_blob(client, b"data")
        response = client.put(
            f"/api/v1/builds/{KEY}", json={"outputs": [{"name": name, "sha256": digest, "size": 4}]}
        )
        assert response.status_code == 400, response.text
        assert "output name" in response.json()["error"]


def test_oversize_uploads_are_refused(tmp_path: Path) -> None:
    limits = Limits(max_blob_bytes=1000, max_ccache_object_bytes=500, max_manifest_bytes=2000)
    with (
        server_in_thread(ServerConfig(data=tmp_path / "d", limits=limits)) as server,
        server.client() as client,
    ):
        big = b"x" * 1001
        assert client.put(f"/api/v1/blobs/{sha(big)}", content=big).status_code == 413
        assert client.put(f"/ccache/{CCACHE_KEY}", content=b"y" * 501).status_code == 413

        def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
            for _ in range(10):
                yield b"z" * 100

        assert client.put(f"/ccache/{CCACHE_KEY}", content=chunked()).status_code == 413
        assert client.put(f"/api/v1/blobs/{sha(b'q')}", content=chunked()).status_code == 411
        response = client.put(f"/api/v1/builds/{KEY}", content=b"{" + b" " * 3000 + b"}")
        assert response.status_code == 413
        assert client.get(f"/ccache/{CCACHE_KEY}").status_code == 404


def test_interrupted_upload_leaves_nothing(server: Running) -> None:
    data = os.urandom(2 << 20)
    digest = sha(data)
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = (
            f"PUT /api/v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        sock.sendall(head.encode() + data[: len(data) // 2])
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    tmp = server.data / "blobs" / "tmp"
    while list(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp.iterdir()) == []
    with server.client() as client:
        assert client.get(f"/api/v1/blobs/{digest}").status_code == 404
        assert client.get("/healthz").json()["blobs"] == 0
        assert client.put(f"/api/v1/blobs/{digest}", content=data).status_code == 201  # a retry works


def test_two_concurrent_writers_of_one_key(server: Running) -> None:
    payloads = {f"out{i}": os.urandom(200_000) for i in range(4)}
    results: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def writer() -> None:
        try:
            with server.client() as client:
                barrier.wait()
                results.append(publish(client, KEY, payloads).status_code)
                ccache_put = client.put(f"/ccache/{CCACHE_KEY}", content=b"same object")
                assert ccache_put.status_code == 201
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(results) == [200, 201]  # one published, the other found it complete
    with server.client() as client:
        doc = client.get(f"/api/v1/builds/{KEY}").json()
        for output in doc["outputs"]:
            assert client.get(f"/api/v1/blobs/{output['sha256']}").content == payloads[output["name"]]
        assert client.get(f"/ccache/{CCACHE_KEY}").content == b"same object"
        assert client.get("/healthz").json()["builds"] == 1


def test_corrupted_blob_is_detected_and_treated_as_missing(server: Running) -> None:
    with server.client() as client:
        assert publish(client, KEY, {"bzImage": b"good kernel bytes"}).status_code == 201
        digest = sha(b"good kernel bytes")
        path = server.data / "blobs" / digest[:2] / digest
        path.write_bytes(b"bad kernel bytes!")  # same size, other bytes: bit rot
        assert client.get(f"/api/v1/blobs/{digest}").status_code == 404
        assert client.get(f"/api/v1/builds/{KEY}").status_code == 404  # incomplete entry = a miss
        assert list((server.data / "blobs" / "corrupt").iterdir())  # set aside for a human to look at
        assert publish(client, KEY, {"bzImage": b"good kernel bytes"}).status_code in (200, 201)  # re-push
        assert client.get(f"/api/v1/builds/{KEY}").status_code == 200  # ... heals the entry
        assert client.get(f"/api/v1/blobs/{digest}").content == b"good kernel bytes"
        client.put(f"/ccache/{CCACHE_KEY}", content=b"object")
        (server.data / "blobs" / sha(b"object")[:2] / sha(b"object")).write_bytes(b"OBJECT")
        assert client.get(f"/ccache/{CCACHE_KEY}").status_code == 404
        metrics = client.get("/metrics").text
        assert metric(metrics, "kernel_ci_cache_corrupt_blobs_total") == 2


def test_eviction_under_the_cap_keeps_pinned_builds(tmp_path: Path) -> None:
    limits = Limits(max_bytes=100_000, gc_grace_seconds=0)
    with (
        server_in_thread(ServerConfig(data=tmp_path / "d", limits=limits)) as server,
        server.client() as client,
    ):
        keys = [f"{i:02x}" * 32 for i in range(1, 6)]
        assert publish(client, keys[0], {"bzImage": os.urandom(30_000)}).status_code == 201
        assert client.put(f"/api/v1/builds/{keys[0]}/pin").status_code == 200
        for key in keys[1:]:
            time.sleep(0.01)
            assert publish(client, key, {"bzImage": os.urandom(30_000)}).status_code == 201
            assert client.get("/healthz").json()["bytes"] <= 100_000
        present = [k for k in keys if client.get(f"/api/v1/builds/{k}").status_code == 200]
        assert keys[0] in present  # pinned: survived although it is the oldest
        assert keys[1] not in present and keys[-1] in present  # least recently used went first
        assert "kernel_ci_cache_evictions_total" in client.get("/metrics").text
        for key in present:
            client.put(f"/api/v1/builds/{key}/pin")
        big = os.urandom(40_000)
        full = client.put(f"/api/v1/blobs/{sha(big)}", content=big)
        assert full.status_code == 507 and "full" in full.json()["error"]
        for key in present:  # a full store refused the upload but lost nothing
            doc = client.get(f"/api/v1/builds/{key}").json()
            assert client.get(f"/api/v1/blobs/{doc['outputs'][0]['sha256']}").status_code == 200


def test_ccache_layouts_and_key_formats(server: Running) -> None:
    hex_key = "0123456789abcdef0123456789abcdef01234567"  # ccache >= 4.13
    with server.client() as client:
        assert client.put(f"/ccache/{CCACHE_KEY[:2]}/{CCACHE_KEY[2:]}", content=b"A").status_code == 201
        assert client.get(f"/ccache/{CCACHE_KEY}").content == b"A"  # flat sees what subdirs wrote
        assert client.head(f"/ccache/{CCACHE_KEY[:2]}/{CCACHE_KEY[2:]}").status_code == 200
        assert client.put(f"/ccache/{CCACHE_KEY}", content=b"B").status_code == 201  # overwrite allowed
        assert client.get(f"/ccache/{CCACHE_KEY[:2]}/{CCACHE_KEY[2:]}").content == b"B"
        assert client.put(f"/ccache/{hex_key[:2]}/{hex_key[2:]}", content=b"C").status_code == 201
        assert client.get(f"/ccache/{hex_key}").content == b"C"
        assert client.delete(f"/ccache/{hex_key}").status_code == 200
        assert client.get(f"/ccache/{hex_key}").status_code == 404
        assert client.head(f"/ccache/{hex_key}").status_code == 404


def test_runs_attach_junit_and_console(server: Running) -> None:
    xml = (
        b'<testsuites><testsuite name="smoke"><testcase name="a"/><testcase name="b">'
        b'<failure message="boom"/></testcase><testcase name="c"><skipped/></testcase>'
        b"</testsuite></testsuites>"
    )
    with server.client() as client:
        assert publish(client, KEY, {"bzImage": b"k"}).status_code == 201
        doc = {
            "junit": {"sha256": put_blob(client, xml), "size": len(xml)},
            "console": {"sha256": put_blob(client, b"console"), "size": 7},
            "outcome": "test failure",
        }
        response = client.put(f"/api/v1/builds/{KEY}/runs/run1", json=doc)
        assert response.status_code == 201, response.text
        assert response.json()["counts"] == {"tests": 3, "passed": 1, "failed": 1, "errors": 0, "skipped": 1}
        assert client.get(f"/api/v1/builds/{KEY}/runs/run1/junit.xml").content == xml
        assert client.get(f"/api/v1/builds/{KEY}/runs/run1/console.log").content == b"console"
        assert client.get("/api/v1/builds").json()["builds"][0]["tests"]["failed"] == 1
        assert client.put(f"/api/v1/builds/{KEY2}/runs/run1", json=doc).status_code == 404


def test_health_metrics_openapi_and_pages(server: Running) -> None:
    with server.client() as client:
        publish(client, KEY, {"bzImage": b"k1"}, inputs={"source": "a", "config:CONFIG_KASAN": "n"})
        publish(client, KEY2, {"bzImage": b"k2"}, inputs={"source": "a", "config:CONFIG_KASAN": "y"})
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.get(f"/ccache/{CCACHE_KEY}").status_code == 404
        metrics = client.get("/metrics").text
        assert metric(metrics, "kernel_ci_cache_builds") == 2
        assert metric(metrics, "kernel_ci_cache_bytes") == 4
        bucket = "kernel_ci_cache_request_duration_seconds_bucket"
        assert metric(metrics, bucket, method="GET", route="ccache", le="+Inf") == 1
        assert metric(metrics, "kernel_ci_cache_requests_total", kind="ccache", result="miss") == 1
        schema = client.get("/openapi.json").json()
        assert schema["openapi"].startswith("3.") and "/api/v1/builds/{key}" in schema["paths"]
        page = client.get("/").text
        assert page.index(KEY2[:16]) < page.index(KEY[:16])  # newest first
        detail = client.get(f"/builds/{KEY2}").text
        assert "CONFIG_KASAN: n -&gt; y" in detail or "CONFIG_KASAN: n -> y" in detail
        miss = client.get(f"/api/v1/builds/{KEY2}/miss").json()
        assert miss["nearest"] == KEY and miss["differences"][0]["name"] == "config:CONFIG_KASAN"
        assert json.loads(client.get("/api/v1/builds?limit=1").text)["builds"][0]["key"] == KEY2
        assert client.get("/api/v1/builds?limit=0").status_code == 400


def test_openapi_documents_503_everywhere_and_507_on_writes(server: Running) -> None:
    """A client generated from the document must expect "retry later" (a store down, a busy service) on
    every operation, and "store full" on every write."""
    with server.client() as client:
        paths = client.get("/openapi.json").json()["paths"]
    operations = [(p, m, op) for p, item in paths.items() for m, op in item.items() if m != "parameters"]
    assert len(operations) >= 20
    for path, method, operation in operations:
        assert "503" in operation["responses"], (method, path)
        writes = method in ("put", "delete") or (method == "post" and path != "/api/v1/missing-blobs")
        assert ("507" in operation["responses"]) == writes, (method, path)
    assert "retry" in paths["/api/v1/builds/{key}/miss"]["get"]["responses"]["503"]["description"]


def _workers(server_pid: int) -> list[int]:
    """The uvicorn worker processes of a `serve --workers N` (spawned children; not the resource tracker)."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _read_syscalls(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    raise AssertionError("no syscr in /proc/<pid>/io")


def test_metrics_sum_all_workers(tmp_path: Path) -> None:
    """With --workers 2, requests land on both workers, and every scrape (whichever worker answers it)
    counts all of them: prometheus-client's multiprocess mode, not one worker's own counters."""
    requests = 240
    (tmp_path / "data").mkdir()
    with server_process(tmp_path / "data", "--workers", "2") as server:
        assert server.pid is not None
        deadline = time.monotonic() + 30
        while len(workers := _workers(server.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(workers) == 2, workers
        before = {pid: _read_syscalls(pid) for pid in workers}

        def one_miss(_: int) -> int:  # a new connection each time, so that either worker may accept it
            with httpx.Client(base_url=server.url) as client:
                return client.get(f"/ccache/{CCACHE_KEY}").status_code

        with ThreadPoolExecutor(16) as pool:
            assert set(pool.map(one_miss, range(requests))) == {404}
        served = {pid: _read_syscalls(pid) - before[pid] for pid in workers}
        assert all(n >= 20 for n in served.values()), f"the requests did not reach both workers: {served}"
        for _ in range(6):  # new connections: the scrapes land on either worker
            with httpx.Client(base_url=server.url) as client:
                text = client.get("/metrics").text
            assert metric(text, "kernel_ci_cache_requests_total", kind="ccache", result="miss") == requests


# -- one TCP segment per small response ---------------------------------------------------------------

TCPI_DATA_SEGS_IN = 152  # offset of tcpi_data_segs_in in Linux's struct tcp_info (since 4.6)


def _data_segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int.from_bytes(info[TCPI_DATA_SEGS_IN : TCPI_DATA_SEGS_IN + 4], "little")


def _response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length from a keep-alive socket: (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(v for k, _, v in (h.partition(b": ") for h in head.split(b"\r\n")) if k == b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_small_response_reaches_the_client_in_one_tcp_segment(server: Running, method: str) -> None:
    """Status line, headers and body in one write (protocol.GatheringTransport), as nginx sends them: two
    writes per ccache object were a quarter of the service's time per GET, and two wake-ups of the client.
    Counted by the client's kernel (TCP_INFO's data segments received), on the routed paths too."""
    obj = os.urandom(10 << 10)
    with server.client() as client:
        assert client.put(f"/ccache/{CCACHE_KEY}", content=obj).status_code == 201
    host, port = server.url.removeprefix("http://").split(":")
    targets = [f"/ccache/{CCACHE_KEY}", f"/ccache/{CCACHE_KEY[:-1]}0", "/healthz"]  # hit, miss, routed
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        for target in [targets[0], *targets]:  # the first request only warms the connection up
            before = _data_segments_in(sock)
            sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head, body = _response(sock) if method == "GET" else (sock.recv(65536), b"")
            if target == targets[0] and method == "GET":
                assert body == obj
            assert _data_segments_in(sock) - before == 1, (method, target, head[:60])
