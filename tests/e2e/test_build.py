"""End to end: a real kernel built in the builder container, twice, bit for bit; then a build cache hit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ci.buildpipeline import BuildRequest, build
from ci.cachestore import LocalStore

pytestmark = pytest.mark.slow


def _digests(output: Path) -> dict[str, str]:
    files = [output / "bzImage", *sorted((output / "modules").rglob("*.ko"))]
    return {str(f.relative_to(output)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_two_fresh_builds_are_bit_identical_and_the_third_is_a_cache_hit(tmp_path: Path) -> None:
    first_store = LocalStore(tmp_path / "store-a")
    first = build(BuildRequest(output=tmp_path / "a", fresh=True), store=first_store)
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


def test_a_changed_config_symbol_is_named_on_a_miss(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = LocalStore(tmp_path / "store")
    build(BuildRequest(output=tmp_path / "a"), store=store)
    fragment = tmp_path / "no-ikconfig.config"
    fragment.write_text("# CONFIG_IKCONFIG_PROC is not set\n")
    changed = build(BuildRequest(output=tmp_path / "b", fragments=[fragment]), store=store)
    assert not changed.cache_hit
    assert "CONFIG_IKCONFIG_PROC" in capsys.readouterr().err
