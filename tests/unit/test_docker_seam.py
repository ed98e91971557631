"""Docker through one seam (kernel_ci/host/docker.py), read from the code itself (ast); the ccache relay's
parsing and forwarding; the one timing helper."""

from __future__ import annotations

import ast
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel_ci.build import ccacherelay
from kernel_ci.build import kbuild as builder
from kernel_ci.core.timing import measure_duration
from kernel_ci.host import docker

PACKAGE = Path(__file__).resolve().parents[2] / "kernel_ci"
SEAM = PACKAGE / "host" / "docker.py"
# Modules still calling Docker outside the seam; this list may only shrink (it is empty).
KNOWN_DOCKER_CALLERS: set[Path] = set()


def _docker_strings(path: Path) -> list[int]:
    """Lines that start a `docker ...` command (a list or tuple whose head is "docker", a string that is or
    pipes into a `docker ...` shell command) or import python_on_whales."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.List | ast.Tuple) and node.elts:
            head = node.elts[0]
            if isinstance(head, ast.Constant) and head.value == "docker":
                found.add(node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.strip()
            if text.startswith("docker ") or "| docker " in text:
                found.add(node.lineno)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(name.startswith("python_on_whales") for name in names):
                found.add(node.lineno)
    return sorted(found)


@pytest.mark.parametrize(
    "path",
    sorted(p for p in PACKAGE.rglob("*.py") if p != SEAM and p not in KNOWN_DOCKER_CALLERS),
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_docker_is_called_through_the_seam_only(path: Path) -> None:
    lines = _docker_strings(path)
    assert not lines, f"{path.relative_to(PACKAGE)}:{lines}: call Docker through kernel_ci.host.docker"


def test_the_seam_check_sees_a_docker_argv(tmp_path: Path) -> None:
    """The check is not blind: a raw argv, a shell pipe and a python-on-whales import are each caught."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        'argv = ["docker", "run", "x"]\n'
        'shell = "tar -c . | docker import - tag"\n'
        "from python_on_whales import docker\n"
        'packages = {"docker": "docker.io"}\n'  # a package name, not a call
        'argv = ("docker", "rm")\n'
    )
    assert _docker_strings(probe) == [1, 2, 3, 5]


def test_known_docker_callers_still_call_docker() -> None:
    for path in KNOWN_DOCKER_CALLERS:
        assert _docker_strings(path), f"{path} no longer calls Docker: remove it from KNOWN_DOCKER_CALLERS"


def _env(tmp_path: Path) -> builder.BuildEnv:
    return builder.BuildEnv("img", tmp_path / "src", tmp_path / "out", tmp_path / "cc", 2, "t")


def test_the_builder_never_gets_a_network(tmp_path: Path) -> None:
    remote = "http://127.0.0.1:9/ccache/|bearer-token=secret"
    env = dataclasses.replace(_env(tmp_path), ccache_remote=remote)  # as Settings -> BuildRequest pass it
    storage = builder.remote_storage(env)
    assert storage is not None
    with ccacherelay.forwarding(storage) as forwarder:
        assert forwarder is not None
        argv = builder.docker_run_argv(env, ["make"], watchdog=True, forwarder=forwarder)
    assert argv[argv.index("--network") + 1] == "none"
    assert argv.count("--network") == 1 and "host" not in argv
    assert f"type=bind,source={forwarder.directory},target={ccacherelay.SOCKET_DIR},readonly" in argv
    assert "secret" not in " ".join(argv)  # the token travels in the client's environment, not the argv
    assert not forwarder.directory.exists()  # the forwarder leaves nothing behind


@pytest.mark.parametrize(
    ("value", "host", "port", "inner", "add_host"),
    [
        (
            "http://127.0.0.1:8080/ccache/|bearer-token=t",
            "127.0.0.1",
            8080,
            f"http://127.0.0.1:{ccacherelay.RELAY_PORT}/ccache/|bearer-token=t",
            None,
        ),
        (
            "http://cache.lan/ccache/|read-only=true",
            "cache.lan",
            80,
            f"http://127.0.0.1:{ccacherelay.RELAY_PORT}/ccache/|read-only=true",
            None,
        ),
        (
            "https://user:pw@cache.example:8443/ccache/",
            "cache.example",
            8443,
            f"https://user:pw@cache.example:{ccacherelay.RELAY_PORT}/ccache/",
            "cache.example:127.0.0.1",
        ),
    ],
)
def test_storage_is_rewritten_to_the_relay(
    value: str, host: str, port: int, inner: str, add_host: str | None
) -> None:
    storage = ccacherelay.parse_storage(value)
    assert (storage.host, storage.port, storage.container_value, storage.add_host) == (
        host,
        port,
        inner,
        add_host,
    )


