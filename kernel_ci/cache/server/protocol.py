"""uvicorn's httptools protocol with one socket write per small response instead of two.

uvicorn writes a response's status line and headers to the socket as soon as the app sends
``http.response.start``, and the body with ``http.response.body``: two ``send(2)`` calls, two TCP segments
and, on the client, two wake-ups for every ccache object. Profiled under wrk (py-spy, 10 KiB GETs), those two
writes were a quarter of the service's time per request, more than reading the object and its index row.
nginx answers the same GET with one segment (``tcp_nopush`` + ``sendfile``).

Here the protocol hands its requests a transport that gathers what is written in one turn of the event loop
and writes it once at the end of that turn (``call_soon``), or at once past ``FLUSH_AT`` bytes (a big body
is never held in memory twice). Nothing is reordered or dropped: ``close`` writes what is gathered first, and
flow control still acts on the real transport, whose buffer takes every byte before the next turn.

A subclass, not a server of our own: uvicorn keeps the HTTP parsing (httptools), keep-alive, pipelining,
``--limit-concurrency`` and the worker processes; this only changes when bytes reach the socket.

``EarlyCcacheProtocol`` (below) adds the one hot path: a ccache read that arrives whole in one segment, in
the simplest form HTTP/1.1 allows, is answered in ``data_received`` before the HTTP parser and the ASGI
machinery see it (see its docstring for what it takes and why it answers the same bytes).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from kernel_ci.cache.server.middleware import CcacheFastPath

FLUSH_AT = 64 << 10  # gathered bytes past which they are written at once (a streamed blob's 1 MiB chunks)


class GatheringTransport:
    """A transport whose writes within one event-loop turn reach the socket as one write."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._size = 0
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._pending.append(bytes(data))
        self._size += len(data)
        if self._size >= FLUSH_AT:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_scheduled)

    def _flush_scheduled(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Hand everything gathered to the real transport (which writes it or buffers it)."""
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        self._size = 0
        self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:  # asked after every response: not through __getattr__
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        # everything else (is_closing, get_extra_info, pause_reading, set_protocol...) is the real transport's
        return getattr(self._transport, name)


class GatheringHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing through a GatheringTransport (see the module docstring)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = GatheringTransport(transport, self.loop)  # type: ignore[assignment]


# The one request form answered early: a ccache read, its target a key path (no query, no percent-encoding),
# HTTP/1.1, header lines of visible ASCII, nothing after the blank line. A strict subset of what llhttp
# accepts, so that whatever is answered here the parser would have read the same way.
_EARLY_REQUEST = re.compile(
    rb"(GET|HEAD) (/ccache/[0-9a-z/]{1,300}) HTTP/1\.1\r\n"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\x20-\x7e\t]*\r\n){0,32})\r\n"
)
# a header that changes how the message or the connection is framed or handled: the parser's business
_FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect"})
EARLY_MAX = 8 << 10  # a ccache client's request is a few hundred bytes


@dataclass(frozen=True)
class EarlyRequest:
    method: str
    path: str
    authorization: str | None  # the first Authorization header, as Starlette reads it


def early_request(data: bytes) -> EarlyRequest | None:
    """``data`` as one whole ccache read in the form answered early, or None (the parser's to read)."""
    if len(data) > EARLY_MAX:
        return None
    match = _EARLY_REQUEST.fullmatch(data)
    if match is None:
        return None
    authorization = None
    for line in match.group(3).split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        name = name.lower()
        if name in _FRAMING_HEADERS:
            return None
        if name == b"authorization" and authorization is None:
            authorization = value.strip(b" \t").decode("latin-1")
    return EarlyRequest(match.group(1).decode(), match.group(2).decode(), authorization)


class EarlyCcacheProtocol(GatheringHttpToolsProtocol):
    """The service's protocol: ccache reads answered in ``data_received``, everything else as uvicorn does.

    Under wrk's 10 KiB GETs, with the answer in the worker's memory, most of the service's CPU per request
    was uvicorn's: the parser's callbacks, the scope, a RequestResponseCycle and an asyncio task, two ASGI
    sends. A ccache client sends each read whole, in one segment, on a keep-alive connection, and waits for
    the answer: here such a request is matched (``early_request``), answered by the app's fast path
    (``middleware.CcacheFastPath.answer``, the function the ASGI fast path calls) and written with the
    bytes uvicorn would write for that answer, and the connection is left as uvicorn leaves it after a
    response (keep-alive timer, request count). Anything else goes to the parser untouched: a request in
    several segments or with another after it (pipelined), HTTP/1.0, a body or framing header,
    ``Connection``, a query or percent-encoding, non-ASCII, a request while an earlier one is still being
    answered or the parser is inside a message, a full write buffer (uvicorn's flow control waits there),
    the concurrency limit reached (uvicorn's 503), and every read the fast path does not answer itself.
    """

    fast: CcacheFastPath | None = None
    in_message = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.fast = _fast_path(self.app)

    def on_message_begin(self) -> None:
        self.in_message = True
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self.in_message = False
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        if self.fast is None or not self._answer_early(self.fast, data):
            super().data_received(data)

    def _idle(self) -> bool:
        """Nothing being read or answered on this connection, and room to answer now."""
        cycle, limit = self.cycle, self.limit_concurrency
        return (
            not self.in_message
            and (cycle is None or cycle.response_complete)
            and not self.pipeline
            and not self.flow.write_paused
            and not self.transport.is_closing()
            and not self.root_path
            and (limit is None or (len(self.connections) < limit and len(self.tasks) < limit))
        )

    def _answer_early(self, fast: CcacheFastPath, data: bytes) -> bool:
        start = time.perf_counter()
        request = early_request(data) if data.startswith((b"GET /ccache/", b"HEAD /ccache/")) else None
        if request is None or not self._idle():
            return False
        try:
            answer = fast.answer(request.method, request.path, request.authorization)
        except Exception:  # unplanned: the routes answer it, with their 500 and log record
            return False
        if answer is None:
            return False
        self._unset_keepalive_if_required()
        head = [STATUS_LINE[answer.status]]
        for name, value in (*self.server_state.default_headers, *answer.headers()):
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        if request.method == "GET":
            head.append(answer.body)
        self.transport.write(b"".join(head))
        fast.record(request.method, answer.status, start)
        if self.access_log:  # uvicorn's access log line for the same request
            client = f"{self.client[0]}:{self.client[1]}" if self.client else ""
            self.access_logger.info(
                '%s - "%s %s HTTP/1.1" %d', client, request.method, request.path, answer.status
            )
        fast.early += 1
        self.on_response_complete()  # what uvicorn does after every response: count it, arm keep-alive
        return True


def _fast_path(app: Any) -> CcacheFastPath | None:
    """The CcacheFastPath of the app uvicorn runs (inside uvicorn's own wrappers), if it has one."""
    for _ in range(8):
        fast = getattr(app, "fast", None)
        if isinstance(fast, CcacheFastPath):
            return fast
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None
