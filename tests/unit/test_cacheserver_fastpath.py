"""The ccache read fast path against the routes, attacked: every request, hostile or not, gets the same bytes
from a service with it (middleware.CcacheFastPath, before Starlette) as from one without it, over one store,
and counts the same in the metrics. Two real services on 127.0.0.1, requests as raw bytes (no client library
fixing them up)."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from kernel_ci.cache.server.middleware import INLINE_HASH_MAX
from kernel_ci.cache.server.server import ServerConfig
from kernel_ci.cache.server.service import Limits
from tests.cacheservice import READ_TOKEN, REPO, TOKEN, Running, metric, server_in_thread, server_process, sha

KEY = "0123" + "abcdefghijklmnopqrstuv0123456"  # 33 chars of [0-9a-v] (ccache <= 4.12)
HEX_KEY = "ab" * 20  # 40 hex (ccache >= 4.13)
EMPTY_KEY = "0" * 33
BIG_KEY = "1" * 33  # larger than what the event loop reads itself: the fast path hands it on
MISSING_KEY = "2" * 33
BAZEL = "cd" * 32
OBJECTS = {
    f"/ccache/{KEY[:2]}/{KEY[2:]}": os.urandom(10 << 10),
    f"/ccache/{HEX_KEY}": os.urandom(3000),
    f"/ccache/{EMPTY_KEY[:2]}/{EMPTY_KEY[2:]}": b"",
    f"/ccache/{BIG_KEY[:2]}/{BIG_KEY[2:]}": os.urandom(INLINE_HASH_MAX + 1),
    f"/ccache/ac/{BAZEL}": os.urandom(100),
}
HIT = f"/ccache/{KEY[:2]}/{KEY[2:]}"

TARGETS = [
    *OBJECTS,
    f"/ccache/{KEY}",  # the same object, flat layout
    f"/ccache/{MISSING_KEY[:2]}/{MISSING_KEY[2:]}",
    HIT + "?x=1&y",
    HIT + "#fragment",
    # path attacks: the path guard's 400, or the routes' answer, never the fast path's
    "/ccache/../../etc/passwd",
    "/ccache/%2e%2e/%2e%2e/etc/passwd",
    "/ccache/..%2f..%2fcanary",
    f"/ccache/{KEY[:2]}%2f{KEY[2:]}",  # decodes to a valid key
    f"/ccache/{KEY[:2]}/{KEY[2:-1]}%{ord(KEY[-1]):02x}",  # an encoded letter: decodes to the hit
    f"/ccache/{KEY[:2]}/{KEY[2:]}%00",
    f"/ccache/{KEY[:2]}\\{KEY[2:]}",
    f"/ccache//{KEY}",
    f"/ccache/./{KEY}",
    f"/ccache/{KEY[:2]}/./{KEY[2:]}",
    f"/ccache/{KEY}/",
    f"/ccache/{KEY.upper()}",
    f"/ccache/{KEY}0",  # one character too many
    f"/ccache/{KEY[:-1]}",
    "/ccache/" + "a" * 1000,  # under the path guard's limit, not a key
    "/ccache/" + "a" * 5000,
    "/ccache/",
    "/ccache",
    f"/CCACHE/{KEY}",
    f"//ccache/{KEY}",
    f"http://127.0.0.1/ccache/{KEY}",  # absolute-form request target
    f"/ccache/{KEY[:2]}/{KEY[2:]}\x7f",
    f"/ccache/{KEY[:2]}/{KEY[2:]}\xe9",  # a non-ASCII byte (sent as Latin-1)
]

AUTHORIZATIONS: list[list[str]] = [
    [],
    [f"Bearer {READ_TOKEN}"],
    [f"Bearer {TOKEN}"],
    ["Bearer wrong-token"],
    ["Basic " + base64.b64encode(f"ccache:{READ_TOKEN}".encode()).decode()],
    ["Basic " + base64.b64encode(b"ccache:wrong").decode()],
    ["Basic !!!not-base64"],
    ["Digest username=x"],
    ["Bearer "],
    ["Bearer wrong-token", f"Bearer {READ_TOKEN}"],  # two headers: the first one counts, on every path
    [f"Bearer {READ_TOKEN}", "Bearer wrong-token"],
]

_DATE = re.compile(rb"^date: [^\r]*\r\n", re.IGNORECASE | re.MULTILINE)


def request(method: str, target: str, auth: Sequence[str] = (), extra: str = "", body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: x", *(f"Authorization: {a}" for a in auth)]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1") + body


def exchange(server: Running, data: bytes) -> bytes:
    """Send raw bytes, then read until the server closes (the last request says Connection: close); the
    answer without its Date header (the one thing that may differ between two servers)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    return _DATE.sub(b"", b"".join(chunks))


