"""The cache service's trust boundary, attacked over real HTTP (uvicorn on 127.0.0.1, raw sockets where a
client library would clean the request up): tokens per route, path tricks, what anonymous callers see,
malformed documents, and the event loop and workers an anonymous reader could tie up."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from kernel_ci.cache.server.server import ServerConfig
from kernel_ci.cache.server.service import Limits
from tests.cacheservice import READ_TOKEN, REPO, TOKEN, Running, server_in_thread, server_process, sha

KEY = "ab" * 32
CCACHE_KEY = "0123" + "abcdefghijklmnopqrstuv0123456"
WRITE_METHODS = {"PUT", "POST", "DELETE", "PATCH"}
# what each path parameter of the routing table is filled with (a new parameter must be added here)
SAMPLES = {
    "key": KEY,
    "digest": sha(b"sample"),
    "request_key": "cd" * 32,
    "run_id": "run-1",
    "part": "junit.xml",
    "name": "bzImage",
    "path": f"{CCACHE_KEY[:2]}/{CCACHE_KEY[2:]}",
}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    with server_in_thread(ServerConfig(data=tmp_path / "data")) as running:
        yield running


def _routes(app: Any) -> list[tuple[str, str, str]]:
    """(method, template, concrete path) of every route of the app's routing table."""
    found = []
    for route in app.routes:
        assert isinstance(route, Route), route
        params = dict.fromkeys(route.param_convertors, "")
        missing = [p for p in params if p not in SAMPLES]
        assert not missing, f"no sample value for path parameter(s) {missing} of {route.path}"
        path = route.path_format.format(**{p: SAMPLES[p] for p in params})
        for method in sorted(route.methods or ()):
            found.append((method, route.path, path))
    return found


def _read_posts_static() -> frozenset[tuple[str, str]]:
    from kernel_ci.cache.server.app import READ_ONLY_POSTS

    return READ_ONLY_POSTS


def _write_routes(app: Any) -> list[tuple[str, str, str]]:
    from kernel_ci.cache.server.app import READ_ONLY_POSTS

    return [r for r in _routes(app) if r[0] in WRITE_METHODS and (r[0], r[1]) not in READ_ONLY_POSTS]


def _app_routes() -> list[tuple[str, str, str]]:
    """The routing table of a real app, read when the tests are collected: one test per route."""
    import tempfile

    from kernel_ci.cache.server.server import make_app

    with tempfile.TemporaryDirectory() as scratch:
        app, _service = make_app(ServerConfig(data=Path(scratch)))
        return _routes(app)


ALL_ROUTES = _app_routes()


def test_the_routing_table_has_the_write_routes_we_know_of(server: Running) -> None:
    writes = _write_routes(server.app)
    assert len(writes) >= 8  # blobs, builds, pins (PUT, DELETE), runs, aliases, ccache (PUT, DELETE)
    assert {(m, t) for m, t, _p in writes} == {
        (m, t) for m, t, _p in ALL_ROUTES if m in WRITE_METHODS and (m, t) not in _read_posts()
    }


@pytest.mark.parametrize(
    ("method", "template", "path"),
    [r for r in ALL_ROUTES if r[0] in WRITE_METHODS and (r[0], r[1]) not in _read_posts_static()],
    ids=[f"{m} {t}" for m, t, _p in ALL_ROUTES if m in WRITE_METHODS and (m, t) not in _read_posts_static()],
)
def test_the_write_route_refuses_no_token_and_a_read_token(
    server: Running, method: str, template: str, path: str
) -> None:
    for token, wanted in ((None, 401), ("not-a-token", 401), (READ_TOKEN, 403)):
        with server.client(token=token) as client:
            response = client.request(method, path, content=b"{}")
        assert response.status_code == wanted, (method, template, token, response.text)
    with server.client(token=TOKEN) as client:  # the write token gets past the door
        response = client.request(method, path, content=b"{}")
    assert response.status_code not in (401, 403) and response.status_code < 500, (method, template)


