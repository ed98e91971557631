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
``--limit-concurrency`` and the worker processes; this only changes when bytes reach the socket, and who
answers a ccache read.

A ccache GET/HEAD is answered in the parser's headers-complete callback, by the app's
middleware.CcacheFastPath (the same function its ASGI path calls), with the bytes uvicorn would have written
for that answer: no ASGI scope handed on, no task, no send() coroutines. Under wrk those were about half of a
worker's time per 10 KiB GET (py-spy). Only the plain case is answered so; everything else goes to uvicorn
as before: a request with a body, an upgrade, a pipelined request behind one still in progress, a client
that is not reading (write buffer full), past --limit-concurrency, with the access log or a root path.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httptools
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from kernel_ci.cache.server.middleware import CcacheFastPath, FastAnswer

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

    def write_now(self, data: bytes) -> None:
        """Write data (after anything gathered) to the real transport now: a whole response."""
        if self._pending:
            self._pending.append(data)
            self.flush()
        else:
            self._transport.write(data)

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


def fast_path_of(app: Any) -> CcacheFastPath | None:
    """The ccache fast path of the app uvicorn loaded (app.CacheApp.fast), or None. Only through
    ProxyHeadersMiddleware, which changes nothing the fast path reads (client address and scheme): any other
    wrapper (uvicorn's trace-level message logger) is left to do its work on every request."""
    if isinstance(app, ProxyHeadersMiddleware):
        app = app.app
    fast = getattr(app, "fast", None)
    return fast if isinstance(fast, CcacheFastPath) else None


class GatheringHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing through a GatheringTransport and answering plain ccache reads
    itself (see the module docstring)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.gathering = GatheringTransport(transport, self.loop)
        self.transport = self.gathering  # type: ignore[assignment]  # a Transport by delegation
        # not when the operator asked for uvicorn's access log (its records are written by the ASGI cycle);
        # the setting, not self.access_log (whether that logger has handlers: pytest gives every logger
        # that does not propagate one, which would keep the tests off this path)
        self.fast = None if self.config.access_log or self.root_path else fast_path_of(self.app)
        self._answered: RequestResponseCycle | None = None

    def on_headers_complete(self) -> None:
        if self.fast is None or not self._answer_inline(self.fast):
            super().on_headers_complete()

    def _answer_inline(self, fast: CcacheFastPath) -> bool:
        """Answer the request whose headers were just parsed, if it is a plain ccache read (True)."""
        start = time.perf_counter()
        method = self.parser.get_method()
        if method not in (b"GET", b"HEAD") or not self._plain_request():
            return False
        raw_path = httptools.parse_url(self.url).path
        if not raw_path.startswith(b"/ccache/"):
            return False
        try:
            found = fast.answer(method.decode(), raw_path.decode("latin-1"), self._authorization())
        except Exception:  # unplanned (bad data in the index...): raised here, it would be the parser's
            return False  # 400 for a malformed request; uvicorn's path answers it as the app's logged 500
        if found is None:
            return False
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        self.gathering.write_now(self._response(found, keep_alive, method == b"HEAD"))
        self.cycle = self._answered_cycle()
        fast.record(method.decode(), found.status, start)
        if not keep_alive:
            self.transport.close()
        self.on_response_complete()  # what uvicorn does after a response: keep-alive timer, request count
        return True

    def _plain_request(self) -> bool:
        """No body, no upgrade, nothing in progress or queued on this connection, the client reading its
        answers, and the server under --limit-concurrency: uvicorn's own handling of any of these stays."""
        if self.parser.should_upgrade() or self.pipeline or self.flow.write_paused:
            return False
        if self.cycle is not None and not self.cycle.response_complete:
            return False
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            return False
        return not any(name in (b"content-length", b"transfer-encoding") for name, _ in self.headers)

    def _authorization(self) -> str | None:
        for name, value in self.headers:  # names lowercased by uvicorn; the first one, as Starlette reads it
            if name == b"authorization":
                return value.decode("latin-1")
        return None

    def _response(self, found: FastAnswer, keep_alive: bool, head: bool) -> bytes:
        """The bytes uvicorn writes for this answer: status line, its default headers (date, server), the
        answer's, ``connection: close`` when the connection ends, the body unless HEAD."""
        parts = [STATUS_LINE[found.status]]
        for name, value in [*self.server_state.default_headers, *found.headers()]:
            parts += [name, b": ", value, b"\r\n"]
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if not head:
            parts.append(found.body)
        return b"".join(parts)

    def _answered_cycle(self) -> RequestResponseCycle:
        """A finished request cycle standing for the requests answered here: uvicorn's parser callbacks for
        the rest of the request (its end) and connection_lost/shutdown look at the current cycle."""
        if self._answered is None:
            self._answered = RequestResponseCycle(
                scope=self.scope,
                transport=self.transport,
                flow=self.flow,
                logger=self.logger,
                access_logger=self.access_logger,
                access_log=self.access_log,
                default_headers=self.server_state.default_headers,
                message_event=asyncio.Event(),
                expect_100_continue=False,
                keep_alive=True,
                on_response=lambda: None,
            )
            self._answered.response_started = self._answered.response_complete = True
        return self._answered