@pytest.fixture(params=[True, False], ids=["anonymous-read", "no-anonymous-read"])
def pair(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Running, Running]]:
    """(with the fast paths, without them): two services over one store, the objects stored."""
    data = tmp_path / "data"
    with (
        server_in_thread(ServerConfig(data=data, anonymous_read=request.param)) as fast,
        server_in_thread(ServerConfig(data=data, anonymous_read=request.param), fast_path=False) as routed,
    ):
        with fast.client() as client:
            for path, content in OBJECTS.items():
                assert client.put(path, content=content).status_code == 201
        yield fast, routed


CLOSE = "Connection: close\r\n"
FULL_AUTH_TARGETS = {
    HIT,
    f"/ccache/{MISSING_KEY[:2]}/{MISSING_KEY[2:]}",
    f"/ccache/{BIG_KEY[:2]}/{BIG_KEY[2:]}",
}


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response else 0


def test_every_read_and_path_attack_gets_the_routes_answer(pair: tuple[Running, Running]) -> None:
    """GET and HEAD of objects, misses and hostile paths, with every kind of credential: byte for byte the
    answer of the routes (status, headers, JSON error), and the same metrics."""
    fast, routed = pair
    statuses = set()
    for method in ("GET", "HEAD"):
        for target in TARGETS:
            for auth in AUTHORIZATIONS if target in FULL_AUTH_TARGETS else AUTHORIZATIONS[:2]:
                raw = request(method, target, auth, CLOSE)
                got, want = exchange(fast, raw), exchange(routed, raw)
                assert got == want, (method, target[:60], auth, got[:300], want[:300])
                statuses.add(_status(got))
    assert {200, 400, 401, 404} <= statuses, statuses
    _compare_metrics(fast, routed)


METHOD_CONFUSION = [
    request("PUT", HIT, [f"Bearer {READ_TOKEN}"], "Content-Length: 5\r\n" + CLOSE, b"owned"),
    request("PUT", HIT, [], "Content-Length: 5\r\n" + CLOSE, b"owned"),
    request("PUT", HIT, ["Bearer wrong-token"], "Content-Length: 5\r\n" + CLOSE, b"owned"),
    request("DELETE", HIT, [f"Bearer {READ_TOKEN}"], CLOSE),
    request("DELETE", HIT, [], CLOSE),
    request("POST", HIT, [f"Bearer {TOKEN}"], "Content-Length: 2\r\n" + CLOSE, b"{}"),
    request("OPTIONS", HIT, [f"Bearer {READ_TOKEN}"], CLOSE),
    request("PATCH", HIT, [f"Bearer {TOKEN}"], CLOSE),
    request("get", HIT, [f"Bearer {READ_TOKEN}"], CLOSE),  # not a method: the parser's 400
    request("GET", HIT, [f"Bearer {READ_TOKEN}"], "Content-Length: 3\r\n" + CLOSE, b"abc"),
    request("HEAD", HIT, [f"Bearer {READ_TOKEN}"], "Content-Length: 3\r\n" + CLOSE, b"abc"),
    request(
        "GET",
        HIT,
        [f"Bearer {READ_TOKEN}"],
        "Transfer-Encoding: chunked\r\n" + CLOSE,
        b"3\r\nabc\r\n0\r\n\r\n",
    ),
    request("GET", HIT, [f"Bearer {READ_TOKEN}"], "Expect: 100-continue\r\n" + CLOSE),
    request("GET", HIT, [f"Bearer {READ_TOKEN}"], "Upgrade: websocket\r\nConnection: upgrade\r\n")
    + request("GET", HIT, [f"Bearer {READ_TOKEN}"], CLOSE),
    request("GET", HIT, [f"Bearer {READ_TOKEN}"]).replace(b"HTTP/1.1", b"HTTP/1.0"),  # 1.0: closed after
    request("GET", HIT, [f"Bearer {READ_TOKEN}"], "Connection: keep-alive\r\n").replace(
        b"HTTP/1.1", b"HTTP/1.0"
    )
    + request("HEAD", HIT, [f"Bearer {READ_TOKEN}"], CLOSE),
    b"GET "
    + HIT.encode()
    + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
    + READ_TOKEN.encode()
    + b"\n\r\n",
    b"GET " + HIT.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization\r\n" + CLOSE.encode() + b"\r\n",
    b"GET " + HIT.encode() + b"\r\n\r\n",  # no HTTP version
]


