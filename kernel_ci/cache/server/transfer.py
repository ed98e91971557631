"""Request and response bodies of the HTTP face: bounded reads, streamed blob uploads and downloads,
JSON errors, integer query parameters (shared by the route handlers and the middleware)."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kernel_ci.cache.server.blobs import Blob
from kernel_ci.cache.server.service import CacheService, ServiceError

UPLOAD_BATCH = 1 << 20


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="kernel-ci cache", Basic realm="kernel-ci cache"'
    if "retry_after" in extra:  # a busy (not broken) service: when to come back, as HTTP says it
        headers["Retry-After"] = str(extra["retry_after"])
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def digits(raw: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²' and other scripts' digits, which int() refuses."""
    return raw.isascii() and raw.isdigit()


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not digits(raw) or not low <= int(raw) <= high:
        raise ServiceError(f"query parameter {name}: expected an integer from {low} to {high}")
    return int(raw)


async def read_limited(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and (not digits(length) or int(length) > limit):
        raise ServiceError(f"request body larger than the limit of {limit} bytes", 413)
    parts = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ServiceError(f"request body larger than the limit of {limit} bytes", 413)
        parts.append(chunk)
    return b"".join(parts)


async def upload(service: CacheService, request: Request, digest: str, size: int) -> bool:
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


def blob_response(blob: Blob, headers: dict[str, str] | None = None) -> Response:
    headers = {"Content-Length": str(blob.size), **(headers or {})}
    if blob.data is not None:
        return Response(blob.data, media_type="application/octet-stream", headers=headers)
    return StreamingResponse(
        iterate_in_threadpool(blob.chunks()), media_type="application/octet-stream", headers=headers
    )
