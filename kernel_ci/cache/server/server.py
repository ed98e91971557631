"""``kernel-ci cache serve``: open the stores, build the app, run it under uvicorn."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette

from kernel_ci.cache.server.app import AuthConfig, create_app
from kernel_ci.cache.server.blobs import BlobStore, LocalBlobStore
from kernel_ci.cache.server.index import dsn_secrets, open_index
from kernel_ci.cache.server.metrics import MULTIPROC_ENV
from kernel_ci.cache.server.protocol import EarlyCcacheProtocol
from kernel_ci.cache.server.service import CacheService, Limits

TOKENS_ENV = "KERNEL_CI_CACHE_SERVER_TOKENS"  # comma-separated write tokens (keeps them out of `ps`)
READ_TOKENS_ENV = "KERNEL_CI_CACHE_SERVER_READ_TOKENS"
DEFAULT_LIMIT_CONCURRENCY = 512  # a build farm's ccache clients keep one connection per compile job


@dataclass
class ServerConfig:
    data: Path
    index_url: str | None = None
    blobs_url: str | None = None
    tokens: list[str] = field(default_factory=list)
    read_tokens: list[str] = field(default_factory=list)
    anonymous_read: bool = True
    limits: Limits = field(default_factory=Limits)
    # per worker process: connections + requests in progress beyond which uvicorn answers 503 at once, so
    # that a flood of (idle or slow) connections costs a refusal, not memory and file descriptors
    limit_concurrency: int = DEFAULT_LIMIT_CONCURRENCY


def open_blobs(url: str | None, data: Path) -> BlobStore:
    if not url:
        return LocalBlobStore(data / "blobs")
    if url.startswith("s3://"):
        from kernel_ci.cache.server.s3blobs import S3BlobStore

        return S3BlobStore(url, spool=data / "spool")
    if url.startswith("file://"):
        return LocalBlobStore(Path(url.removeprefix("file://")))
    raise ValueError(f"unsupported blob store URL {url!r}: use s3://BUCKET?endpoint=... or file:///DIR")


def env_tokens(name: str) -> list[str]:
    return [t.strip() for t in os.environ.get(name, "").split(",") if t.strip()]


class _Redactor:
    """A log record factory that removes secrets (database passwords, tokens) from every record of every
    logger, message and traceback alike: uvicorn's, psycopg's and boto's records included, whatever
    handler formats them. A record factory rather than a handler filter, as uvicorn installs its own
    handlers after this process configured logging."""

    secrets: set[str] = set()
    installed = False

    @classmethod
    def install(cls, secrets: list[str]) -> None:
        cls.secrets.update(s for s in secrets if len(s) >= 3)
        if cls.installed:
            return
        cls.installed = True
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if cls.secrets:
                cls._scrub(record)
            return record

        logging.setLogRecordFactory(factory)

    @classmethod
    def redact(cls, text: str) -> str:
        for secret in sorted(cls.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    @classmethod
    def _scrub(cls, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error report
            return
        record.msg, record.args = cls.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = cls.redact(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = cls.redact(record.stack_info)


def make_service(config: ServerConfig) -> CacheService:
    _Redactor.install([*dsn_secrets(config.index_url), *config.tokens, *config.read_tokens])
    config.data.mkdir(parents=True, exist_ok=True)
    return CacheService(
        open_index(config.index_url, config.data), open_blobs(config.blobs_url, config.data), config.limits
    )


def make_app(config: ServerConfig) -> tuple[Starlette, CacheService]:
    service = make_service(config)
    auth = AuthConfig(
        write_tokens=list(config.tokens),
        read_tokens=list(config.read_tokens),
        anonymous_read=config.anonymous_read,
    )
    return create_app(service, auth), service


CONFIG_ENV = "KERNEL_CI_CACHE_SERVER_CONFIG"  # how `serve --workers N` hands the config to its workers


def _config_to_env(config: ServerConfig) -> str:
    return json.dumps(
        {
            "data": str(config.data),
            "index_url": config.index_url,
            "blobs_url": config.blobs_url,
            "tokens": config.tokens,
            "read_tokens": config.read_tokens,
            "anonymous_read": config.anonymous_read,
            "limits": dataclasses.asdict(config.limits),
        }
    )


def app_from_environment() -> Starlette:
    """The app of one worker process of `serve --workers N` (a uvicorn factory)."""
    raw = json.loads(os.environ[CONFIG_ENV])
    raw["data"] = Path(raw["data"])
    raw["limits"] = Limits(**raw["limits"])
    app, _service = make_app(ServerConfig(**raw))
    return app


def serve(config: ServerConfig, host: str, port: int, log_level: str = "info", workers: int = 1) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("kernel_ci.cacheserver")
    if not config.tokens:
        log.warning("no write token configured (--token or %s): the cache is read-only", TOKENS_ENV)
    if workers > 1:
        # several processes on one socket (stateless: they share the index and the blobs); the
        # configuration, tokens included, goes to them through this process's environment
        make_service(config)  # fail early, in the parent, on a bad index or blob store URL
        os.environ[CONFIG_ENV] = _config_to_env(config)
        log.info("%d worker processes", workers)
        with metrics_dir():
            uvicorn.run(
                "kernel_ci.cache.server.server:app_from_environment",
                factory=True,
                host=host,
                port=port,
                workers=workers,
                log_level=log_level,
                access_log=False,
                limit_concurrency=config.limit_concurrency,
                http=EarlyCcacheProtocol,
            )
        return
    if os.environ.pop(MULTIPROC_ENV, None):  # one process: its own counters, no other server's files
        log.info("one worker: %s ignored", MULTIPROC_ENV)
    app, service = make_app(config)
    log.info("index: %s; blobs: %s", service.index.describe(), service.blobs.describe())
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        limit_concurrency=config.limit_concurrency,
        http=EarlyCcacheProtocol,
    )


@contextlib.contextmanager
def metrics_dir() -> Iterator[Path]:
    """A fresh PROMETHEUS_MULTIPROC_DIR for this server's workers, removed when the server stops.

    The server sets it, and nothing else does: prometheus-client reads it when a process first imports
    it, so it must be in the environment the workers are spawned with (they inherit this process's);
    it must be shared by exactly the workers of one server (a directory another server or an earlier
    run wrote to would be summed into this one's counters); and a library or client that set it would
    switch every process importing kernel_ci (tests, the build client) to file-backed metrics."""
    path = Path(tempfile.mkdtemp(prefix="kernel-ci-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(path, ignore_errors=True)


def wait_healthy(url: str, alive: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Poll <url>/healthz until it answers 200 (True), or the process stops being alive or the timeout
    passes (False): how a caller that started a service knows it is ready."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return True
        if not alive() or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