@pytest.mark.parametrize(
    "value",
    [
        "file:///srv/ccache",  # a local path: not reachable from a container without a network
        "redis://cache:6379",
        "http://a:1/ccache/ http://b:2/ccache/",  # two storages: only one is relayed
        "http://cache:notaport/ccache/",
        "http:///ccache/",
    ],
)
def test_a_storage_that_cannot_be_relayed_is_refused(value: str) -> None:
    with pytest.raises(ccacherelay.RelayError, match="CCACHE_REMOTE_STORAGE"):
        ccacherelay.parse_storage(value)


@pytest.fixture
def echo_service() -> Iterator[tuple[int, list[bytes]]]:
    """A loopback TCP service that answers each connection with b"echo:" + what it received."""
    seen: list[bytes] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                seen.append(data)
                conn.sendall(b"echo:" + data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], seen
    stop.set()
    thread.join()
    server.close()


def test_the_forwarder_joins_its_socket_to_the_one_service(echo_service: tuple[int, list[bytes]]) -> None:
    port, seen = echo_service
    storage = ccacherelay.parse_storage(f"http://127.0.0.1:{port}/ccache/")
    payload = bytes(range(256)) * 1024  # bigger than one chunk, every byte value
    with ccacherelay.HostForwarder(storage) as forwarder:
        for _ in range(3):
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(forwarder.socket_path))
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)  # the half-close reaches the service, which then answers
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
            client.close()
            assert answer == b"echo:" + payload
    assert seen == [payload] * 3


def test_the_forwarder_cuts_a_connection_when_the_service_is_down() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]  # closed below: nothing listens there any more
    storage = ccacherelay.parse_storage(f"http://127.0.0.1:{port}/ccache/")
    with ccacherelay.HostForwarder(storage) as forwarder:
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(forwarder.socket_path))
        client.settimeout(15)
        assert client.recv(10) == b""  # closed: ccache sees a miss, the build goes on
        client.close()


def test_measure_duration_records_successful_steps_only() -> None:
    durations: dict[str, float] = {}
    with measure_duration(durations, "step") as took:
        time.sleep(0.05)
    assert 0.05 <= took.seconds < 5 and durations == {"step": round(took.seconds, 2)}
    with pytest.raises(RuntimeError), measure_duration(durations, "failed"):
        raise RuntimeError("a failed step has no duration")
    assert "failed" not in durations


def test_a_cache_dir_too_deep_for_a_unix_socket_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / ("d" * 100)
    monkeypatch.setenv("KERNEL_CI_CACHE", str(deep))
    storage = ccacherelay.parse_storage("http://127.0.0.1:9/ccache/")
    with pytest.raises(ccacherelay.RelayError, match="KERNEL_CI_CACHE"):
        ccacherelay.HostForwarder(storage)
    assert list((deep / "tmp").iterdir()) == []  # nothing left behind


def test_bind_mounts_never_create_a_missing_source() -> None:
    """`-v` lets dockerd (root) create a missing host directory as root; the seam writes `--mount` instead,
    which refuses it (tests/e2e/test_rootless.py::test_a_user_cannot_make_docker_create_root_owned_dirs)."""
    argv = docker.run_argv(
        "img", ["true"], ["--user", "1:1", "-v", "/a:/b:ro", "--volume", "/c:/d", "-w", "/"]
    )
    assert "-v" not in argv and "--volume" not in argv
    assert argv[argv.index("--user") + 1] == "1:1" and argv[argv.index("-w") + 1] == "/"
    mounts = [argv[i + 1] for i, a in enumerate(argv) if a == "--mount"]
    assert mounts == ["type=bind,source=/a,target=/b,readonly", "type=bind,source=/c,target=/d"]


@pytest.mark.parametrize("volume", ["rel:/b", "/a:rel", "/a,type=volume:/b", "/a:/b:z", '/a"x:/b', "/a=1:/b"])
def test_bind_mounts_that_could_be_misread_are_refused(volume: str) -> None:
    with pytest.raises(docker.DockerError, match="bind mount"):
        docker.run_argv("img", ["true"], ["-v", volume])
