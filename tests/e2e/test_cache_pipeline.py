"""The shared cache through kernel_ci.flow.build: one machine builds and pushes, another restores; and the
builder container reaching the service's ccache storage through the relay (it has no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import httpx
import pytest

from kernel_ci.build import ccacherelay, images
from kernel_ci.build import kbuild as builder
from kernel_ci.cache.remote import CacheClient, RemoteConfig, RemoteStore
from kernel_ci.cache.store import LocalStore
from kernel_ci.core.settings import Settings
from kernel_ci.flow.build import BuildRequest, build
from tests.cacheservice import READ_TOKEN, TOKEN, server_process

pytestmark = pytest.mark.slow


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_build_pushed_by_one_machine_is_restored_by_another(tmp_path: Path) -> None:
    with server_process(tmp_path / "server") as server:
        pusher = RemoteStore(LocalStore(tmp_path / "machine-a"), CacheClient(RemoteConfig(server.url, TOKEN)))
        first = build(BuildRequest(output=tmp_path / "out-a"), store=pusher)
        assert not first.cache_hit  # machine A's local store was empty: it built (incrementally) and pushed
        listing = httpx.get(f"{server.url}/api/v1/builds").json()
        assert [b["key"] for b in listing["builds"]] == [first.key]
        assert listing["builds"][0]["kernel_version"] == first.metadata.kernel.version

        reader = RemoteStore(LocalStore(tmp_path / "machine-b"), CacheClient(RemoteConfig(server.url)))
        second = build(BuildRequest(output=tmp_path / "out-b"), store=reader)
        assert second.key == first.key, "the inputs (kernel-patches/, kconfig/) changed during the test"
        assert second.cache_hit
        assert _sha(second.bzimage) == _sha(first.bzimage)
        for name in ("config", "System.map", "metadata.json"):
            assert _sha(second.output / name) == _sha(first.output / name)
        kbuild_a = sorted(p.relative_to(first.output) for p in (first.output / "kbuild").rglob("*"))
        kbuild_b = sorted(p.relative_to(second.output) for p in (second.output / "kbuild").rglob("*"))
        assert kbuild_a == kbuild_b and len(kbuild_a) > 1000
        assert reader.local.get(first.key) is not None  # now cached on machine B too
        assert json.loads((second.output / "metadata.json").read_text())["build_key"] == first.key


def test_the_builder_container_reaches_the_ccache_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = images.ensure_builder_image()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "hello.c").write_text("int answer(void) { return 42; }\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "ccache").mkdir()
    with server_process(tmp_path / "server") as server:
        storage = f"{server.url}/ccache/|bearer-token={TOKEN}"
        env = builder.BuildEnv(
            image=image,
            src=tmp_path / "src",
            out=tmp_path / "out",
            ccache_dir=tmp_path / "ccache",
            jobs=1,
            timestamp="Thu Jan  1 00:00:00 UTC 2024",
            ccache_remote=storage,
        )
        compile_hello = ["ccache", "gcc", "-c", f"{builder.SRC}/hello.c", "-o", f"{builder.OUT}/hello.o"]
        with ccacherelay.forwarding(builder.remote_storage(env)) as forwarder:
            assert forwarder is not None
            argv = builder.docker_run_argv(env, compile_hello, forwarder=forwarder)
        # No network at all: the relay's socket is the only way to the service (kernel_ci.build.ccacherelay).
        assert argv[argv.index("--network") + 1] == "none" and "host" not in argv
        assert "CCACHE_REMOTE_STORAGE" in argv and storage not in " ".join(argv)  # the token is not logged
        assert storage not in repr(env)
        builder.run_container(env, compile_hello)
        assert (tmp_path / "out" / "hello.o").is_file()
        assert httpx.get(f"{server.url}/healthz").json()["ccache"] >= 1  # the object went to the service

        env = dataclasses.replace(env, ccache_remote=None)
        offline = builder.docker_run_argv(env, ["true"])
        assert offline[offline.index("--network") + 1] == "none" and "CCACHE_REMOTE_STORAGE" not in offline
    assert os.environ.get("CCACHE_REMOTE_STORAGE") is None


SOURCES = 60
FANOUT_MAKEFILE = (
    "OBJS := $(patsubst %.c,$(O)/%.o,$(notdir $(wildcard $(CURDIR)/*.c)))\n"
    "all: $(OBJS)\n"
    "$(O)/%.o: $(CURDIR)/%.c\n"
    "\t$(CC) -O2 -c $< -o $@\n"
)


def test_a_read_only_builder_gets_remote_ccache_hits_through_the_relay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Machine A (trusted writes) fills the shared ccache; machine B, with an empty local ccache and the
    read-only credential the CLI gives by default, compiles the same files as remote hits, through the relay
    (one connection per object), and writes nothing."""
    image = images.ensure_builder_image()
    src = tmp_path / "src"
    src.mkdir()
    (src / "Makefile").write_text(FANOUT_MAKEFILE)
    for index in range(SOURCES):
        (src / f"f{index}.c").write_text(f"int f{index}(int x) {{ return x * {index} + {index % 7}; }}\n")

    def machine(name: str, settings: Settings) -> builder.BuildEnv:
        (tmp_path / f"out-{name}").mkdir()
        return builder.BuildEnv(
            image=image,
            src=src,
            out=tmp_path / f"out-{name}",
            ccache_dir=tmp_path / f"ccache-{name}",
            jobs=4,
            timestamp="Thu Jan  1 00:00:00 UTC 2024",
            ccache_remote=settings.ccache_remote,
        )

    environ = {
        "KERNEL_CI_CONFIG": str(tmp_path / "no-config.toml"),
        "KERNEL_CI_CACHE_TOKEN": TOKEN,
        "KERNEL_CI_CACHE_READ_TOKEN": READ_TOKEN,
    }
    with server_process(tmp_path / "server", "--read-token", READ_TOKEN) as server:
        writer = machine("a", Settings.load(server.url, environ, trusted_ccache_writes=True))
        builder.run_make(writer, "all", title="machine A")
        stored = httpx.get(f"{server.url}/healthz").json()["ccache"]
        assert stored >= SOURCES

        reader_settings = Settings.load(server.url, environ)  # the CLI's default: read token, read-only
        assert (
            reader_settings.ccache_remote == f"{server.url}/ccache/|bearer-token={READ_TOKEN}|read-only=true"
        )
        reader = machine("b", reader_settings)
        seconds, _steps = builder.run_make(reader, "all", title="machine B")
        counters = builder.ccache_counters(reader)
        assert counters["remote_storage_read_hit"] >= SOURCES, counters
        assert counters["remote_storage_error"] == 0 and counters["remote_storage_write"] == 0, counters
        assert httpx.get(f"{server.url}/healthz").json()["ccache"] == stored
        assert len(list((tmp_path / "out-b").glob("*.o"))) == SOURCES
        print(f"{SOURCES} objects as remote hits through the relay in {seconds:.1f} s")
