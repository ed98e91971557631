"""The shared ccache (CCACHE_REMOTE_STORAGE), reached from a builder container that has no network at all.

The builder container runs patch authors' code. Giving it the host's network to reach the cache service
(as kernel-ci once did) lets that code reach every service of the host, loopback included. Designs weighed:
- an `--internal` Docker network plus a forwarder on its gateway address: the gateway address IS the host,
  so every host service listening on 0.0.0.0 stays reachable through it unless firewall rules are added
  (root, iptables state that outlives kernel-ci), and the network itself is shared state to create,
  find and clean up;
- an HTTP proxy that only lets GET/HEAD through: TLS would have to end at the proxy, and the proxy would
  be an HTTP implementation of our own in front of ccache's;
- chosen: the container keeps `--network none` (only its own loopback). kernel-ci listens on a unix socket
  in a private directory, mounted into the container, and connects each connection accepted there to the
  configured cache service's host:port and nowhere else (HostForwarder, a thread of kernel-ci). In the
  container a relay (IN_CONTAINER) passes ccache's TCP connections on 127.0.0.1:RELAY_PORT to that socket.
  Whatever code in the container does, it can open connections to the cache service and to nothing else:
  it has no route and no address, and the socket's other end only knows one destination. No root, no
  firewall, no Docker network, nothing left behind.
What the container may do at the cache service is then up to its credential: read-only by default (see
kernel_ci.cache.remote.open_store and SECURITY.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from kernel_ci.core.errors import UsageError
from kernel_ci.core.paths import cache_dir

RELAY_PORT = 8375  # in the container's own network namespace: nothing else listens there
SOCKET_DIR = "/run/kci-ccache"  # where the forwarder's directory is mounted in the container
SOCKET_NAME = "ccache.sock"
CONNECT_TIMEOUT = 10.0
CHUNK = 64 * 1024
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


class RelayError(UsageError):
    """A CCACHE_REMOTE_STORAGE (or cache directory) that kernel-ci cannot relay into the container (exit 2):
    the user's setting, the message says which and why."""


@dataclass(frozen=True)
class Storage:
    """One ccache HTTP remote storage: where the service is, and the value as the container must see it."""

    host: str
    port: int
    container_value: str  # CCACHE_REMOTE_STORAGE inside the container: same URL, through the relay
    add_host: str | None  # --add-host NAME:127.0.0.1 (an https name must stay the name its certificate has)


def parse_storage(value: str) -> Storage:
    """CCACHE_REMOTE_STORAGE ("URL|attribute=value|...") -> where to forward and what the container sees.

    Only one http(s) storage is relayed: anything else would need a network the container does not get."""
    entries = value.split()
    if len(entries) != 1:
        raise RelayError(
            f"CCACHE_REMOTE_STORAGE names {len(entries)} storages; kernel-ci relays exactly one http(s) URL "
            "into the builder container (e.g. http://HOST:PORT/ccache/)"
        )
    url, sep, attributes = entries[0].partition("|")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RelayError(
            f"CCACHE_REMOTE_STORAGE {url!r}: kernel-ci relays http:// or https:// storage only "
            "(the builder container has no network)"
        )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise RelayError(f"CCACHE_REMOTE_STORAGE {url!r}: bad port ({exc})") from exc
    host = parts.hostname
    # http: the container talks to its loopback. https: the certificate names the host, so the name stays
    # and resolves to the container's loopback (an IP literal cannot be remapped: it becomes 127.0.0.1).
    keep_name = parts.scheme == "https" and not _is_ip(host)
    inner_host = host if keep_name else "127.0.0.1"
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@" if userinfo else ""
    netloc += f"{inner_host}:{RELAY_PORT}"
    inner_url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return Storage(
        host=host,
        port=port,
        container_value=inner_url + sep + attributes,
        add_host=f"{host}:127.0.0.1" if keep_name else None,
    )


