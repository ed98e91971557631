"""The HTTP face of the cache service (Starlette): build API, ccache remote storage, web pages, metrics."""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kernel_ci.build import keys as buildkey
from kernel_ci.cache.server import web
from kernel_ci.cache.server.blobs import Blob, BlobError
from kernel_ci.cache.server.index import IndexError_
from kernel_ci.cache.server.openapi import openapi_schema
from kernel_ci.cache.server.service import (
    CacheService,
    ServiceError,
    ccache_key_from_path,
    check_key,
    check_output_name,
    parse_json,
)

log = logging.getLogger("kernel_ci.cacheserver")

# POST routes that only read (a query with a body); every other PUT/POST/DELETE needs a write token
READ_ONLY_POSTS = frozenset({("POST", "/api/v1/missing-blobs")})
INLINE_HASH_MAX = 64 << 10  # the most bytes hashed on the event loop for one request (ccache fast path)


@dataclass
class AuthConfig:
    write_tokens: list[str] = field(default_factory=list)  # read and write
    read_tokens: list[str] = field(default_factory=list)  # read only
    anonymous_read: bool = True


class _Denied(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _presented_token(request: Request) -> str | None:
    """The token of an ``Authorization`` header: ``Bearer <token>`` (ccache's ``bearer-token=``) or
    ``Basic base64(user:token)`` (ccache's ``http://user:token@host/``: the password is the token)."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer" and value:
        return value
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _Denied(401, "malformed Basic authorization header") from None
        _user, sep, password = decoded.partition(":")
        if sep and password:
            return password
    raise _Denied(401, "unsupported Authorization header: use 'Bearer <token>' or Basic user:<token>")


def _matches(token: str, candidates: list[str]) -> bool:
    found = False
    for candidate in candidates:  # compare with all, in constant time each
        found |= hmac.compare_digest(token.encode(), candidate.encode())
    return found


def has_valid_token(request: Request, auth: AuthConfig) -> bool:
    """Whether the request carries a valid read or write token (never raises)."""
    try:
        token = _presented_token(request)
    except _Denied:
        return False
    return token is not None and (_matches(token, auth.write_tokens) or _matches(token, auth.read_tokens))


def authorize(request: Request, auth: AuthConfig, write: bool) -> None:
    token = _presented_token(request)
    if token is None:
        if write:
            raise _Denied(401, "writing to the cache needs a token (Authorization: Bearer <token>)")
        if not auth.anonymous_read:
            raise _Denied(401, "this cache needs a token for reads too (Authorization: Bearer <token>)")
        return
    if _matches(token, auth.write_tokens):
        return
    if _matches(token, auth.read_tokens):
        if write:
            raise _Denied(403, "this token may only read")
        return
    raise _Denied(401, "invalid token")


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="kernel-ci cache", Basic realm="kernel-ci cache"'
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


Handler = Callable[[Request], Awaitable[Response]]


def _guard(handler: Handler) -> Handler:
    """Turns the service's refusals into clear JSON errors (never a 500 for a bad request)."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except _Denied as exc:
            return _error(exc.status, str(exc))
        except ServiceError as exc:
            return _error(exc.status, str(exc), **exc.extra)
        except BlobError as exc:
            _log_unavailable(exc.status, exc)
            return _error(exc.status, str(exc))
        except IndexError_ as exc:
            _log_unavailable(exc.status, exc)
            return _error(exc.status, str(exc))
        except ClientDisconnect:
            return Response(status_code=400)

    return wrapped


def _log_unavailable(status: int, exc: Exception) -> None:
    if status >= 500:  # the operator's problem (a store down or full), not the client's
        log.warning("answered %d: %s", status, exc)


def _digits(raw: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²' and other scripts' digits, which int() refuses."""
    return raw.isascii() and raw.isdigit()


async def _read_limited(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and (not _digits(length) or int(length) > limit):
        raise ServiceError(f"request body larger than the limit of {limit} bytes", 413)
    parts = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ServiceError(f"request body larger than the limit of {limit} bytes", 413)
        parts.append(chunk)
    return b"".join(parts)


UPLOAD_BATCH = 1 << 20


async def _upload(service: CacheService, request: Request, digest: str, size: int) -> bool:
    """Stream a blob upload: the body is awaited on the event loop and handed to a worker thread in 1 MiB
    batches (hash + write), so that a stalled client holds a connection, never a worker thread (40 stalled
    uploads would otherwise leave no thread for any reader)."""
    writer = await run_in_threadpool(service.begin_blob, digest, size)
    try:
        batch = bytearray()
        async for chunk in request.stream():
            batch += chunk
            if len(batch) >= UPLOAD_BATCH:
                await run_in_threadpool(writer.write, bytes(batch))
                batch.clear()
        if batch:
            await run_in_threadpool(writer.write, bytes(batch))
    except BaseException:
        writer.abort()  # closes and unlinks a temporary file: quick, and must happen even when cancelled
        raise
    return await run_in_threadpool(service.finish_blob, digest, size, writer)


def _blob_response(blob: Blob, headers: dict[str, str] | None = None) -> Response:
    headers = {"Content-Length": str(blob.size), **(headers or {})}
    if blob.data is not None:
        return Response(blob.data, media_type="application/octet-stream", headers=headers)
    return StreamingResponse(
        iterate_in_threadpool(blob.chunks()), media_type="application/octet-stream", headers=headers
    )


MAX_PATH = 1024  # the longest route (a build's file) is under 400 characters


class _PathGuard:
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
                response = _error(400, f"refused request path: {problem}")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_ENCODED_REFUSED = (b"%2f", b"%5c", b"%2e", b"%00")


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
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "a control character"
    segments = path.split("/")[1:]
    if any(s in (".", "..") for s in segments):
        return "a '.' or '..' segment"
    if any(s == "" for s in segments[:-1]):
        return "an empty segment ('//')"
    return None


class _Timing:
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
            path: str = scope["path"]
            group = (
                "ccache"
                if path.startswith("/ccache/")
                else "blobs"
                if path.startswith("/api/v1/blobs")
                else "api"
                if path.startswith("/api/")
                else "web"
            )
            method = scope["method"]
            self.service.metrics.observe(time.perf_counter() - start, route=group, method=method)
            self.service.metrics.inc(
                "kernel_ci_cache_http_responses_total", route=group, method=method, code=str(status[0])
            )


class _CcacheReads:
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
        except (ServiceError, _Denied, IndexError_):
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


def create_app(service: CacheService, auth: AuthConfig) -> Starlette:
    inline_reads = service.index.describe().startswith("SQLite") and service.blobs.describe().startswith(
        "local"
    )

    async def read_guard(request: Request) -> None:
        authorize(request, auth, write=False)

    # -- health, metrics, schema --------------------------------------------------------------

    async def healthz(request: Request) -> Response:
        """Open to anyone (load balancers), but where the data lives (paths, bucket, endpoint, database
        host) and why it is unhealthy are shown to token holders only; counts follow --no-anonymous-read."""
        trusted = has_valid_token(request, auth)
        try:
            totals = await run_in_threadpool(service.index.totals)
        except Exception as exc:
            detail = {"error": str(exc)} if trusted else {}
            return JSONResponse({"status": "unhealthy", **detail}, status_code=503)
        doc: dict[str, Any] = {"status": "ok"}
        if trusted:
            doc |= {"index": service.index.describe(), "blob_store": service.blobs.describe()}
        if trusted or auth.anonymous_read:
            doc |= totals
        return JSONResponse(doc)

    async def metrics(request: Request) -> Response:
        await read_guard(request)
        await run_in_threadpool(service.access.flush)
        gauges = await run_in_threadpool(service.gauges)
        return PlainTextResponse(
            service.metrics.render(gauges), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def openapi(request: Request) -> Response:
        await read_guard(request)
        return JSONResponse(openapi_schema())

    # -- blobs --------------------------------------------------------------------------------

    async def blob(request: Request) -> Response:
        digest = request.path_params["digest"]
        if request.method in ("GET", "HEAD"):
            await read_guard(request)
            if request.method == "HEAD":
                sizes = await run_in_threadpool(service.index.blob_sizes, [digest])
                if digest not in sizes:
                    return Response(status_code=404)
                return Response(headers={"Content-Length": str(sizes[digest])})
            found = await run_in_threadpool(service.get_blob, digest)
            if found is None:
                return _error(404, f"no blob {digest}")
            return _blob_response(found)
        authorize(request, auth, write=True)
        length = request.headers.get("content-length")
        if length is None or not _digits(length):
            raise ServiceError("PUT a blob with a Content-Length header (its exact size)", 411)
        size = int(length)
        if size > service.limits.max_blob_bytes:
            raise ServiceError(
                f"blob of {size} bytes exceeds the limit of {service.limits.max_blob_bytes}", 413
            )
        created = await _upload(service, request, digest, size)
        return JSONResponse({"sha256": digest, "size": size}, status_code=201 if created else 200)

    async def missing_blobs(request: Request) -> Response:
        await read_guard(request)
        body = await _read_limited(request, 4 << 20)
        doc = await run_in_threadpool(parse_json, body, "the request")
        digests = doc.get("digests") if isinstance(doc, dict) else None
        if not isinstance(digests, list) or len(digests) > 20_000:
            raise ServiceError("expected {'digests': [<sha256>, ...]} (at most 20000)")
        missing = await run_in_threadpool(service.missing_blobs, digests)
        return JSONResponse({"missing": missing})

    # -- builds -------------------------------------------------------------------------------

    async def builds(request: Request) -> Response:
        await read_guard(request)
        limit = _query_int(request, "limit", 50, 1, 500)
        offset = _query_int(request, "offset", 0, 0, 1 << 31)
        rows = await run_in_threadpool(service.index.build_list, limit, offset)
        total = await run_in_threadpool(service.index.build_count)
        return JSONResponse({"total": total, "builds": [web.summary_json(r) for r in rows]})

    async def build(request: Request) -> Response:
        key = check_key(request.path_params["key"])
        if request.method == "PUT":
            authorize(request, auth, write=True)
            body = await _read_limited(request, service.limits.max_manifest_bytes)
            status, _record = await run_in_threadpool(service.put_build, key, body)
            code = 201 if status == "created" else 200
            return JSONResponse({"key": key, "status": status}, status_code=code)
        await read_guard(request)
        row = await run_in_threadpool(service.get_build, key)
        if row is None:
            return _error(404, f"no complete build {key}")
        if request.method == "HEAD":
            return Response()
        return JSONResponse({**row.doc, "pinned": row.pinned, "bytes": row.bytes, "runs": row.runs})

    async def pin(request: Request) -> Response:
        key = check_key(request.path_params["key"])
        authorize(request, auth, write=True)
        pinned = request.method == "PUT"
        changed = await run_in_threadpool(service.index.build_pin, key, pinned)
        if not changed:
            return _error(404, f"no build {key}")
        return JSONResponse({"key": key, "pinned": pinned})

    async def run(request: Request) -> Response:
        key = check_key(request.path_params["key"])
        authorize(request, auth, write=True)
        body = await _read_limited(request, 1 << 20)
        status, doc = await run_in_threadpool(service.put_run, key, request.path_params["run_id"], body)
        return JSONResponse({"status": status, **doc}, status_code=201 if status == "created" else 200)

    async def build_file(request: Request) -> Response:
        await read_guard(request)
        key = check_key(request.path_params["key"])
        name = check_output_name(request.path_params["name"])
        row = await run_in_threadpool(service.get_build, key, False)
        output = None
        if row is not None:
            output = next((o for o in row.doc["outputs"] if o["name"] == name), None)
        if output is None:
            return _error(404, f"build {key[:16]} has no output {name!r}")
        found = await run_in_threadpool(service.get_blob, output["sha256"], "download")
        if found is None:
            return _error(404, f"the blob of {name} is missing or corrupt")
        filename = name.rsplit("/", 1)[-1] + (".tar" if output["kind"] == "tar" else "")
        return _blob_response(found, {"Content-Disposition": f'attachment; filename="{filename}"'})

    async def run_file(request: Request) -> Response:
        await read_guard(request)
        key = check_key(request.path_params["key"])
        part = {"junit.xml": "junit", "console.log": "console"}.get(request.path_params["part"])
        row = await run_in_threadpool(service.get_build, key, False)
        wanted = request.path_params["run_id"]
        ref = None
        if row is not None and part is not None:
            ref = next((r.get(part) for r in row.runs if r.get("run_id") == wanted), None)
        if ref is None:
            return _error(404, "no such run file (junit.xml or console.log of an attached run)")
        found = await run_in_threadpool(service.get_blob, ref["sha256"], "download")
        if found is None:
            return _error(404, "the blob of this file is missing or corrupt")
        media = "application/xml" if part == "junit" else "text/plain; charset=utf-8"
        name = f"{key[:12]}-{wanted}-{request.path_params['part']}"
        response = _blob_response(found, {"Content-Disposition": f'attachment; filename="{name}"'})
        response.headers["content-type"] = media
        return response

    async def miss(request: Request) -> Response:
        await read_guard(request)
        key = check_key(request.path_params["key"])
        explanation = await run_in_threadpool(_explain, service, key)
        if explanation is None:
            return _error(404, f"no build {key}")
        return JSONResponse(explanation)

    async def alias(request: Request) -> Response:
        request_key = check_key(request.path_params["request_key"], "request key")
        if request.method == "PUT":
            authorize(request, auth, write=True)
            body = await _read_limited(request, 1024)
            doc = parse_json(body, "the alias")
            key = check_key(doc.get("key") if isinstance(doc, dict) else None)  # type: ignore[arg-type]
            await run_in_threadpool(service.index.alias_put, request_key, key)
            return JSONResponse({"request_key": request_key, "key": key})
        await read_guard(request)
        key = await run_in_threadpool(service.index.alias_get, request_key)
        if key is None:
            return _error(404, f"no alias for {request_key}")
        return JSONResponse({"request_key": request_key, "key": key})

    # -- ccache remote storage ----------------------------------------------------------------

    async def ccache(request: Request) -> Response:
        method = request.method
        key = ccache_key_from_path(request.path_params["path"])
        if method in ("GET", "HEAD"):
            await read_guard(request)
            # a look-up is one indexed SQLite row: done on the event loop, as a thread hop per request
            # would cost more than the work; reading (and hashing) the object too, if it is small
            found = (
                service.ccache_lookup(key)
                if inline_reads
                else await run_in_threadpool(service.ccache_lookup, key)
            )
            if found is None:
                if method == "GET":
                    service.ccache_count(None)
                return Response(status_code=404)
            digest, size = found
            if method == "HEAD":
                return Response(headers={"Content-Length": str(size)})
            if inline_reads and size <= INLINE_HASH_MAX:
                blob = service.ccache_read(key, digest)
            else:
                blob = await run_in_threadpool(service.ccache_read, key, digest)
            if blob is None:
                return Response(status_code=404)
            return _blob_response(blob)
        authorize(request, auth, write=True)
        if method == "DELETE":
            existed = await run_in_threadpool(service.ccache_delete, key)
            return Response(status_code=200 if existed else 404)
        data = await _read_limited(request, service.limits.max_ccache_object_bytes)
        await run_in_threadpool(service.ccache_put, key, data)  # hashes: never on the event loop
        return Response(status_code=201)

    # -- web pages ----------------------------------------------------------------------------

    async def index_page(request: Request) -> Response:
        await read_guard(request)
        limit = _query_int(request, "limit", 100, 1, 500)
        offset = _query_int(request, "offset", 0, 0, 1 << 31)
        rows = await run_in_threadpool(service.index.build_list, limit, offset)
        total = await run_in_threadpool(service.index.build_count)
        return HTMLResponse(web.list_page(rows, total, limit, offset))

    async def build_page(request: Request) -> Response:
        await read_guard(request)
        key = check_key(request.path_params["key"])
        row = await run_in_threadpool(service.get_build, key, False)
        if row is None:
            return HTMLResponse(web.not_found_page(key), status_code=404)
        explanation = await run_in_threadpool(_explain, service, key)
        return HTMLResponse(web.build_page(row, explanation))

    g = _guard
    routes = [
        Route("/", g(index_page), methods=["GET"]),
        Route("/builds/{key}", g(build_page), methods=["GET"]),
        Route("/healthz", g(healthz), methods=["GET"]),
        Route("/metrics", g(metrics), methods=["GET"]),
        Route("/openapi.json", g(openapi), methods=["GET"]),
        Route("/api/v1/blobs/{digest}", g(blob), methods=["GET", "HEAD", "PUT"]),
        Route("/api/v1/missing-blobs", g(missing_blobs), methods=["POST"]),
        Route("/api/v1/builds", g(builds), methods=["GET"]),
        Route("/api/v1/builds/{key}", g(build), methods=["GET", "HEAD", "PUT"]),
        Route("/api/v1/builds/{key}/pin", g(pin), methods=["PUT", "DELETE"]),
        Route("/api/v1/builds/{key}/miss", g(miss), methods=["GET"]),
        Route("/api/v1/builds/{key}/runs/{run_id}", g(run), methods=["PUT"]),
        Route("/api/v1/builds/{key}/runs/{run_id}/{part}", g(run_file), methods=["GET"]),
        Route("/api/v1/builds/{key}/files/{name:path}", g(build_file), methods=["GET"]),
        Route("/api/v1/aliases/{request_key}", g(alias), methods=["GET", "PUT"]),
        Route("/ccache/{path:path}", g(ccache), methods=["GET", "HEAD", "PUT", "DELETE"]),
    ]

    async def _lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(service.access.flush)

    import contextlib

    app = Starlette(routes=routes, lifespan=contextlib.asynccontextmanager(_lifespan))
    if inline_reads:
        app.add_middleware(_CcacheReads, service=service, auth=auth)  # type: ignore[arg-type]
    app.add_middleware(_PathGuard)  # type: ignore[arg-type]  # before anything looks at the path
    app.add_middleware(_Timing, service=service)  # type: ignore[arg-type]  # outermost: times everything
    return app


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not _digits(raw) or not low <= int(raw) <= high:
        raise ServiceError(f"query parameter {name}: expected an integer from {low} to {high}")
    return int(raw)


def _explain(service: CacheService, key: str) -> dict[str, Any] | None:
    """The "why did this miss" diff of a build against its nearest other build (kernel_ci.build.keys)."""
    inputs = service.index.all_inputs()
    mine = next((m for k, m in inputs if k == key), None)
    if mine is None:
        return None
    others = [(k, m) for k, m in inputs if k != key]
    explanation = buildkey.explain_miss(mine, others)
    return {
        "key": key,
        "nearest": explanation.nearest_key,
        "candidates": explanation.candidates,
        "text": explanation.render(limit=40),
        "differences": [
            {"name": d.name, "cached": d.cached, "wanted": d.wanted, "describe": d.describe()}
            for d in explanation.differences
        ],
    }