@pytest.mark.parametrize("raw", METHOD_CONFUSION, ids=range(len(METHOD_CONFUSION)))
def test_writes_bodies_and_odd_requests_get_the_routes_answer(
    pair: tuple[Running, Running], raw: bytes
) -> None:
    """A write with a read token or none, a read with a body, an upgrade, HTTP/1.0, malformed request lines:
    what the routes (or uvicorn) answer, and nothing stored changes."""
    fast, routed = pair
    got, want = exchange(fast, raw), exchange(routed, raw)
    assert got == want, (raw[:120], got[:300], want[:300])
    with fast.client() as client:
        assert client.get(HIT).content == OBJECTS[HIT]


def _read_response(sock: socket.socket, head_only: bool) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"content-length: (\d+)", head)
    length = 0 if head_only or match is None else int(match.group(1))
    while len(body) < length:
        body += sock.recv(65536)
    assert len(body) == length, (head, len(body))
    return _DATE.sub(b"", head + b"\r\n\r\n") + body


KEEP_ALIVE = [
    ("GET", HIT, [f"Bearer {READ_TOKEN}"]),
    ("HEAD", HIT, []),
    ("GET", f"/ccache/{MISSING_KEY}", []),
    ("GET", "/ccache/%2e%2e/x", []),
    ("GET", f"/ccache/{BIG_KEY}", [f"Bearer {READ_TOKEN}"]),
    ("GET", HIT, ["Bearer wrong-token"]),
    ("GET", "/healthz", []),
    ("GET", f"/ccache/{HEX_KEY}", [f"Bearer {TOKEN}"]),
    ("GET", f"/ccache/{EMPTY_KEY}", [f"Bearer {READ_TOKEN}"]),
]


def test_keep_alive_and_pipelined_reads_get_the_routes_answers(pair: tuple[Running, Running]) -> None:
    """One connection: requests one at a time, then all at once (pipelined, fast and routed ones mixed):
    the same answers in the same order."""
    fast, routed = pair
    answers = []
    for server in (fast, routed):
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            one_by_one = []
            for method, target, auth in KEEP_ALIVE:
                sock.sendall(request(method, target, auth))
                one_by_one.append(_read_response(sock, method == "HEAD"))
        pipelined = b"".join(request(m, t, a) for m, t, a in KEEP_ALIVE) + request("GET", HIT, [], CLOSE)
        answers.append((one_by_one, exchange(server, pipelined)))
    assert answers[0] == answers[1]
    assert _status(answers[0][0][0]) == 200 and _status(answers[0][0][3]) == 400


