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

(Answering a ccache read in the parser's headers-complete callback, with the bytes uvicorn would write and
no ASGI task, was tried: ~5% less CPU per GET, no change of the bench's ratio to nginx in 3 runs each way,
and a hundred lines bound to uvicorn's internals. Not kept; docs/cache-service.md says where the time is.)
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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
