"""The pure ASGI middleware of the HTTP face, outermost first: Timing (latency and status metrics),
PathGuard (one path rule for every route), CcacheReads (the hot ccache read path, before routing)."""

from __future__ import annotations

import re
import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kernel_ci.cache.server.auth import AuthConfig, Denied, authorize
from kernel_ci.cache.server.blobs import BlobError
from kernel_ci.cache.server.index import IndexError_
from kernel_ci.cache.server.service import CacheService, ServiceError, ccache_key_from_path
from kernel_ci.cache.server.transfer import error

INLINE_HASH_MAX = 64 << 10  # the most bytes hashed on the event loop for one request (ccache fast path)
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
            self.service.metrics.inc(
                "kernel_ci_cache_http_responses_total", route=group, method=method, code=str(status[0])
            )


class CcacheReads:
    """ccache GET/HEAD straight from ASGI, before routing: the one hot path (thousands of requests per
    build). Anything unusual (a bad path, a refused token, a write) goes through the full app, which
    answers with the reason."""

    def __init__(self, app: ASGIApp, service: CacheService, auth: AuthConfig) -> None:
        self.app = app
        self.service = service
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method")
        if (
            scope["type"] != "http"
            or method not in ("GET", "HEAD")
            or not scope["path"].startswith("/ccache/")
        ):
            await self.app(scope, receive, send)
            return
        try:
            key = ccache_key_from_path(scope["path"][len("/ccache/") :])
            authorize(Request(scope), self.auth, write=False)
            found = self.service.ccache_lookup(key)
        except (ServiceError, Denied, IndexError_):
            await self.app(scope, receive, send)
            return
        if found is not None and found[1] > INLINE_HASH_MAX and method == "GET":
            await self.app(scope, receive, send)  # a big object: read and verified off the event loop
            return
        body = b""
        size = None if found is None else found[1]
        if method == "GET":
            blob = None
            if found is None:
                self.service.ccache_count(None)
            else:
                try:
                    blob = self.service.ccache_read(key, found[0])
                except (BlobError, IndexError_):
                    await self.app(scope, receive, send)
                    return
            size = None if blob is None else blob.size
            if blob is not None:
                body = blob.data if blob.data is not None else b"".join(blob.chunks())
        headers = [
            (b"content-length", str(size or 0).encode()),
            (b"content-type", b"application/octet-stream"),
        ]
        await send(
            {"type": "http.response.start", "status": 404 if size is None else 200, "headers": headers}
        )
        await send({"type": "http.response.body", "body": body})
