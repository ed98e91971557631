"""A real cache service on 127.0.0.1 for tests: uvicorn in a thread of the test process, or a subprocess."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from kernel_ci.cache.server.protocol import EarlyCcacheProtocol
from kernel_ci.cache.server.server import ServerConfig, make_app, wait_healthy
from kernel_ci.cache.server.service import CacheService

TOKEN = "write-token-for-tests"
READ_TOKEN = "read-token-for-tests"
REPO = Path(__file__).resolve().parents[1]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Running:
    url: str
    service: CacheService | None
    data: Path
    app: Any = None  # the Starlette app (in-thread servers): its routing table for route-complete tests
    pid: int | None = None  # the server process (subprocess servers): for /proc/<pid>/io
    server: Any = None  # the uvicorn.Server (in-thread servers): its connections, for white-box checks

    def client(self, token: str | None = TOKEN, **kwargs) -> httpx.Client:  # type: ignore[no-untyped-def]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def server_in_thread(config: ServerConfig, fast_path: bool = True) -> Iterator[Running]:
    """The service in a thread of this process (its CacheService is reachable for white-box checks);
    ``fast_path=False``: without its ccache read fast paths, every request through the routes."""
    if not config.tokens:
        config.tokens = [TOKEN]
        config.read_tokens = config.read_tokens or [READ_TOKEN]
    app, service = make_app(config)
    if not fast_path:
        app.fast = None  # type: ignore[attr-defined]  # app.CacheApp: answers through its routes only
    sock = free_socket()
    port = sock.getsockname()[1]
    config_ = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", http=EarlyCcacheProtocol
    )
    server = uvicorn.Server(config_)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the cache service did not start")
        time.sleep(0.02)
    try:
        yield Running(f"http://127.0.0.1:{port}", service, config.data, app=app, server=server)
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
        if not thread.is_alive():
            service.close()  # its index connections and descriptors: hundreds of services in one session


def free_port() -> int:
    with contextlib.closing(free_socket()) as sock:
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_process(data: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[Running]:
    """`kernel-ci cache serve` as a subprocess (as an operator runs it); stopped and reaped at the end."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "kernel_ci.cli.main",
        "cache",
        "serve",
        "--data",
        str(data),
        "--port",
        str(port),
    ]
    argv += ["--token", TOKEN, *extra]
    log = open(data.parent / f"server-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(url, lambda: proc.poll() is None):
            log.flush()
            raise RuntimeError(
                f"cache service did not start: {(data.parent / f'server-{port}.log').read_text()[-3000:]}"
            )
        yield Running(url, None, data, pid=proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class TcpProxy:
    """A loopback TCP forwarder to a real service (PostgreSQL, s3rver) that a test can cut and restore:
    "the database went away" without stopping the shared service other tests use."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = free_socket_on(self.port)
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and reset every open one (a crashed server, as its clients see it)."""
        with self._lock:
            if self._listener is not None:
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
                self._listener.close()
                self._listener = None
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # stopped while this one was being accepted
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def free_socket_on(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text page (parsed by prometheus-client), or None."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None
