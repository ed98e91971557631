"""The pure ASGI middleware of the HTTP face, outermost first: CcacheFastPath (the hot ccache read path,
before Starlette), Timing (latency and status metrics), PathGuard (one path rule for every route)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kernel_ci.cache.server.auth import AuthConfig, Denied, authorize_header
from kernel_ci.cache.server.blobs import BlobError, FileStamp, LocalBlobStore
from kernel_ci.cache.server.index import IndexError_
from kernel_ci.cache.server.memory import AnswerCache
from kernel_ci.cache.server.metrics import LATENCY
from kernel_ci.cache.server.service import CacheService, ServiceError, ccache_key_from_path
from kernel_ci.cache.server.transfer import error

INLINE_HASH_MAX = 64 << 10  # the most bytes hashed on the event loop for one request (ccache fast path)
RESPONSES = "kernel_ci_cache_http_responses_total"
MAX_PATH = 1024  # the longest route (a build's file) is under 400 characters


class PathGuard:
    """Pure ASGI middleware, before routing: a request path that tries to step outside its route is a 400.

    Routing alone would answer many of these with a 404 ("no such route") or hand them to a handler that
    parses a catch-all ``{path:path}``: refusing them here, from the raw and the decoded path, is one rule
    for every route, current and future. Refused: '.' and '..' segments, backslashes, NUL and other
    control characters, encoded '/' '\\' '.' and NUL, empty segments, and paths longer than MAX_PATH."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = path_problem(scope.get("raw_path") or scope["path"].encode(), scope["path"])
            if problem:
                response = error(400, f"refused request path: {problem}")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_ENCODED_REFUSED = (b"%2f", b"%5c", b"%2e", b"%00")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def path_problem(raw: bytes, path: str) -> str | None:
    """Why a request path is refused, or None."""
    raw = raw.split(b"?", 1)[0]
    if len(raw) > MAX_PATH or len(path) > MAX_PATH:
        return f"longer than {MAX_PATH} characters"
    lowered = raw.lower()
    if any(code in lowered for code in _ENCODED_REFUSED):
        return "percent-encoded '/', '\\', '.' or NUL"
    if "\\" in path:
        return "a backslash"
    if _CONTROL.search(path):  # one regex scan: a per-character loop was a third of a ccache GET's time
        return "a control character"
    segments = path.split("/")[1:]
    if any(s in (".", "..") for s in segments):
        return "a '.' or '..' segment"
    if any(s == "" for s in segments[:-1]):
        return "an empty segment ('//')"
    return None


def route_group(path: str) -> str:
    """The metrics label of a request path."""
    if path.startswith("/ccache/"):
        return "ccache"
    if path.startswith("/api/v1/blobs"):
        return "blobs"
    if path.startswith("/api/"):
        return "api"
    return "web"


