"""The shared cache through kernel_ci.flow.build: one machine builds and pushes, another restores; and the
builder container reaching the service's ccache storage over host networking."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import httpx
import pytest

from kernel_ci.build import images
from kernel_ci.build import kbuild as builder
from kernel_ci.cache.remote import CacheClient, RemoteConfig, RemoteStore
from kernel_ci.cache.store import LocalStore
from kernel_ci.core import proc
from kernel_ci.flow.build import BuildRequest, build
from tests.cacheservice import TOKEN, server_process

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
        argv = builder.docker_run_argv(
            env, ["ccache", "gcc", "-c", f"{builder.SRC}/hello.c", "-o", "hello.o"]
        )
        assert argv[argv.index("--network") + 1] == "host"
        assert "CCACHE_REMOTE_STORAGE" in argv and storage not in " ".join(argv)  # the token is not logged
        assert storage not in repr(env)
        for tree in (env.out, env.ccache_dir):  # the container writes as the unprivileged build user
            builder.give_to_build_user(tree)
        proc.run(argv, env=builder.container_env(env))
        assert httpx.get(f"{server.url}/healthz").json()["ccache"] >= 1  # the object went to the service

        env = dataclasses.replace(env, ccache_remote=None)
        offline = builder.docker_run_argv(env, ["true"])
        assert offline[offline.index("--network") + 1] == "none" and "CCACHE_REMOTE_STORAGE" not in offline
    assert os.environ.get("CCACHE_REMOTE_STORAGE") is None
