"""The HTTP face of the cache service (Starlette): build API, ccache remote storage, web pages, metrics.

Assembled here from its parts: the route groups (routes.py), the one authorization dependency (auth.py),
the ASGI middleware (middleware.py); this module adds the error mapping shared by every route."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from kernel_ci.cache.server.auth import Access, AuthConfig, Denied, authorize, has_valid_token
from kernel_ci.cache.server.blobs import BlobError, LocalBlobStore
from kernel_ci.cache.server.explain import MissExplainer
from kernel_ci.cache.server.history import History
from kernel_ci.cache.server.index import IndexError_, SqliteIndex
from kernel_ci.cache.server.memory import AnswerCache
from kernel_ci.cache.server.middleware import (
    INLINE_HASH_MAX,
    CcacheFastPath,
    KeptAnswer,
    PathGuard,
    Timing,
    path_problem,
)
from kernel_ci.cache.server.routes import Aliases, Blobs, Builds, Ccache, Handler, Health, Pages, RouteSpec
from kernel_ci.cache.server.service import CacheService, ServiceError
from kernel_ci.cache.server.transfer import error

__all__ = [
    "INLINE_HASH_MAX",
    "READ_ONLY_POSTS",
    "AuthConfig",
    "authorize",
    "create_app",
    "has_valid_token",
    "path_problem",
]

log = logging.getLogger("kernel_ci.cacheserver")

# POST routes that only read (a query with a body); every other PUT/POST/DELETE needs a write token
READ_ONLY_POSTS = frozenset({("POST", "/api/v1/missing-blobs")})


def _guard(handler: Handler) -> Handler:
    """Turns the service's refusals into clear JSON errors (never a 500 for a bad request)."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Denied as exc:
            return error(exc.status, str(exc))
        except ServiceError as exc:
            return error(exc.status, str(exc), **exc.extra)
        except (BlobError, IndexError_) as exc:
            _log_unavailable(exc.status, exc)
            return error(exc.status, str(exc))
        except ClientDisconnect:
            return Response(status_code=400)

    return wrapped


def _log_unavailable(status: int, exc: Exception) -> None:
    if status >= 500:  # the operator's problem (a store down or full), not the client's
        log.warning("answered %d: %s", status, exc)


class RouteGroup(Protocol):
    """A group of routes sharing the service and the access rules (kernel_ci.cache.server.routes)."""

    def routes(self) -> list[RouteSpec]: ...


def route_table(service: CacheService, access: Access, inline_reads: bool) -> list[RouteSpec]:
    """Every route of the service, by group."""
    explainer = MissExplainer(service, service.limits.max_concurrent_explains)
    groups: list[RouteGroup] = [
        Pages(service, access, explainer),
        Health(service, access),
        Blobs(service, access),
        Builds(service, access, explainer),
        Aliases(service, access),
        Ccache(service, access, inline_reads),
        History(service, access),
    ]
    return [spec for group in groups for spec in group.routes()]


def _inline_reads(service: CacheService) -> bool:
    """Whether ccache reads may run on the event loop: only a local SQLite index and local blobs are quick
    enough (a PostgreSQL or S3 round trip would stall every other request)."""
    return service.index.describe().startswith("SQLite") and service.blobs.describe().startswith("local")


def _memory(service: CacheService) -> tuple[AnswerCache[KeptAnswer], LocalBlobStore] | None:
    """The worker's memory of ccache answers (memory.py) and the blob files they were read from: only
    over a SQLite index, whose change generation every process on this host shares (PostgreSQL replicas
    on other hosts have no such thing), and local blobs."""
    index, files = service.index, service.blobs
    size = service.limits.memory_answer_bytes
    if not isinstance(index, SqliteIndex) or not isinstance(files, LocalBlobStore) or size <= 0:
        return None
    return AnswerCache(index.generation, size, max_object=INLINE_HASH_MAX), files


class CacheApp(Starlette):
    """The Starlette app, with ccache reads answered before its middleware stack when ``fast`` is set
    (middleware.CcacheFastPath: it hands back whatever it cannot answer as the routes would)."""

    fast: CcacheFastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.fast is not None
            and scope["type"] == "http"
            and scope["method"] in ("GET", "HEAD")
            and scope["path"].startswith("/ccache/")
            and await self.fast.serve(scope, send)
        ):
            return
        await super().__call__(scope, receive, send)


def create_app(service: CacheService, auth: AuthConfig) -> Starlette:
    inline_reads = _inline_reads(service)
    table = route_table(service, Access(auth), inline_reads)
    routes = [Route(path, _guard(handler), methods=methods) for path, handler, methods in table]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(service.access.flush)

    app = CacheApp(routes=routes, lifespan=lifespan)
    if inline_reads:
        app.fast = CcacheFastPath(service, auth, _memory(service))
    app.add_middleware(PathGuard)  # before anything looks at the path
    app.add_middleware(Timing, service=service)  # outermost: times everything
    return app
