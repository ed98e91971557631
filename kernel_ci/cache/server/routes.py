"""The route handlers of the HTTP face, one class per route group; each is given the service and the one
authorization dependency (auth.Access), and lists its routes (app.create_app assembles the table)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from kernel_ci.cache.server import web
from kernel_ci.cache.server.auth import Access
from kernel_ci.cache.server.explain import ExplainBusy, MissExplainer
from kernel_ci.cache.server.middleware import INLINE_HASH_MAX
from kernel_ci.cache.server.openapi import openapi_schema
from kernel_ci.cache.server.service import (
    CacheService,
    ServiceError,
    ccache_key_from_path,
    check_key,
    check_output_name,
    parse_json,
)
from kernel_ci.cache.server.transfer import blob_response, digits, error, query_int, read_limited, upload

Handler = Callable[[Request], Awaitable[Response]]
RouteSpec = tuple[str, Handler, list[str]]  # path, handler, methods


class Health:
    """/healthz, /metrics, /openapi.json."""

    def __init__(self, service: CacheService, access: Access) -> None:
        self.service = service
        self.access = access

    def routes(self) -> list[RouteSpec]:
        return [
            ("/healthz", self.healthz, ["GET"]),
            ("/metrics", self.metrics, ["GET"]),
            ("/openapi.json", self.openapi, ["GET"]),
        ]

    async def healthz(self, request: Request) -> Response:
        """Open to anyone (load balancers), but where the data lives (paths, bucket, endpoint, database
        host) and why it is unhealthy are shown to token holders only; counts follow --no-anonymous-read."""
        trusted = self.access.trusted(request)
        try:
            totals = await run_in_threadpool(self.service.index.totals)
        except Exception as exc:
            detail = {"error": str(exc)} if trusted else {}
            return JSONResponse({"status": "unhealthy", **detail}, status_code=503)
        doc: dict[str, Any] = {"status": "ok"}
        if trusted:
            doc |= {"index": self.service.index.describe(), "blob_store": self.service.blobs.describe()}
        if trusted or self.access.config.anonymous_read:
            doc |= totals
        return JSONResponse(doc)

    async def metrics(self, request: Request) -> Response:
        self.access.read(request)
        await run_in_threadpool(self.service.access.flush)
        gauges = await run_in_threadpool(self.service.gauges)
        return PlainTextResponse(
            self.service.metrics.render(gauges), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def openapi(self, request: Request) -> Response:
        self.access.read(request)
        return JSONResponse(openapi_schema())


class Blobs:
    """/api/v1/blobs/<sha256> and the missing-blobs query."""

    def __init__(self, service: CacheService, access: Access) -> None:
        self.service = service
        self.access = access

    def routes(self) -> list[RouteSpec]:
        return [
            ("/api/v1/blobs/{digest}", self.blob, ["GET", "HEAD", "PUT"]),
            ("/api/v1/missing-blobs", self.missing_blobs, ["POST"]),
        ]

    async def blob(self, request: Request) -> Response:
        digest = request.path_params["digest"]
        if request.method == "PUT":
            return await self._put(request, digest)
        self.access.read(request)
        if request.method == "HEAD":
            sizes = await run_in_threadpool(self.service.index.blob_sizes, [digest])
            if digest not in sizes:
                return Response(status_code=404)
            return Response(headers={"Content-Length": str(sizes[digest])})
        found = await run_in_threadpool(self.service.get_blob, digest)
        if found is None:
            return error(404, f"no blob {digest}")
        return blob_response(found)

    async def _put(self, request: Request, digest: str) -> Response:
        self.access.write(request)
        length = request.headers.get("content-length")
        if length is None or not digits(length):
            raise ServiceError("PUT a blob with a Content-Length header (its exact size)", 411)
        size = int(length)
        limit = self.service.limits.max_blob_bytes
        if size > limit:
            raise ServiceError(f"blob of {size} bytes exceeds the limit of {limit}", 413)
        created = await upload(self.service, request, digest, size)
        return JSONResponse({"sha256": digest, "size": size}, status_code=201 if created else 200)

    async def missing_blobs(self, request: Request) -> Response:
        self.access.read(request)
        body = await read_limited(request, 4 << 20)
        doc = await run_in_threadpool(parse_json, body, "the request")
        digests = doc.get("digests") if isinstance(doc, dict) else None
        if not isinstance(digests, list) or len(digests) > 20_000:
            raise ServiceError("expected {'digests': [<sha256>, ...]} (at most 20000)")
        missing = await run_in_threadpool(self.service.missing_blobs, digests)
        return JSONResponse({"missing": missing})


class Builds:
    """/api/v1/builds...: manifests, pins, attached runs, files, the miss explanation."""

    def __init__(self, service: CacheService, access: Access, explainer: MissExplainer) -> None:
        self.service = service
        self.access = access
        self.explainer = explainer

    def routes(self) -> list[RouteSpec]:
        return [
            ("/api/v1/builds", self.builds, ["GET"]),
            ("/api/v1/builds/{key}", self.build, ["GET", "HEAD", "PUT"]),
            ("/api/v1/builds/{key}/pin", self.pin, ["PUT", "DELETE"]),
            ("/api/v1/builds/{key}/miss", self.miss, ["GET"]),
            ("/api/v1/builds/{key}/runs/{run_id}", self.run, ["PUT"]),
            ("/api/v1/builds/{key}/runs/{run_id}/{part}", self.run_file, ["GET"]),
            ("/api/v1/builds/{key}/files/{name:path}", self.build_file, ["GET"]),
        ]

    async def builds(self, request: Request) -> Response:
        self.access.read(request)
        limit = query_int(request, "limit", 50, 1, 500)
        offset = query_int(request, "offset", 0, 0, 1 << 31)
        rows = await run_in_threadpool(self.service.index.build_list, limit, offset)
        total = await run_in_threadpool(self.service.index.build_count)
        return JSONResponse({"total": total, "builds": [web.summary_json(r) for r in rows]})

    async def build(self, request: Request) -> Response:
        key = check_key(request.path_params["key"])
        if request.method == "PUT":
            self.access.write(request)
            body = await read_limited(request, self.service.limits.max_manifest_bytes)
            status, _record = await run_in_threadpool(self.service.put_build, key, body)
            code = 201 if status == "created" else 200
            return JSONResponse({"key": key, "status": status}, status_code=code)
        self.access.read(request)
        row = await run_in_threadpool(self.service.get_build, key)
        if row is None:
            return error(404, f"no complete build {key}")
        if request.method == "HEAD":
            return Response()
        return JSONResponse({**row.doc, "pinned": row.pinned, "bytes": row.bytes, "runs": row.runs})

    async def pin(self, request: Request) -> Response:
        key = check_key(request.path_params["key"])
        self.access.write(request)
        pinned = request.method == "PUT"
        changed = await run_in_threadpool(self.service.index.build_pin, key, pinned)
        if not changed:
            return error(404, f"no build {key}")
        return JSONResponse({"key": key, "pinned": pinned})

    async def run(self, request: Request) -> Response:
        key = check_key(request.path_params["key"])
        self.access.write(request)
        body = await read_limited(request, 1 << 20)
        run_id = request.path_params["run_id"]
        status, doc = await run_in_threadpool(self.service.put_run, key, run_id, body)
        return JSONResponse({"status": status, **doc}, status_code=201 if status == "created" else 200)

    async def build_file(self, request: Request) -> Response:
        self.access.read(request)
        key = check_key(request.path_params["key"])
        name = check_output_name(request.path_params["name"])
        row = await run_in_threadpool(self.service.get_build, key, False)
        output = None
        if row is not None:
            output = next((o for o in row.doc["outputs"] if o["name"] == name), None)
        if output is None:
            return error(404, f"build {key[:16]} has no output {name!r}")
        found = await run_in_threadpool(self.service.get_blob, output["sha256"], "download")
        if found is None:
            return error(404, f"the blob of {name} is missing or corrupt")
        filename = name.rsplit("/", 1)[-1] + (".tar" if output["kind"] == "tar" else "")
        return blob_response(found, {"Content-Disposition": f'attachment; filename="{filename}"'})

    async def run_file(self, request: Request) -> Response:
        self.access.read(request)
        key = check_key(request.path_params["key"])
        part = {"junit.xml": "junit", "console.log": "console"}.get(request.path_params["part"])
        row = await run_in_threadpool(self.service.get_build, key, False)
        wanted = request.path_params["run_id"]
        ref = None
        if row is not None and part is not None:
            ref = next((r.get(part) for r in row.runs if r.get("run_id") == wanted), None)
        if ref is None:
            return error(404, "no such run file (junit.xml or console.log of an attached run)")
        found = await run_in_threadpool(self.service.get_blob, ref["sha256"], "download")
        if found is None:
            return error(404, "the blob of this file is missing or corrupt")
        media = "application/xml" if part == "junit" else "text/plain; charset=utf-8"
        name = f"{key[:12]}-{wanted}-{request.path_params['part']}"
        response = blob_response(found, {"Content-Disposition": f'attachment; filename="{name}"'})
        response.headers["content-type"] = media
        return response

    async def miss(self, request: Request) -> Response:
        self.access.read(request)
        key = check_key(request.path_params["key"])
        explanation = await self.explainer.explain(key)
        if explanation is None:
            return error(404, f"no build {key}")
        return JSONResponse(explanation)


class Aliases:
    """/api/v1/aliases/<request key>: a request key (what a client asked for) -> the build key."""

    def __init__(self, service: CacheService, access: Access) -> None:
        self.service = service
        self.access = access

    def routes(self) -> list[RouteSpec]:
        return [("/api/v1/aliases/{request_key}", self.alias, ["GET", "PUT"])]

    async def alias(self, request: Request) -> Response:
        request_key = check_key(request.path_params["request_key"], "request key")
        if request.method == "PUT":
            self.access.write(request)
            body = await read_limited(request, 1024)
            doc = parse_json(body, "the alias")
            key = check_key(doc.get("key") if isinstance(doc, dict) else None)  # type: ignore[arg-type]  # check_key refuses a non-str
            await run_in_threadpool(self.service.index.alias_put, request_key, key)
            return JSONResponse({"request_key": request_key, "key": key})
        self.access.read(request)
        target = await run_in_threadpool(self.service.index.alias_get, request_key)
        if target is None:
            return error(404, f"no alias for {request_key}")
        return JSONResponse({"request_key": request_key, "key": target})


class Ccache:
    """/ccache/...: ccache's HTTP remote storage (GET/HEAD/PUT/DELETE of one object per path)."""

    def __init__(self, service: CacheService, access: Access, inline_reads: bool) -> None:
        self.service = service
        self.access = access
        # a look-up is one indexed SQLite row: done on the event loop, as a thread hop per request would
        # cost more than the work; reading (and hashing) the object too, if it is small
        self.inline_reads = inline_reads

    def routes(self) -> list[RouteSpec]:
        return [("/ccache/{path:path}", self.ccache, ["GET", "HEAD", "PUT", "DELETE"])]

    async def ccache(self, request: Request) -> Response:
        key = ccache_key_from_path(request.path_params["path"])
        if request.method in ("GET", "HEAD"):
            self.access.read(request)
            return await self._read(key, request.method)
        self.access.write(request)
        if request.method == "DELETE":
            existed = await run_in_threadpool(self.service.ccache_delete, key)
            return Response(status_code=200 if existed else 404)
        data = await read_limited(request, self.service.limits.max_ccache_object_bytes)
        await run_in_threadpool(self.service.ccache_put, key, data)  # hashes: never on the event loop
        return Response(status_code=201)

    async def _read(self, key: str, method: str) -> Response:
        service = self.service
        if self.inline_reads:
            found = service.ccache_lookup(key)
        else:
            found = await run_in_threadpool(service.ccache_lookup, key)
        if found is None:
            if method == "GET":
                service.ccache_count(None)
            return Response(status_code=404)
        digest, size = found
        if method == "HEAD":
            return Response(headers={"Content-Length": str(size)})
        if self.inline_reads and size <= INLINE_HASH_MAX:
            blob = service.ccache_read(key, digest)
        else:
            blob = await run_in_threadpool(service.ccache_read, key, digest)
        if blob is None:
            return Response(status_code=404)
        return blob_response(blob)


