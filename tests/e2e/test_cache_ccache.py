"""ccache 4.7 itself against `kernel-ci cache serve` on 127.0.0.1: remote hits after a wiped local cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kernel_ci.core import proc
from tests.cacheservice import TOKEN, Running, server_process

pytestmark = pytest.mark.slow

SOURCES = 8


def make_project(root: Path) -> list[Path]:
    root.mkdir()
    (root / "common.h").write_text("int helper(int);\n#define SCALE 3\n")
    files = []
    for index in range(SOURCES):
        path = root / f"unit{index}.c"
        path.write_text(
            f'#include "common.h"\nint f{index}(int x) {{ int s = 0; for (int i = 0; i < x; i++) '
            f"s += i * SCALE + {index}; return s; }}\n"
        )
        files.append(path)
    return files


def compile_all(files: list[Path], ccache_dir: Path, remote: str) -> dict[str, int]:
    env = {"CCACHE_DIR": str(ccache_dir), "CCACHE_REMOTE_STORAGE": remote, "CCACHE_CONFIGPATH": "/dev/null"}
    for source in files:
        proc.run(["ccache", "gcc", "-O2", "-c", source, "-o", source.with_suffix(".o")], env=env, quiet=True)
    text = proc.capture(["env", f"CCACHE_DIR={ccache_dir}", "ccache", "--print-stats"])
    return {
        name: int(value) for name, _, value in (line.partition("\t") for line in text.splitlines()) if value
    }


def ccache_version() -> str:
    return proc.capture(["ccache", "--version"]).splitlines()[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    if shutil.which("ccache") is None:
        pytest.fail("ccache is not installed (apt-get install ccache): .ci/services.sh installs it")
    data = tmp_path_factory.mktemp("cache") / "data"
    with server_process(data) as running:
        yield running


@pytest.mark.parametrize(
    "layout",
    ["bearer-subdirs", "basic-flat"],
)
def test_ccache_gets_remote_hits_after_its_local_cache_is_wiped(
    server: Running, tmp_path: Path, layout: str
) -> None:
    host = server.url.removeprefix("http://")
    remote = {
        # what kernel_ci.cache.remote configures: the token in ccache's bearer-token attribute, default layout
        "bearer-subdirs": f"http://{host}/ccache/|bearer-token={TOKEN}",
        # the other way ccache authenticates: user:password in the URL (sent as Basic auth)
        "basic-flat": f"http://ccache:{TOKEN}@{host}/ccache/|layout=flat",
    }[layout]
    files = make_project(tmp_path / "project")
    first = compile_all(files, tmp_path / "ccache-1", remote)
    assert first.get("cache_miss", 0) == SOURCES, first
    assert first.get("remote_storage_error", 0) == 0, first
    for obj in (tmp_path / "project").glob("*.o"):
        obj.unlink()
    shutil.rmtree(tmp_path / "ccache-1")  # a fresh machine: an empty local cache

    second = compile_all(files, tmp_path / "ccache-2", remote)
    assert second.get("remote_storage_hit", 0) >= SOURCES, (ccache_version(), second)
    assert second.get("cache_miss", 0) == 0, second
    assert all(f.with_suffix(".o").is_file() for f in files)


def test_ccache_without_the_token_cannot_write(server: Running, tmp_path: Path) -> None:
    host = server.url.removeprefix("http://")
    files = make_project(tmp_path / "other")
    for path in files:  # other sources than the test above: nothing of theirs is on the server yet
        path.write_text(path.read_text() + "int unauthenticated_variant;\n")
    first = compile_all(files, tmp_path / "c1", f"http://{host}/ccache/")
    assert first.get("remote_storage_error", 0) >= 1 or first.get("remote_storage_write", 0) == 0, first
    second = compile_all(files, tmp_path / "c2", f"http://{host}/ccache/")
    assert second.get("remote_storage_hit", 0) == 0, second  # the writes were refused
    assert second.get("cache_miss", 0) == SOURCES