def one_answer(server: Running, raw: bytes, head_only: bool) -> bytes:
    """Send ``raw`` (one segment, on a connection of its own, kept alive), read one answer: by its
    Content-Length, or until the server closes (a parser's 400). Without its Date header. Not
    ``_read_response``: uvicorn's 400 to a malformed HEAD carries a body, which that one refuses."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        match = re.search(rb"content-length: (\d+)", head)
        length = 0 if head_only or match is None else int(match.group(1))
        while len(body) < length and (chunk := sock.recv(65536)):
            body += chunk
    return _DATE.sub(b"", head + b"\r\n\r\n") + body


def test_reads_answered_before_the_parser_are_the_routes_answers(pair: tuple[Running, Running]) -> None:
    """The ccache client's form (one whole request per segment, keep-alive, no Connection header): every
    target and credential gets the routes' bytes, the hits are answered before the HTTP parser
    (protocol.EarlyCcacheProtocol), and the metrics count the same."""
    fast, routed = pair
    assert fast.app.fast is not None and routed.app.fast is None
    for method in ("GET", "HEAD"):
        for target in TARGETS:
            for auth in AUTHORIZATIONS if target in FULL_AUTH_TARGETS else AUTHORIZATIONS[:2]:
                raw = request(method, target, auth)
                got, want = one_answer(fast, raw, method == "HEAD"), one_answer(routed, raw, method == "HEAD")
                assert got == want, (method, target[:60], auth, got[:300], want[:300])
    _compare_metrics(fast, routed)
    before = fast.app.fast.early
    got = one_answer(fast, request("GET", HIT, [f"Bearer {READ_TOKEN}"]), False)
    assert _status(got) == 200 and got.endswith(OBJECTS[HIT]) and fast.app.fast.early == before + 1


EARLY_LOOKALIKES = [
    # a body or framing header: a smuggled second request must never be answered as a read of its own
    request("GET", HIT, [f"Bearer {READ_TOKEN}"], "Content-Length: 46\r\n")
    + f"GET /ccache/{MISSING_KEY} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    request("GET", HIT, [f"Bearer {READ_TOKEN}"], "Content-Length: 0\r\n"),
    request("GET", HIT, [f"Bearer {READ_TOKEN}"], "Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
    request("GET", HIT, [f"Bearer {READ_TOKEN}"], "Transfer-Encoding: chunked\r\n"),
    request("GET", HIT, [f"Bearer {READ_TOKEN}"], "Connection: close\r\n"),
    request("GET", HIT, [f"Bearer {READ_TOKEN}"], "Connection: keep-alive, Upgrade\r\nUpgrade: h2c\r\n"),
    request("GET", HIT, [f"Bearer {READ_TOKEN}"], "Expect: 100-continue\r\n"),
    # two requests in one segment (pipelined): answered in order by the parser's path
    request("GET", HIT, [f"Bearer {READ_TOKEN}"]) + request("HEAD", HIT, []),
    # forms llhttp reads differently or refuses
    request("GET", HIT, ["Bearer wrong-token"], f"X-Fold: a\r\n Bearer {READ_TOKEN}\r\n"),  # obs-fold
    request("GET", HIT, [], f"Authorization : Bearer {READ_TOKEN}\r\n"),  # space before the colon
    request("GET", HIT, [], f"Author\x01ization: Bearer {READ_TOKEN}\r\n"),
    request("GET", HIT, [], f"Authorization: Bearer {READ_TOKEN}\xe9\r\n"),  # obs-text
    request("GET", HIT, [f"Bearer {READ_TOKEN}"]).replace(b"\r\n", b"\n"),  # bare LF
    request("GET", HIT, [f"Bearer {READ_TOKEN}"]).replace(b"HTTP/1.1", b"HTTP/1.0"),
    request("GET", HIT, [f"Bearer {READ_TOKEN}"]).replace(b"GET ", b"GET  "),
    request("GET", HIT, [f"Bearer {READ_TOKEN}"]).replace(b"GET ", b"GET\t"),
    request("GET", HIT, [f"Bearer {READ_TOKEN}"]).replace(b"GET", b"get"),
    request("GET", HIT + "?x", [f"Bearer {READ_TOKEN}"]),
    request("GET", f"http://x{HIT}", [f"Bearer {READ_TOKEN}"]),
    request("GET", HIT, [f"Bearer {READ_TOKEN}"], "".join(f"X-{i}: y\r\n" for i in range(40))),
    request("GET", HIT, [f"Bearer {READ_TOKEN}"], "X-Long: " + "y" * 9000 + "\r\n"),
]


@pytest.mark.parametrize("raw", EARLY_LOOKALIKES, ids=range(len(EARLY_LOOKALIKES)))
def test_requests_almost_in_the_early_form_go_to_the_parser(
    pair: tuple[Running, Running], raw: bytes
) -> None:
    """Requests that look like a ccache client's but are framed, folded, pipelined or spelled otherwise:
    none is answered before the parser, and each gets the routes' (or uvicorn's) bytes, followed on the
    same connection by the answer to a second request when the first left it open."""
    fast, routed = pair
    before = fast.app.fast.early
    answers = []
    for server in (fast, routed):
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(raw)
            time.sleep(0.2)  # the next request in a segment of its own
            with contextlib.suppress(OSError):  # closed by the server after a refusal or HTTP/1.0
                sock.sendall(request("GET", "/healthz", [], CLOSE))
            chunks = []
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(1 << 20):
                    chunks.append(chunk)
        answers.append(_DATE.sub(b"", b"".join(chunks)))
    assert answers[0] == answers[1], (raw[:200], answers[0][:400], answers[1][:400])
    assert fast.app.fast.early == before


def test_a_client_that_never_reads_its_answers_costs_the_server_bounded_memory(tmp_path: Path) -> None:
    """Reads sent one per segment, as fast as the server answers them, by a client that reads nothing: once
    the socket's buffers are full, the server holds at most uvicorn's flow-control limit of answers in
    memory (its write buffer), not one answer per request sent (~60 MB here)."""
    big = "4" * 33
    content = os.urandom(INLINE_HASH_MAX - 1024)  # the largest kind answered before the parser
    with server_in_thread(ServerConfig(data=tmp_path / "data")) as fast:
        with fast.client() as client:
            assert client.put(f"/ccache/{big}", content=content).status_code == 201
        host, port = fast.url.removeprefix("http://").split(":")
        raw = request("GET", f"/ccache/{big}", [f"Bearer {READ_TOKEN}"])
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            for _ in range(1000):
                sock.sendall(raw)
                time.sleep(0.001)  # each in a segment of its own while the server keeps up
            time.sleep(1)
            buffered = [
                conn.transport.get_write_buffer_size() for conn in list(fast.server.server_state.connections)
            ]
        assert fast.app.fast.early > 0
        assert buffered and max(buffered) < 1 << 20, buffered


def _compare_metrics(fast: Running, routed: Running) -> None:
    """The same counts on both: hits and misses, responses by method and code, latency observations."""
    with fast.client() as a, routed.client() as b:
        texts = a.get("/metrics").text, b.get("/metrics").text
    for labels in ({"result": "hit"}, {"result": "miss"}):
        got, want = (metric(t, "kernel_ci_cache_requests_total", kind="ccache", **labels) for t in texts)
        assert got == want, (labels, got, want)
    for method in ("GET", "HEAD"):
        for code in ("200", "400", "401", "404"):
            labels = {"route": "ccache", "method": method, "code": code}
            got, want = (metric(t, "kernel_ci_cache_http_responses_total", **labels) for t in texts)
            assert got == want, (labels, got, want)
        got, want = (
            metric(t, "kernel_ci_cache_request_duration_seconds_count", route="ccache", method=method)
            for t in texts
        )
        assert got == want, (method, got, want)


def test_an_unexpected_error_in_a_read_gets_the_routes_500(pair: tuple[Running, Running]) -> None:
    """A look-up that fails in a way nobody planned for (here a row whose size is not a number) is the
    routes' logged 500 on both services, not the HTTP parser's 400 for a malformed request."""
    fast, routed = pair
    bad = "3" * 33
    with sqlite3.connect(fast.data / "index.sqlite3") as db:
        db.execute("INSERT INTO ccache VALUES (?, ?, 'not a size', 0)", (bad, "ab" * 32))
    raw = request("GET", f"/ccache/{bad}", [f"Bearer {READ_TOKEN}"], CLOSE)
    got, want = exchange(fast, raw), exchange(routed, raw)
    assert _status(want) == 500 and got == want, (got[:300], want[:300])


# -- answers kept in memory (memory.py) and their invalidation by the index's change generation ----------


def _memory(server: Running):  # type: ignore[no-untyped-def]
    """The fast path's memory of answers (white box: to show that a test did go through it)."""
    memory = server.app.fast.memory
    assert memory is not None
    return memory