def test_every_read_route_refuses_anonymous_callers_when_reads_are_closed(tmp_path: Path) -> None:
    config = ServerConfig(data=tmp_path / "data", anonymous_read=False)
    with server_in_thread(config) as server:
        reads = [r for r in _routes(server.app) if r[0] not in WRITE_METHODS or (r[0], r[1]) in _read_posts()]
        assert {"/metrics", "/openapi.json"} <= {template for _m, template, _p in reads}
        for method, template, path in reads:
            if template == "/healthz":
                continue  # liveness stays open (load balancers), but without details: see below
            with server.client(token=None) as client:
                response = client.request(method, path, json={"digests": []})
            assert response.status_code == 401, (method, template, response.status_code)
            with server.client(token=READ_TOKEN) as client:
                assert client.request(method, path, json={"digests": []}).status_code not in (401, 403)


def _read_posts() -> set[tuple[str, str]]:
    from kernel_ci.cache.server.app import READ_ONLY_POSTS

    return set(READ_ONLY_POSTS)


def test_healthz_shows_no_paths_bucket_or_endpoint_to_anonymous_callers(server: Running) -> None:
    with server.client(token=None) as client:
        anonymous = client.get("/healthz")
    assert anonymous.status_code == 200 and anonymous.json()["status"] == "ok"
    text = anonymous.text
    assert str(server.data) not in text and "SQLite" not in text and "local directory" not in text
    with server.client(token=READ_TOKEN) as client:
        detailed = client.get("/healthz").json()
    assert str(server.data) in detailed["index"] and "blobs" in detailed["blob_store"]


# -- path attacks over a raw request line ------------------------------------------------------------

PATH_ATTACKS = [
    "/ccache/../../etc/passwd",
    "/ccache/..%2f..%2fetc%2fpasswd",
    "/ccache/%2e%2e/%2e%2e/etc/passwd",
    "/ccache/ab/..%2f..%2f..%2fcanary",
    "/ccache/..\\..\\etc\\passwd",
    "/ccache/%5c..%5c..%5cetc%5cpasswd",
    "/ccache/ab%00cdefghijklmnopqrstuv0123456",
    "/ccache/01%2f23abcdefghijklmnopqrstuv0123456",  # decodes to a valid key: the fast path must not serve it
    "/ccache/" + "a" * 5000,
    "/api/v1/blobs/../../index.sqlite3",
    "/api/v1/blobs/..%2f..%2findex.sqlite3",
    "/api/v1/blobs/%2e%2e%2f%2e%2e%2findex.sqlite3",
    "/api/v1/blobs/" + "a" * 5000,
    f"/api/v1/builds/{KEY}/files/../../../index.sqlite3",
    f"/api/v1/builds/{KEY}/files/..%2f..%2f..%2findex.sqlite3",
    f"/api/v1/builds/{KEY}/files/" + "a/" * 3000,
    "/api/v1/builds/..%2f..%2fetc",
    "/builds/..%2findex.sqlite3",
    "/builds/./" + KEY,
    "/api/v1/aliases/..\\..\\x",
]