def _is_ip(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            socket.inet_pton(family, host)
            return True
    return False


class HostForwarder:
    """A unix socket in a private directory; every connection to it is joined to (host, port), nothing else.

    A thread of kernel-ci, alive for one container run (`with HostForwarder(...) as forwarder`)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.target = (storage.host, storage.port)
        self.directory = Path(tempfile.mkdtemp(prefix="ccache-relay-", dir=cache_dir("tmp")))
        # The container's build user (not us) connects: the directory must be searchable and the socket
        # writable by it. Anyone on the host who can connect could reach the cache service directly anyway.
        self.directory.chmod(0o755)
        self.socket_path = self.directory / SOCKET_NAME
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise RelayError(
                f"{self.socket_path}: too long for a unix socket ({MAX_SOCKET_PATH} bytes at most); "
                "point KERNEL_CI_CACHE at a shorter directory"
            )
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(os.fspath(self.socket_path))
        self.socket_path.chmod(0o666)
        self._listener.listen(64)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="ccache-forwarder", daemon=True)
        self.connections = 0

    def __enter__(self) -> HostForwarder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                inner, _ = self._listener.accept()
            except OSError:
                return  # closed by __exit__
            self.connections += 1
            threading.Thread(target=self._join, args=(inner,), daemon=True).start()

    def _join(self, inner: socket.socket) -> None:
        try:
            outer = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
        except OSError:
            inner.close()  # the client (ccache) sees a closed connection: a remote miss, not a failed build
            return
        outer.settimeout(None)
        back = threading.Thread(target=_pump, args=(outer, inner), daemon=True)
        back.start()
        _pump(inner, outer)
        back.join()
        inner.close()
        outer.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy source to sink until EOF, then pass the EOF on (half-close); on an error, cut both ways."""
    try:
        while data := source.recv(CHUNK):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


# The relay inside the container: listens on its loopback BEFORE the build starts (no race with ccache's
# first request), forks, and the parent execs the build command (so the watchdog waits for the build
# itself); the child joins each connection to the mounted unix socket. It dies with the container.
IN_CONTAINER = f"""
import os, socket, sys, threading
listener = socket.create_server(("127.0.0.1", {RELAY_PORT}))
if os.fork():
    listener.close()
    os.execvp(sys.argv[1], sys.argv[1:])
def pump(a, b):
    try:
        while data := a.recv({CHUNK}):
            b.sendall(data)
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass
def join(inner):
    outer = socket.socket(socket.AF_UNIX)
    try:
        outer.connect("{SOCKET_DIR}/{SOCKET_NAME}")
    except OSError:
        inner.close()
        return
    back = threading.Thread(target=pump, args=(outer, inner), daemon=True)
    back.start()
    pump(inner, outer)
    back.join()
    inner.close()
    outer.close()
while True:
    conn, _ = listener.accept()
    threading.Thread(target=join, args=(conn,), daemon=True).start()
"""


@contextlib.contextmanager
def forwarding(storage: Storage | None) -> Iterator[HostForwarder | None]:
    """A HostForwarder for the length of the block when there is a storage to reach, else None."""
    if storage is None:
        yield None
        return
    with HostForwarder(storage) as forwarder:
        yield forwarder


def container_options(forwarder: HostForwarder) -> list[str]:
    """The `docker run` options that give the container the relay's socket (and nothing else)."""
    options = ["-v", f"{forwarder.directory}:{SOCKET_DIR}:ro", "-e", "CCACHE_REMOTE_STORAGE"]
    if forwarder.storage.add_host:
        options += ["--add-host", forwarder.storage.add_host]
    return options


def client_env(forwarder: HostForwarder) -> dict[str, str]:
    """The docker client's environment entry that `-e CCACHE_REMOTE_STORAGE` passes on: the value (it may
    hold a token) never appears on the logged command line."""
    return {"CCACHE_REMOTE_STORAGE": forwarder.storage.container_value}


def wrap(command: list[str]) -> list[str]:
    """COMMAND preceded by the in-container relay, which execs it once it listens."""
    return ["python3", "-c", IN_CONTAINER, *command]