def _same(fast: Running, routed: Running, *targets: str) -> list[bytes]:
    """GET and HEAD of each target, with and without a token: byte for byte the routes' answers."""
    answers = []
    pair = (fast, routed)
    for target in targets:
        for method in ("GET", "HEAD", "GET"):
            for auth in ([f"Bearer {READ_TOKEN}"], []):  # first: the answer the callers check
                raw = request(method, target, auth, CLOSE)
                got, want = exchange(fast, raw), exchange(routed, raw)
                assert got == want, (method, target, auth, got[:300], want[:300])
                # the same read in a ccache client's form: answered before the parser (EarlyCcacheProtocol)
                early = [
                    one_answer(server, request(method, target, auth), method == "HEAD") for server in pair
                ]
                assert early == [got.replace(b"connection: close\r\n", b"")] * 2, (method, target, auth)
                answers.append(got)
    return answers


HIT_KEY = KEY


def test_repeated_reads_are_answered_from_memory_as_the_routes_answer(pair: tuple[Running, Running]) -> None:
    """The second and later GETs of an object come from the worker's memory: the same bytes, headers and
    metrics (hits, responses, latencies) as reads through the routes; HEAD too; big objects and misses
    are never kept."""
    fast, routed = pair
    memory = _memory(fast)
    assert len(memory) == 0
    _same(fast, routed, HIT, f"/ccache/{HEX_KEY}", f"/ccache/{EMPTY_KEY}", f"/ccache/ac/{BAZEL}")
    kept = {
        memory.get(p) is not None
        for p in (HIT, f"/ccache/{HEX_KEY}", f"/ccache/{EMPTY_KEY}", f"/ccache/ac/{BAZEL}")
    }
    assert kept == {True}, kept
    _same(fast, routed, f"/ccache/{BIG_KEY}", f"/ccache/{MISSING_KEY}")
    assert memory.get(f"/ccache/{BIG_KEY}") is None and memory.get(f"/ccache/{MISSING_KEY}") is None
    assert len(memory) == 4
    _compare_metrics(fast, routed)


