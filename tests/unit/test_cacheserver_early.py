"""protocol.early_request: which bytes are a ccache read answered before the HTTP parser. Only the one form
a ccache client sends is taken; every other form is the parser's (the routes' answers to both kinds are
compared in test_cacheserver_fastpath.py)."""

from __future__ import annotations

import pytest

from kernel_ci.cache.server.protocol import EarlyRequest, early_request

KEY = "/ccache/01/23abcdefghijklmnopqrstuv0123456"


def test_a_ccache_clients_read_is_taken_with_its_first_authorization() -> None:
    raw = (
        f"GET {KEY} HTTP/1.1\r\nHost: 127.0.0.1:8375\r\nAccept: */*\r\nUser-Agent: cpp-httplib/0.10.1\r\n"
        "authorization: Basic Y2NhY2hlOnRva2Vu  \r\nAuthorization: Bearer other\r\n\r\n"
    ).encode()
    assert early_request(raw) == EarlyRequest("GET", KEY, "Basic Y2NhY2hlOnRva2Vu")
    assert early_request(f"HEAD {KEY} HTTP/1.1\r\n\r\n".encode()) == EarlyRequest("HEAD", KEY, None)


@pytest.mark.parametrize(
    "raw",
    [
        f"GET {KEY} HTTP/1.1\r\nHost: x\r\n",  # not whole yet
        f"GET {KEY} HTTP/1.1\r\nHost: x\r\n\r\nGET {KEY} HTTP/1.1\r\n\r\n",  # pipelined
        f"GET {KEY} HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        f"GET {KEY} HTTP/1.1\r\ncontent-LENGTH: 4\r\n\r\nabcd",
        f"GET {KEY} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        f"GET {KEY} HTTP/1.1\r\nConnection: keep-alive\r\n\r\n",
        f"GET {KEY} HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
        f"GET {KEY} HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
        f"GET {KEY} HTTP/1.0\r\n\r\n",
        f"GET {KEY}?x HTTP/1.1\r\n\r\n",
        f"GET {KEY[:-1]}%36 HTTP/1.1\r\n\r\n",
        f"GET {KEY.upper()} HTTP/1.1\r\n\r\n",
        f"PUT {KEY} HTTP/1.1\r\n\r\n",
        f"get {KEY} HTTP/1.1\r\n\r\n",
        f"GET  {KEY} HTTP/1.1\r\n\r\n",
        f"GET {KEY} HTTP/1.1\nHost: x\n\n",
        f"GET {KEY} HTTP/1.1\r\nHost : x\r\n\r\n",
        f"GET {KEY} HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
        f"GET {KEY} HTTP/1.1\r\nHost: x\xe9\r\n\r\n",
        f"GET {KEY} HTTP/1.1\r\nHost: x\x00\r\n\r\n",
        f"GET /ccache/{'a' * 301} HTTP/1.1\r\n\r\n",
        f"GET {KEY} HTTP/1.1\r\n" + "X: y\r\n" * 33 + "\r\n",
        f"GET {KEY} HTTP/1.1\r\nX: {'y' * 9000}\r\n\r\n",
    ],
)
def test_every_other_form_is_the_parsers(raw: str) -> None:
    assert early_request(raw.encode("latin-1")) is None
