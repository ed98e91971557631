"""End to end: a real kernel built in the builder container, twice, bit for bit; then a build cache hit."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernel_ci.build import kbuild
from kernel_ci.cache.store import LocalStore
from kernel_ci.core.paths import cache_dir
from kernel_ci.flow.build import BuildRequest, BuildResult, build, dry_run

pytestmark = pytest.mark.slow


def _digests(output: Path) -> dict[str, str]:
    files = [output / "bzImage", *sorted((output / "modules").rglob("*.ko"))]
    return {str(f.relative_to(output)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def first_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalStore, BuildResult]:
    """The CI kernel built from an empty object tree into a build cache of its own."""
    where = tmp_path_factory.mktemp("first-build")
    store = LocalStore(where / "store-a")
    return store, build(BuildRequest(output=where / "a", fresh=True), store=store)


def test_two_fresh_builds_are_bit_identical_and_the_third_is_a_cache_hit(
    tmp_path: Path, first_build: tuple[LocalStore, BuildResult]
) -> None:
    first_store, first = first_build
    second = build(BuildRequest(output=tmp_path / "b", fresh=True), store=LocalStore(tmp_path / "store-b"))

    assert not first.cache_hit and not second.cache_hit
    assert first.key == second.key
    first_files, second_files = _digests(first.output), _digests(second.output)
    assert any(name.endswith(".ko") for name in first_files), "the CI config must build at least one module"
    assert first_files == second_files

    meta = first.metadata
    assert meta.kernel.version == "5.10.223"  # the nearest reachable to the course's 5.10.224
    assert meta.kernel.release == "5.10.223-kci"
    assert "ci-smoke/0001-proc-add-proc-ci-smoke.patch" in meta.patches
    assert meta.inputs["config:CONFIG_CI_SMOKE"] == "y"
    assert meta.reproduce.startswith("kernel-ci build --kernel 5.10.223")
    assert (first.output / "patches" / "ci-smoke.mbox").read_text().startswith("From ")
    assert json.loads((first.output / "metadata.json").read_text())["build_key"] == first.key
    assert (first.output / "kbuild" / "Module.symvers").exists()

    hit = build(BuildRequest(output=tmp_path / "c"), store=first_store)
    assert hit.cache_hit and hit.key == first.key
    assert _digests(hit.output) == first_files


def test_a_dry_run_says_restore_or_compile_and_names_a_changed_config_symbol(
    tmp_path: Path, first_build: tuple[LocalStore, BuildResult]
) -> None:
    store, first = first_build
    same = dry_run(BuildRequest(output=tmp_path / "same"), store)
    assert same.cached and same.key == first.key
    fragment = tmp_path / "no-ikconfig.config"
    fragment.write_text("# CONFIG_IKCONFIG_PROC is not set\n")

    changed = dry_run(BuildRequest(output=tmp_path / "changed", fragments=[fragment]), store)

    assert not changed.cached and changed.key != first.key
    assert "CONFIG_IKCONFIG_PROC" in changed.why and first.key[:12] in changed.why  # the nearest, and why
    assert not (tmp_path / "same").exists() and not (tmp_path / "changed").exists()  # nothing restored


BUILD_CHILD = """
import sys
from pathlib import Path
from kernel_ci.flow.build import BuildRequest, build
build(BuildRequest(output=Path(sys.argv[1]), use_cache=False, fresh=True))
"""


def _build_containers() -> dict[str, str]:
    listing = subprocess.run(
        ["docker", "ps", "-a", "--no-trunc", "--format", "{{.Names}}\t{{.Command}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = dict(line.split("\t", 1) for line in listing.splitlines() if line.startswith("kci-build-"))
    return names


def test_sigkill_mid_build_leaves_no_container_and_the_rerun_builds(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", BUILD_CHILD, str(tmp_path / "killed")])
    try:
        deadline = time.monotonic() + 600
        name = None
        while name is None:
            assert child.poll() is None, "the build ended before it was killed"
            assert time.monotonic() < deadline, "kbuild never started"
            name = next((n for n, cmd in _build_containers().items() if "bzImage" in cmd), None)
            time.sleep(0.5)
        time.sleep(20)  # well into the compile
        assert name in _build_containers()
        child.kill()  # SIGKILL: kernel-ci runs no handler
        child.wait()
        deadline = time.monotonic() + 15
        while name in _build_containers() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert name not in _build_containers(), "the build container outlived kernel-ci"
    finally:
        child.kill()
        child.wait()
    # The rerun resumes in the object tree the killed build left (half-written objects included). What a
    # kill can leave at worst is planted too: a .o.cmd cut mid-write (5.10's fixdep writes it in place),
    # which stopped every later make ("unterminated variable reference") until kernel-ci discarded what an
    # interrupted build wrote.
    (tree,) = {p.parent for p in Path(cache_dir("work")).glob(f"*/out-*/{kbuild.RUNNING_MARK}")}
    since = (tree / kbuild.RUNNING_MARK).stat().st_mtime_ns
    written = [p for p in tree.rglob(".*.o.cmd") if p.stat().st_mtime_ns >= since]
    assert written, "the killed build wrote no object"
    with written[0].open("r+b") as cut:
        cut.truncate(max(1, written[0].stat().st_size // 2))
    rerun = build(BuildRequest(output=tmp_path / "rerun", use_cache=False))
    assert not rerun.cache_hit and rerun.bzimage.stat().st_size > 1_000_000
    assert not (tree / kbuild.RUNNING_MARK).exists()


CONCURRENT_CHILD = """
import json, sys
from pathlib import Path
from kernel_ci.flow.build import BuildRequest, build
result = build(BuildRequest(output=Path(sys.argv[1]), ccache_dir=Path(sys.argv[2])))
print(json.dumps({"key": result.key, "cache_hit": result.cache_hit}))
"""


def test_two_concurrent_builds_on_a_cold_work_dir_build_once(tmp_path: Path) -> None:
    shared_downloads, shared_ccache = cache_dir("downloads"), cache_dir("ccache")
    # A cold cache (no unpacked source, no patched tree, no object tree, empty build store); only the
    # downloaded tarball and the compiler cache are shared, so that the test costs one warm build.
    cold = tmp_path / "cache"
    cold.mkdir()
    (cold / "downloads").symlink_to(shared_downloads)
    env = {**os.environ, "KERNEL_CI_CACHE": str(cold)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_CHILD, str(tmp_path / f"out-{i}"), str(shared_ccache)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [child.communicate(timeout=1800)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0]
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert results[0]["key"] == results[1]["key"]
    assert sorted(r["cache_hit"] for r in results) == [False, True]  # built once, restored once
    assert len(list((cold / "sources").glob("*/.complete"))) == 1