def _put(server: Running, target: str, content: bytes) -> None:
    with server.client() as client:
        assert client.put(target, content=content).status_code == 201


def _fill(fast: Running, routed: Running, content: bytes = OBJECTS[HIT]) -> None:
    """Two GETs of HIT from each (the same metrics on both): the fast one keeps the answer in memory."""
    for server in (fast, routed):
        with server.client(token=READ_TOKEN) as client:
            for _ in range(2):
                assert client.get(HIT).content == content
    assert _memory(fast).get(HIT) is not None  # the attack starts from a kept answer


def test_a_replacement_by_another_process_is_never_answered_from_memory(
    pair: tuple[Running, Running], tmp_path: Path
) -> None:
    """The attack: a key's answer is kept in one worker's memory; another PROCESS (a `cache serve` of
    the same store) replaces the key with other bytes, then deletes it. A read from the first worker must
    then give the new bytes, then a 404, exactly as the routes do, never the kept old bytes."""
    fast, routed = pair
    _fill(fast, routed)
    other_bytes = os.urandom(len(OBJECTS[HIT]))
    with server_process(fast.data) as other:
        _put(other, HIT, other_bytes)
        answers = _same(fast, routed, HIT)
        assert answers[0].endswith(other_bytes), answers[0][:200]
        _fill(fast, routed, other_bytes)
        with other.client() as client:
            assert client.delete(HIT).status_code == 200
        answers = _same(fast, routed, HIT)
        assert _status(answers[0]) == 404
    _compare_metrics(fast, routed)


