"""The builder container is a trust boundary: a patch series' Makefile/Kconfig code runs in it.

Each attack is a make target in a scratch "source tree", run through builder.run_make exactly as kbuild
targets are, in the real builder image. A target records what it managed to do in $(O)/attacks; every test
asserts the attempt was refused (each fails if its protection is removed). No kernel is built here: the
protections are properties of the container, whatever the Makefile is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kernel_ci.build import images
from kernel_ci.build import kbuild as builder
from kernel_ci.core import proc
from kernel_ci.core.settings import Settings
from tests.cacheservice import READ_TOKEN, TOKEN, server_process

pytestmark = pytest.mark.slow

# Every recipe line starts with a tab; results are appended to $(O)/attacks as "<name> <outcome>".
MAKEFILE = textwrap.dedent(
    """\
    R := $(O)/attacks
    srctree-write:
    \t@touch $(CURDIR)/pwned 2>/dev/null && echo "srctree-write succeeded" >> $(R) \\
    \t  || echo "srctree-write refused" >> $(R)
    uid:
    \t@echo "uid $$(id -u):$$(id -g)" >> $(R)
    caps:
    \t@echo "capeff $$(awk '/^CapEff/ {print $$2}' /proc/self/status)" >> $(R)
    \t@echo "nonewprivs $$(awk '/^NoNewPrivs/ {print $$2}' /proc/self/status)" >> $(R)
    network:
    \t@python3 -c 'import socket; socket.create_connection(("$(HOST)", $(PORT)), timeout=3).sendall(b"x")' \\
    \t  2>/dev/null && echo "network succeeded" >> $(R) || echo "network refused" >> $(R)
    forks:
    \t@echo "forks $$(python3 $(CURDIR)/forks.py $(FORKS))" >> $(R)
    memory:
    \t@python3 -c 'b = bytearray($(BYTES)); b[::4096] = b"x" * len(b[::4096])' 2>/dev/null \\
    \t  && echo "memory succeeded" >> $(R) || echo "memory refused" >> $(R)
    hang:
    \t@hostname > $(O)/container; sleep 600
    quick:
    \t@echo "quick done" >> $(R)
    ccache-reach:
    \t@python3 $(CURDIR)/storage.py GET healthz 2>/dev/null && echo "ccache-reach succeeded" >> $(R) \\
    \t  || echo "ccache-reach refused" >> $(R)
    ccache-write:
    \t@python3 $(CURDIR)/storage.py PUT ccache/0123456789abcdefghijklmnopqrstuv0 2>/dev/null \\
    \t  && echo "ccache-write succeeded" >> $(R) || echo "ccache-write refused" >> $(R)
    """
)
# What patch code can do with the ccache storage the container was given: a request to the service named in
# $CCACHE_REMOTE_STORAGE, with its token; exits non-zero unless the service says 2xx.
STORAGE = textwrap.dedent(
    """\
    import os, sys, urllib.parse, urllib.request
    url, *attributes = os.environ["CCACHE_REMOTE_STORAGE"].split("|")
    tokens = [a.split("=", 1)[1] for a in attributes if a.startswith("bearer-token=")]
    headers = {"Authorization": "Bearer " + tokens[0]} if tokens else {}
    root = urllib.parse.urljoin(url, "/")
    data = b"poisoned object" if sys.argv[1] == "PUT" else None
    request = urllib.request.Request(root + sys.argv[2], data=data, method=sys.argv[1], headers=headers)
    urllib.request.urlopen(request, timeout=10)
    """
)
# Forks up to N children that sleep; prints how many it got, then kills them.
FORKS = textwrap.dedent(
    """\
    import os, sys, time
    kids = []
    for _ in range(int(sys.argv[1])):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        kids.append(pid)
    print(len(kids))
    for kid in kids:
        os.kill(kid, 9)
    """
)


@pytest.fixture(scope="module")
def image() -> str:
    return images.ensure_builder_image()


@pytest.fixture
def env(tmp_path: Path, image: str) -> builder.BuildEnv:
    src = tmp_path / "src"
    src.mkdir()
    (src / "Makefile").write_text(MAKEFILE)
    (src / "forks.py").write_text(FORKS)
    (src / "storage.py").write_text(STORAGE)
    return builder.BuildEnv(
        image=image,
        src=src,
        out=tmp_path / "out",
        ccache_dir=tmp_path / "ccache",
        jobs=1,
        timestamp="Thu Jan  1 00:00:00 UTC 2024",
        use_ccache=False,
    )


def _attack(env: builder.BuildEnv, target: str, *extra: str) -> dict[str, str]:
    env.out.mkdir(parents=True, exist_ok=True)
    builder.run_make(env, target, title=f"attack {target}", extra=extra)
    results = {}
    for line in (env.out / "attacks").read_text().splitlines():
        name, _, outcome = line.partition(" ")
        results[name] = outcome
    return results


def test_a_makefile_cannot_write_into_the_source_tree(env: builder.BuildEnv) -> None:
    assert _attack(env, "srctree-write")["srctree-write"] == "refused"
    assert not (env.src / "pwned").exists()


def test_a_makefile_does_not_run_as_root(env: builder.BuildEnv) -> None:
    uid, _, gid = _attack(env, "uid")["uid"].partition(":")
    assert uid != "0" and gid != "0"
    assert (int(uid), int(gid)) == builder.build_user()


def test_a_makefile_has_no_capabilities_and_cannot_gain_privileges(env: builder.BuildEnv) -> None:
    results = _attack(env, "caps")
    assert int(results["capeff"], 16) == 0
    assert results["nonewprivs"] == "1"  # a setuid binary in the image would not raise it either


@pytest.fixture
def listener() -> Iterator[tuple[str, int, list[bytes]]]:
    """A TCP service on every host address: what a build that had any network could reach."""
    received: list[bytes] = []
    server = socket.create_server(("0.0.0.0", 0))
    server.settimeout(0.5)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                received.append(conn.recv(16))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    # The host's address on the default docker bridge (docker0), where a container with a network finds it.
    addr = subprocess.run(["ip", "-4", "-o", "addr", "show", "docker0"], capture_output=True, text=True)
    gateway = addr.stdout.split()[3].split("/")[0]
    yield gateway, server.getsockname()[1], received
    stop.set()
    thread.join()
    server.close()


def test_a_makefile_cannot_reach_the_host(
    env: builder.BuildEnv, listener: tuple[str, int, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CCACHE_REMOTE_STORAGE", raising=False)
    host, port, received = listener
    results = _attack(env, "network", f"HOST={host}", f"PORT={port}")
    assert results["network"] == "refused"
    assert received == []
    # Control: the same connection from a container that has a network does arrive (the attack is real).
    connect = f"import socket; socket.create_connection(('{host}', {port}), timeout=3).sendall(b'x')"
    proc.run(["docker", "run", "--rm", "--network", "bridge", env.image, "python3", "-c", connect])
    deadline = time.monotonic() + 5
    while not received and time.monotonic() < deadline:
        time.sleep(0.1)
    assert received == [b"x"]


def test_with_a_shared_ccache_a_makefile_still_cannot_reach_host_services(
    env: builder.BuildEnv,
    listener: tuple[str, int, list[bytes]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shared ccache configured (as `--cache-url` does) must not give the build the host's network: neither
    its loopback nor its address on the Docker bridge, only the cache service, through the relay."""
    gateway, port, received = listener
    with server_process(tmp_path / "server", "--read-token", READ_TOKEN) as server:
        storage = f"{server.url}/ccache/|bearer-token={READ_TOKEN}"
        shared = dataclasses.replace(env, use_ccache=True, ccache_remote=storage)
        for host in ("127.0.0.1", gateway):
            assert _attack(shared, "network", f"HOST={host}", f"PORT={port}")["network"] == "refused", host
        service_port = server.url.rsplit(":", 1)[1]  # the service itself, other than through the relay
        assert _attack(shared, "network", "HOST=127.0.0.1", f"PORT={service_port}")["network"] == "refused"
        # Control: the storage the build was given does work (through the relay, to the service only).
        assert _attack(shared, "ccache-reach")["ccache-reach"] == "succeeded"
    assert received == []