def raw_request(server: Running, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (no client library normalising the path); (status, body)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    response = b"".join(chunks)
    status = int(response.split(b" ", 2)[1])
    return status, response.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("target", PATH_ATTACKS, ids=range(len(PATH_ATTACKS)))
@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_path_attacks_on_the_request_line_are_a_400(server: Running, method: str, target: str) -> None:
    canary = server.data.parent / "canary"
    canary.write_bytes(b"outside the store")
    body = b"x" * 8
    request = (
        f"{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    status, payload = raw_request(server, request)
    assert status == 400, (method, target[:80], status, payload[:200])
    assert b"root:" not in payload and b"SQLite" not in payload
    assert canary.read_bytes() == b"outside the store"
    outside = {p.name for p in server.data.parent.iterdir()}
    assert outside == {"data", "canary"}, outside


# -- malformed documents: a 400 at the door, never a stored entry whose page 500s --------------------


def _manifest(digest: str, metadata_json: str) -> bytes:
    outputs = json.dumps([{"name": "bzImage", "sha256": digest, "size": 6}])
    return f'{{"outputs": {outputs}, "inputs": {{"source": "a"}}, "metadata": {metadata_json}}}'.encode()


BAD_METADATA = {
    "nan": '{"kernel": {"version": NaN}}',
    "infinity": '{"ccache": {"hit_rate": Infinity}}',
    "lone-surrogate": '{"kernel": {"version": "\\ud800"}}',
    "deep-nesting": "[" * 200_000 + "]" * 200_000,
    "series-not-a-list": '{"series": 5}',
    "fragments-not-a-list": '{"fragments": {"a": 1}}',
    "hit-rate-not-a-number": '{"ccache": {"hit_rate": "x"}}',
    "toolchain-not-an-object": '{"toolchain": "gcc 12"}',
    "kernel-not-an-object": '{"kernel": "5.10"}',
}


@pytest.mark.parametrize("name", sorted(BAD_METADATA))
def test_malformed_metadata_is_a_400_and_stores_nothing(server: Running, name: str) -> None:
    with server.client() as client:
        digest = sha(b"kernel")
        assert client.put(f"/api/v1/blobs/{digest}", content=b"kernel").status_code in (200, 201)
        response = client.put(f"/api/v1/builds/{KEY}", content=_manifest(digest, BAD_METADATA[name]))
        assert response.status_code == 400, (name, response.status_code, response.text[:300])
        assert "error" in response.json()
        assert client.get(f"/api/v1/builds/{KEY}").status_code == 404
        for page in ("/", "/api/v1/builds", f"/builds/{KEY}"):
            assert client.get(page).status_code < 500, page


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/missing-blobs", b'{"digests": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
        (f"/api/v1/builds/{KEY}/runs/r1", b'{"junit": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
        ("/api/v1/missing-blobs", b'{"digests": [1, 2]}'),
    ],
)
def test_deeply_nested_or_mistyped_json_bodies_are_a_400(server: Running, path: str, body: bytes) -> None:
    with server.client() as client:
        method = "POST" if path.endswith("missing-blobs") else "PUT"
        response = client.request(method, path, content=body)
    assert response.status_code in (400, 404), (path, response.status_code, response.text[:200])


@pytest.mark.parametrize(
    "request_head",
    [
        "GET /api/v1/builds?limit=%C2%B2 HTTP/1.1\r\nHost: x\r\n",  # '²' passes str.isdigit()
        "GET /?offset=%D9%A1 HTTP/1.1\r\nHost: x\r\n",  # an Arabic-Indic digit
        f"PUT /api/v1/blobs/{sha(b'x')} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Length: \u00b2\r\n",
    ],
)
def test_unicode_digits_in_numbers_are_a_400(server: Running, request_head: str) -> None:
    status, payload = raw_request(server, (request_head + "Connection: close\r\n\r\n").encode("latin-1"))
    assert status == 400, (status, payload[:200])


def test_pages_tolerate_bad_data_already_in_the_index(server: Running) -> None:
    """An entry stored before validation existed (or by another version) renders, it does not 500."""
    assert server.service is not None
    with server.client() as client:
        digest = sha(b"kernel")
        client.put(f"/api/v1/blobs/{digest}", content=b"kernel")
    doc = {
        "schema": 1,
        "outputs": [{"name": "bzImage", "sha256": digest, "size": 6, "kind": "file"}],
        "inputs": {"source": "a"},
        "metadata": {"ccache": {"hit_rate": "x"}, "toolchain": "gcc", "series": 5, "kernel": "5.10"},
        "key": KEY,
    }
    server.service.index.build_put(KEY, doc, {"source": "a"}, {"series": 5, "ccache_hit_rate": "x"}, 6)
    with server.client() as client:
        for page in ("/", f"/builds/{KEY}", "/api/v1/builds", f"/api/v1/builds/{KEY}"):
            assert client.get(page).status_code == 200, page


def test_script_in_stored_metadata_is_escaped_on_the_pages(server: Running) -> None:
    script = "<script>alert(1)</script>"
    with server.client() as client:
        digest = sha(b"kernel")
        client.put(f"/api/v1/blobs/{digest}", content=b"kernel")
        metadata = {"kernel": {"version": script, "release": script}, "series": [script], "reproduce": script}
        body = _manifest(digest, json.dumps(metadata))
        assert client.put(f"/api/v1/builds/{KEY}", content=body).status_code == 201
        for page in ("/", f"/builds/{KEY}"):
            html = client.get(page).text
            assert script not in html and "&lt;script&gt;" in html, page


# -- an anonymous reader must not be able to tie up the workers or the event loop -------------------


def _read_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/<pid>/io")


def test_a_blob_get_reads_the_blob_once_not_twice(tmp_path: Path) -> None:
    data = os.urandom(48 << 20)
    digest = sha(data)
    (tmp_path / "data").mkdir()
    with server_process(tmp_path / "data") as server, server.client() as client:
        assert server.pid is not None
        assert client.put(f"/api/v1/blobs/{digest}", content=data).status_code == 201
        before = _read_bytes(server.pid)
        got = client.get(f"/api/v1/blobs/{digest}")
        read = _read_bytes(server.pid) - before
        assert got.status_code == 200 and sha(got.content) == digest
        assert read < 1.5 * len(data), f"the server read {read / len(data):.2f}x the blob for one GET"


def test_scrub_finds_a_corrupt_large_blob_and_forgets_it(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    digest = sha(data)
    with server_in_thread(ServerConfig(data=tmp_path / "data")) as server, server.client() as client:
        assert client.put(f"/api/v1/blobs/{digest}", content=data).status_code == 201
    path = tmp_path / "data" / "blobs" / digest[:2] / digest
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # bit rot in a large blob
    scrub = subprocess.run(
        [sys.executable, "-m", "kernel_ci.cli.main", "cache", "scrub", "--data", str(tmp_path / "data")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert scrub.returncode == 1, scrub.stdout + scrub.stderr  # corruption found: a non-zero exit
    assert digest in scrub.stdout + scrub.stderr
    assert not path.exists() and list((tmp_path / "data" / "blobs" / "corrupt").iterdir())
    with server_in_thread(ServerConfig(data=tmp_path / "data")) as server, server.client() as client:
        assert client.head(f"/api/v1/blobs/{digest}").status_code == 404
        assert client.put(f"/api/v1/blobs/{digest}", content=data).status_code == 201  # healed by a re-push


class _LoopHashSpy:
    """hashlib.sha256 that records how many bytes each call hashed on a thread running an event loop."""

    def __init__(self) -> None:
        self.real = hashlib.sha256
        self.on_loop: list[int] = []

    def _note(self, size: int) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self.on_loop.append(size)

    def __call__(self, data: bytes = b"", **kwargs: Any) -> Any:
        spy = self
        inner = self.real(data, **kwargs)
        self._note(len(data))

        class Hash:
            def update(self, chunk: bytes) -> None:
                spy._note(len(chunk))
                inner.update(chunk)

            def hexdigest(self) -> str:
                return inner.hexdigest()

            def digest(self) -> bytes:
                return inner.digest()

        return Hash()


def test_ccache_hashing_never_runs_big_inputs_on_the_event_loop(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _LoopHashSpy()
    monkeypatch.setattr(hashlib, "sha256", spy)
    big = os.urandom(8 << 20)
    with server.client() as client:
        assert client.put(f"/ccache/{CCACHE_KEY}", content=big).status_code == 201
        assert client.get(f"/ccache/{CCACHE_KEY}").content == big
        assert client.get(f"/ccache/{CCACHE_KEY[:2]}/{CCACHE_KEY[2:]}").content == big
    from kernel_ci.cache.server.app import INLINE_HASH_MAX

    assert max(spy.on_loop, default=0) <= INLINE_HASH_MAX, sorted(spy.on_loop)[-3:]


def test_oversize_limits_are_kept_with_small_limits(tmp_path: Path) -> None:
    limits = Limits(max_ccache_object_bytes=100)
    with server_in_thread(ServerConfig(data=tmp_path / "d", limits=limits)) as server, server.client() as c:
        assert c.put(f"/ccache/{CCACHE_KEY}", content=b"y" * 101).status_code == 413
        assert c.put(f"/ccache/{CCACHE_KEY}", content=b"y" * 100).status_code == 201
        assert httpx.get(f"{server.url}/ccache/{CCACHE_KEY}").content == b"y" * 100


def test_a_huge_junit_report_is_refused_not_parsed(tmp_path: Path) -> None:
    """A write token holder must not make the service read a multi-GiB blob into memory to parse it."""
    from kernel_ci.cache.server.service import MAX_JUNIT_BYTES

    with server_in_thread(ServerConfig(data=tmp_path / "d")) as server, server.client() as client:
        digest = sha(b"kernel")
        client.put(f"/api/v1/blobs/{digest}", content=b"kernel")
        assert client.put(f"/api/v1/builds/{KEY}", content=_manifest(digest, "{}")).status_code == 201
        junit = b"<testsuites>" + b" " * MAX_JUNIT_BYTES + b"</testsuites>"
        assert client.put(f"/api/v1/blobs/{sha(junit)}", content=junit).status_code == 201
        run = {"junit": {"sha256": sha(junit), "size": len(junit)}}
        response = client.put(f"/api/v1/builds/{KEY}/runs/r1", json=run)
        assert response.status_code == 413, response.text
        assert "JUnit" in response.json()["error"]


def test_stalled_uploads_do_not_starve_the_readers(server: Running) -> None:
    """A write token holder opens many uploads and sends nothing more: each must not pin a worker thread
    for its whole duration, or the thread pool (40) is exhausted and every read that needs it waits."""
    host, port = server.url.removeprefix("http://").split(":")
    stalled = []
    try:
        for i in range(48):
            sock = socket.create_connection((host, int(port)), timeout=30)
            digest = sha(str(i).encode())
            sock.sendall(
                f"PUT /api/v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Length: {1 << 20}\r\n\r\nx".encode()
            )
            stalled.append(sock)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert client.get("/api/v1/builds").status_code == 200
            assert client.get(f"/api/v1/blobs/{sha(b'none')}").status_code == 404
    finally:
        for sock in stalled:
            sock.close()


def _publish_small(client: httpx.Client, key: str, source: str) -> None:
    data = source.encode()
    assert client.put(f"/api/v1/blobs/{sha(data)}", content=data).status_code in (200, 201)
    doc = {
        "outputs": [{"name": "bzImage", "sha256": sha(data), "size": len(data)}],
        "inputs": {"source": source},
    }
    assert client.put(f"/api/v1/builds/{key}", json=doc).status_code in (200, 201)


def test_miss_explanations_are_bounded_so_anonymous_readers_cannot_hold_the_workers(server: Running) -> None:
    """Each "why did this miss" diff reads every build's inputs: anonymous readers asking for many at once
    would hold every worker thread. At most a few run at once; the others are a 503 with Retry-After, at
    once, while the admitted ones are still running, and the page shows the build without its diff."""
    assert server.service is not None
    with server.client() as client:
        _publish_small(client, KEY, "linux-6.1")
        _publish_small(client, "cd" * 32, "linux-6.6")
    index = server.service.index
    real_all_inputs = index.all_inputs
    entered = threading.Semaphore(0)
    release = threading.Event()
    inside: list[int] = []

    def slow_all_inputs() -> list[tuple[str, dict[str, str]]]:  # the real query, held until released
        inside.append(1)
        entered.release()
        release.wait(60)
        return real_all_inputs()

    index.all_inputs = slow_all_inputs  # type: ignore[method-assign]
    attackers = 12
    with httpx.Client(base_url=server.url, timeout=60) as anonymous, ThreadPoolExecutor(attackers) as pool:
        try:
            futures = [pool.submit(anonymous.get, f"/api/v1/builds/{KEY}/miss") for _ in range(attackers)]
            assert entered.acquire(timeout=30)  # at least one explanation is running (and held)
            refused: list[httpx.Response] = []
            deadline = time.monotonic() + 30
            while len(refused) < attackers - 2 and time.monotonic() < deadline:
                time.sleep(0.05)
                refused = [f.result() for f in futures if f.done()]
            assert len(refused) >= attackers - 2, f"only {len(refused)} of {attackers} answered while held"
            assert all(r.status_code == 503 for r in refused), [r.status_code for r in refused]
            assert all(r.headers["retry-after"] == "1" and "retry" in r.json()["error"] for r in refused)
            assert len(inside) <= 2, f"{len(inside)} explanations ran at once"
            page = anonymous.get(f"/builds/{KEY}")
            assert page.status_code == 200 and "reload this page in a moment" in page.text
            assert anonymous.get(f"/api/v1/blobs/{sha(b'linux-6.1')}").status_code == 200
        finally:
            release.set()
        admitted = [f.result() for f in futures if f.result().status_code != 503]
    assert admitted and all(r.status_code == 200 and r.json()["nearest"] == "cd" * 32 for r in admitted)
    with httpx.Client(base_url=server.url, timeout=60) as anonymous:  # slots are given back
        assert anonymous.get(f"/api/v1/builds/{KEY}/miss").status_code == 200
        assert "reload this page" not in anonymous.get(f"/builds/{KEY}").text


def test_a_flood_of_idle_connections_gets_a_503_not_unbounded_memory(tmp_path: Path) -> None:
    """`serve --limit-concurrency N`: past N open connections uvicorn answers 503 at once (each connection
    otherwise costs memory and a file descriptor for as long as the client likes); below it, all is well."""
    (tmp_path / "data").mkdir()
    with server_process(tmp_path / "data", "--limit-concurrency", "6") as server:
        host, port = server.url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(8)]
        try:
            time.sleep(0.5)  # let the server accept them
            with httpx.Client(base_url=server.url, timeout=10) as client:
                assert client.get("/api/v1/builds").status_code == 503
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.5)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert client.get("/api/v1/builds").status_code == 200


@pytest.mark.parametrize("value", ["0", "-3", "lots"])
def test_a_bad_limit_concurrency_is_a_usage_error(tmp_path: Path, value: str) -> None:
    cmd = [sys.executable, "-m", "kernel_ci.cli.main", "cache", "serve", "--data", str(tmp_path)]
    done = subprocess.run([*cmd, "--limit-concurrency", value], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "--limit-concurrency" in done.stderr, done.stderr


def test_script_in_every_untrusted_page_field_is_escaped(server: Running) -> None:
    """Each field a writer controls, on each page: metadata, fragments, a run's outcome, the JUnit
    report's suite/test names and messages, and the inputs that the miss explanation quotes."""
    script = "<script>alert(1)</script>"
    xml = (
        f'<testsuites><testsuite name="s{script}"><testcase name="t{script}">'
        f'<failure message="m{script}"/></testcase></testsuite></testsuites>'
    ).encode()
    xml = xml.replace(b"<script>", b"&lt;script&gt;").replace(b"</script>", b"&lt;/script&gt;")
    other = "cd" * 32
    with server.client() as client:
        digest = sha(b"kernel")
        client.put(f"/api/v1/blobs/{digest}", content=b"kernel")
        junit_digest = sha(xml)
        client.put(f"/api/v1/blobs/{junit_digest}", content=xml)
        metadata = {"fragments": [script], "toolchain": {"gcc": script}, "kernel": {"version": script}}
        for key, source in ((KEY, script), (other, "b")):
            outputs = json.dumps([{"name": "bzImage", "sha256": digest, "size": 6}])
            body = json.dumps(
                {
                    "outputs": json.loads(outputs),
                    "inputs": {"source": source, script: script},
                    "metadata": metadata,
                }
            ).encode()
            assert client.put(f"/api/v1/builds/{key}", content=body).status_code == 201
        run = {"junit": {"sha256": junit_digest, "size": len(xml)}, "outcome": script[:60]}
        assert client.put(f"/api/v1/builds/{KEY}/runs/r1", json=run).status_code == 201, "run refused"
        for page in ("/", f"/builds/{KEY}", f"/builds/{other}", f"/builds/{'ef' * 32}"):
            html = client.get(page).text
            assert "<script" not in html, (page, html[html.find("<script") - 200 :][:400])
        assert html.count("&lt;script&gt;") == 0  # the not-found page quotes only a validated key
        assert client.get(f"/builds/{KEY}").text.count("&lt;script&gt;") >= 6


def test_a_blob_file_swapped_for_another_with_its_timestamps_is_refused(server: Running) -> None:
    """A small blob is re-hashed on read unless its file still carries the stamp of ITS digest (set when
    it was verified on write): a file copied over it with timestamps kept (cp -p, rsync -t, a restore
    from backup into the wrong name) carries another digest's stamp and is still caught."""
    blobs = server.data / "blobs"
    with server.client() as client:
        for body in (b"object-A", b"object-B"):
            assert client.put(
                f"/ccache/{CCACHE_KEY[:-1]}{body[-1:].decode().lower()}", content=body
            ).is_success
        a_key, a_path = f"{CCACHE_KEY[:-1]}a", blobs / sha(b"object-A")[:2] / sha(b"object-A")
        b_path = blobs / sha(b"object-B")[:2] / sha(b"object-B")
        assert client.get(f"/ccache/{a_key}").content == b"object-A"
        shutil.copy2(b_path, a_path)  # the other blob's bytes, mode and timestamps
        got = client.get(f"/ccache/{a_key}")
        assert got.status_code == 404 and b"object-B" not in got.content, "served another blob's bytes"
        assert list((blobs / "corrupt").iterdir())