class Pages:
    """The web pages: the build list and one build (its outputs, runs and miss explanation)."""

    def __init__(self, service: CacheService, access: Access, explainer: MissExplainer) -> None:
        self.service = service
        self.access = access
        self.explainer = explainer

    def routes(self) -> list[RouteSpec]:
        return [("/", self.index_page, ["GET"]), ("/builds/{key}", self.build_page, ["GET"])]

    async def index_page(self, request: Request) -> Response:
        self.access.read(request)
        limit = query_int(request, "limit", 100, 1, 500)
        offset = query_int(request, "offset", 0, 0, 1 << 31)
        rows = await run_in_threadpool(self.service.index.build_list, limit, offset)
        total = await run_in_threadpool(self.service.index.build_count)
        return web.render(request, "builds.html", web.list_context(rows, total, limit, offset))

    async def build_page(self, request: Request) -> Response:
        self.access.read(request)
        key = check_key(request.path_params["key"])
        row = await run_in_threadpool(self.service.get_build, key, False)
        if row is None:
            return web.render(request, "not_found.html", {"key": key}, status_code=404)
        try:
            explanation = await self.explainer.explain(key)
        except ExplainBusy:  # the page still shows the build; only its comparison waits for a reload
            explanation = {"busy": True}
        return web.render(request, "build.html", web.build_context(row, explanation))