def test_the_same_bytes_put_again_keep_the_memory_answer(pair: tuple[Running, Running]) -> None:
    """A put of the same bytes under a key (ccache re-uploading an object) changes nothing a reader can
    see: the kept answer stays (no needless invalidation), and is still the routes' answer."""
    fast, routed = pair
    _fill(fast, routed)
    before = _memory(fast).generation.current()
    _put(routed, HIT, OBJECTS[HIT])
    _put(routed, f"/ccache/{MISSING_KEY}", b"a new key")  # nobody can have kept a new key's answer
    assert _memory(fast).generation.current() == before
    assert _memory(fast).get(HIT) is not None
    _same(fast, routed, HIT, f"/ccache/{MISSING_KEY}")


def test_an_eviction_by_another_worker_is_never_answered_from_memory(tmp_path: Path) -> None:
    """The attack: another worker of the same store evicts the key (an upload that needs the space); its
    blob stays (a pinned build uses the same bytes), so only the index says the key is gone: the first
    worker must answer the routes' 404, not the kept bytes."""
    data = tmp_path / "data"
    tight = Limits(max_bytes=60 << 10, gc_grace_seconds=0)
    with (
        server_in_thread(ServerConfig(data=data)) as fast,
        server_in_thread(ServerConfig(data=data), fast_path=False) as routed,
        server_in_thread(ServerConfig(data=data, limits=tight), fast_path=False) as evicting,
    ):
        _put(fast, HIT, OBJECTS[HIT])  # 10 KiB
        _put(fast, f"/ccache/{HEX_KEY}", os.urandom(20 << 10))
        outputs = [{"name": "object", "sha256": sha(OBJECTS[HIT]), "size": len(OBJECTS[HIT])}]
        with fast.client() as client:
            assert client.put(f"/api/v1/builds/{BAZEL}", json={"outputs": outputs}).status_code == 201
            assert client.put(f"/api/v1/builds/{BAZEL}/pin").status_code == 200
        _fill(fast, routed)
        _put(evicting, f"/ccache/{MISSING_KEY}", os.urandom(40 << 10))  # 70 KiB > 60: evicts the keys
        with sqlite3.connect(data / "index.sqlite3") as db:
            assert not db.execute("SELECT 1 FROM ccache WHERE key = ?", (HIT_KEY,)).fetchall()
        assert (data / "blobs" / sha(OBJECTS[HIT])[:2] / sha(OBJECTS[HIT])).is_file()
        answers = _same(fast, routed, HIT)
        assert _status(answers[0]) == 404
        _compare_metrics(fast, routed)


def _corrupt(data: Path, content: bytes) -> None:
    """Replace the blob file of content with other bytes of the same size (the file's stamp changes)."""
    digest = sha(content)
    path = data / "blobs" / digest[:2] / digest
    path.chmod(0o644)
    path.write_bytes(bytes(b ^ 0xFF for b in content))


def test_a_corrupt_blob_found_by_scrub_is_never_answered_from_memory(pair: tuple[Running, Running]) -> None:
    """The attack: a blob is damaged at rest and `kernel-ci cache scrub` (another process) forgets it:
    the key no longer has an object, and the worker that kept its bytes must say so (404), as the routes
    do."""
    fast, routed = pair
    _fill(fast, routed)
    _corrupt(fast.data, OBJECTS[HIT])
    scrub = subprocess.run(
        [sys.executable, "-m", "kernel_ci.cli.main", "cache", "scrub", "--data", str(fast.data)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert scrub.returncode == 1 and "corrupt" in scrub.stdout, scrub.stdout + scrub.stderr
    answers = _same(fast, routed, HIT)
    assert _status(answers[0]) == 404
    _compare_metrics(fast, routed)


def test_a_corrupt_blob_found_by_another_worker_is_never_answered_from_memory(
    pair: tuple[Running, Running],
) -> None:
    """The attack: a blob is damaged at rest and another worker's read finds it (sets it aside, forgets
    the key): the worker that kept its bytes then answers 404 too."""
    fast, routed = pair
    _fill(fast, routed)
    _corrupt(fast.data, OBJECTS[HIT])
    raw = request("GET", HIT, [f"Bearer {READ_TOKEN}"], CLOSE)
    assert _status(exchange(routed, raw)) == 404  # the other worker's read: corrupt, forgotten
    assert _status(exchange(fast, raw)) == 404
    _same(fast, routed, HIT)