class Timing:
    """Pure ASGI middleware: request latency histogram by route group."""

    def __init__(self, app: ASGIApp, service: CacheService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            group = route_group(scope["path"])
            method = scope["method"]
            self.service.metrics.observe(time.perf_counter() - start, route=group, method=method)
            self.service.metrics.inc(RESPONSES, route=group, method=method, code=str(status[0]))


def _authorization(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The first ``Authorization`` header of an ASGI scope (lowercased names), as Starlette reads it."""
    for name, value in headers:
        if name == b"authorization":
            return value.decode("latin-1")
    return None


@dataclass(frozen=True)
class FastAnswer:
    """A ccache read answered by the fast path: the status, the Content-Length, and the body (empty for a
    HEAD or a miss)."""

    status: int
    length: int
    body: bytes = b""
    typed: bool = False  # with a Content-Type: a GET's object (the routes' blob_response), not a HEAD or 404

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The routed handler's headers for the same answer, in its order."""
        length = (b"content-length", b"%d" % self.length)
        return [length, (b"content-type", b"application/octet-stream")] if self.typed else [length]


@dataclass(frozen=True)
class KeptAnswer:
    """A GET's answer kept in memory, with the blob it was read from and that file's stamp then."""

    answer: FastAnswer
    key: str
    digest: str
    stamp: FileStamp


class CcacheFastPath:
    """ccache GET/HEAD answered before Starlette: the one hot path (thousands of requests per build), where
    routing, the middleware stack and a Request object per request were most of the app's time.

    It answers only what it can answer exactly as the full app would, and hands anything else to it
    (``answer`` returns None, ``serve`` False), which then answers with the reason:

    - the path guard: only a path without percent-encoding (raw path == decoded path) that is a ccache key
      (``ccache_key_from_path``: ``[0-9a-v]`` or hex segments, nothing else) is served here; such a path
      has none of what PathGuard refuses (dot segments, backslashes, control characters, '//', length);
    - the token: ``auth.authorize_header``, the function the full app's Access calls;
    - the metrics: the latency and response counts Timing records (``record``), the hit/miss count of the
      service;
    - small objects only on the event loop (INLINE_HASH_MAX), as the routed handler does;
    - answers kept in memory (``memory``, memory.py) are those of earlier reads, served only while the
      index has not changed any existing key's answer since (the change generation) and the blob's file
      is the one read then (one stat: a file replaced or edited at rest is read again and judged as on
      disk); they record what a read from disk records.
    """

    def __init__(
        self,
        service: CacheService,
        auth: AuthConfig,
        memory: tuple[AnswerCache[KeptAnswer], LocalBlobStore] | None = None,
    ) -> None:
        self.service = service
        self.auth = auth
        self.memory: AnswerCache[KeptAnswer] | None = None
        self.files: LocalBlobStore | None = None
        if memory is not None:
            self.memory, self.files = memory
        self._recorders: dict[tuple[str, int], tuple[Any, Any]] = {}  # (method, status) -> metric children
        self.early = 0  # reads answered before the HTTP parser (protocol.EarlyCcacheProtocol)

    def answer(self, method: str, raw_path: str, authorization: str | None) -> FastAnswer | None:
        """The answer to a ccache ``GET``/``HEAD`` of ``raw_path`` (the path as sent, not percent-decoded,
        without its query), or None: the full app answers it (whatever it is, and why it is refused)."""
        if method not in ("GET", "HEAD") or not raw_path.startswith("/ccache/") or "%" in raw_path:
            return None  # percent-encoded: the path guard decides
        memory, files = self.memory, self.files
        # kept by the path as sent: a path kept once was a valid ccache key (a pure function of the path)
        kept = memory.get(raw_path) if memory is not None else None
        generation = None
        try:
            key = kept.key if kept is not None else ccache_key_from_path(raw_path[len("/ccache/") :])
            authorize_header(authorization, self.auth, write=False)
            if kept is not None and files is not None:
                if method == "HEAD":  # the routes' HEAD reads the index row only: not the file
                    return FastAnswer(200, kept.answer.length)
                if files.stamp(kept.digest) == kept.stamp:
                    self.service.ccache_hit(key)
                    return kept.answer
            if memory is not None:
                generation = memory.snapshot()  # BEFORE the look-up (generation.py says why)
            found = self.service.ccache_lookup(key)
        except (ServiceError, Denied, IndexError_):
            return None
        if found is None:
            if method == "GET":
                self.service.ccache_count(None)
            return FastAnswer(404, 0)
        if method == "HEAD":
            return FastAnswer(200, found[1])
        if found[1] > INLINE_HASH_MAX:
            return None  # a big object: read (and verified if need be) off the event loop
        try:
            blob = self.service.ccache_read(key, found[0])
        except (BlobError, IndexError_, OSError):
            return None
        if blob is None:
            return FastAnswer(404, 0)
        body = blob.data if blob.data is not None else b"".join(blob.chunks())
        answer = FastAnswer(200, blob.size, body, typed=True)
        if memory is not None and generation is not None and blob.stamp is not None:
            memory.put(raw_path, generation, KeptAnswer(answer, key, found[0], blob.stamp), blob.size)
        return answer

    def record(self, method: str, status: int, start: float) -> None:
        """The metrics Timing records for a routed request (latency, responses by code)."""
        children = self._recorders.get((method, status))
        if children is None:  # kept here: building the label key per request was a tenth of a memory hit
            metrics = self.service.metrics
            children = self._recorders[(method, status)] = (
                metrics.child(LATENCY, route="ccache", method=method),
                metrics.child(RESPONSES, route="ccache", method=method, code=str(status)),
            )
        children[0].observe(time.perf_counter() - start)
        children[1].inc()

    async def serve(self, scope: Scope, send: Send) -> bool:
        start = time.perf_counter()
        method = scope["method"]
        path = scope["path"]
        raw = scope.get("raw_path")
        if raw is not None and raw != path.encode():
            return False  # percent-encoded: the path guard decides
        try:
            found = self.answer(method, path, _authorization(scope["headers"]))
        except Exception:  # unplanned (bad data in the index...): the routes answer it, with Starlette's
            return False  # 500 and its log record, as they would without this path
        if found is None:
            return False
        await send({"type": "http.response.start", "status": found.status, "headers": found.headers()})
        await send({"type": "http.response.body", "body": found.body})
        self.record(method, found.status, start)
        return True