def test_with_a_shared_ccache_a_makefile_cannot_write_ccache_objects(
    env: builder.BuildEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The credential the container gets (Settings.ccache_remote, as the CLI reads it and passes it down) is
    read-only unless the user says the series is trusted: patch code cannot poison the shared ccache."""
    monkeypatch.delenv("CCACHE_REMOTE_STORAGE", raising=False)
    monkeypatch.setenv("KERNEL_CI_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("KERNEL_CI_CACHE_TOKEN", TOKEN)
    monkeypatch.setenv("KERNEL_CI_CACHE_READ_TOKEN", READ_TOKEN)
    with server_process(tmp_path / "server", "--read-token", READ_TOKEN) as server:
        remote = Settings.load(server.url).ccache_remote
        shared = dataclasses.replace(env, use_ccache=True, ccache_remote=remote)
        assert _attack(shared, "ccache-reach")["ccache-reach"] == "succeeded"  # it may read
        assert _attack(shared, "ccache-write")["ccache-write"] == "refused"
        assert httpx.get(f"{server.url}/healthz").json()["ccache"] == 0
        # Control: with the explicit opt-in the same write arrives (the attack is real).
        remote = Settings.load(server.url, trusted_ccache_writes=True).ccache_remote
        shared = dataclasses.replace(env, use_ccache=True, ccache_remote=remote)
        assert _attack(shared, "ccache-write")["ccache-write"] == "succeeded"
        assert httpx.get(f"{server.url}/healthz").json()["ccache"] == 1


def test_a_fork_bomb_is_bounded(env: builder.BuildEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder, "PIDS_LIMIT", "200", raising=False)
    processes = int(_attack(env, "forks", "FORKS=600")["forks"])
    assert processes <= 200


def test_an_allocation_bomb_is_bounded(env: builder.BuildEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder, "MEMORY_LIMIT", "256m", raising=False)
    assert _attack(env, "memory", f"BYTES={768 * 2**20}")["memory"] == "refused"


def _container_exists(container: str) -> bool:
    found = subprocess.run(["docker", "ps", "-a", "-q", "--no-trunc"], capture_output=True, text=True)
    return any(line.startswith(container) for line in found.stdout.split())


CHILD = """
import json, sys
from pathlib import Path
from kernel_ci.build import kbuild as builder
spec = json.loads(sys.argv[1])
env = builder.BuildEnv(image=spec["image"], src=Path(spec["src"]), out=Path(spec["out"]),
                       ccache_dir=Path(spec["ccache"]), jobs=1, timestamp="x", use_ccache=False)
builder.run_make(env, "hang", title="hang")
"""


def test_sigkill_of_kernel_ci_mid_build_leaves_no_container_and_a_rerun_builds(env: builder.BuildEnv) -> None:
    env.out.mkdir(parents=True)
    spec = {"image": env.image, "src": str(env.src), "out": str(env.out), "ccache": str(env.ccache_dir)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)])
    marker = env.out / "container"
    try:
        deadline = time.monotonic() + 120
        while not (marker.exists() and marker.read_text().strip()):
            assert child.poll() is None, "the build ended before it was killed"
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.2)
        container = marker.read_text().strip()
        assert _container_exists(container)
        child.kill()  # SIGKILL: no handler of kernel-ci runs
        child.wait()
        deadline = time.monotonic() + 15
        while _container_exists(container) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _container_exists(container), "the build container outlived kernel-ci"
    finally:
        child.kill()
        child.wait()
        if marker.exists():
            subprocess.run(["docker", "rm", "-f", marker.read_text().strip()], capture_output=True)
    assert _attack(env, "quick")["quick"] == "done"


def test_a_stale_container_of_the_same_name_does_not_block_the_next_build(env: builder.BuildEnv) -> None:
    name = builder.container_name(env)
    proc.run(["docker", "run", "-d", "--name", name, "--network", "none", env.image, "sleep", "600"])
    try:
        assert _attack(env, "quick")["quick"] == "done"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    assert os.path.exists(env.out / "attacks")
