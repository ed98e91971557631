"""metadata.json as a typed record: one JSON round trip, and clear errors for files it cannot read."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kernel_ci.build.records import (
    METADATA_SCHEMA,
    BuildMetadata,
    CcacheFigures,
    KernelInfo,
    RecordError,
    ToolchainInfo,
)

KEY = "a9" * 32


def sample() -> BuildMetadata:
    return BuildMetadata(
        schema=METADATA_SCHEMA,
        build_key=KEY,
        request_key="c0" * 32,
        recipe_key="5e" * 32,
        created="2026-12-04T16:13:38+00:00",
        kernel=KernelInfo(
            requested="5.10",
            version="5.10.223",
            release="5.10.223-kci",
            tarball="linux_5.10.223.orig.tar.xz",
            sha256="52" * 32,
            fetched_from="cache:/root/.cache/kernel-ci/downloads/linux_5.10.223.orig.tar.xz",
            fallbacks=("Linux 5.10.224 is not available; falling back to 5.10.223",),
        ),
        series=("ci-smoke",),
        patches=("ci-smoke/0001-proc-add-proc-ci-smoke.patch",),
        fragments=("kconfig/base.config", "suite smoke-c"),
        external_modules={"kci-smoke": ("extmod/kci-smoke/kci_smoke.ko",)},
        kselftests={"ptrace": ("kselftest/ptrace/vmaccess",)},
        toolchain=ToolchainInfo(
            image="kernel-ci/builder:1", image_id="sha256:" + "1" * 64, fingerprint="7d", gcc="gcc 12"
        ),
        kbuild={"KBUILD_BUILD_TIMESTAMP": "Sat Jul 27 08:40:24 UTC 2024", "jobs": 2, "steps": 1360},
        durations={"build": 287.75, "configure": 5.0},
        ccache=CcacheFigures(hits=64, misses=997, hit_rate=0.0603),
        inputs={"source": "linux-5.10.223 sha256:" + "52" * 32, "config:CONFIG_PROC_FS": "y"},
        reproduce="kernel-ci build --kernel 5.10.223 --series ci-smoke",
    )


def test_round_trip_through_the_file(tmp_path: Path) -> None:
    meta = sample()
    meta.write(tmp_path)
    assert BuildMetadata.read(tmp_path) == meta
    for without_ccache in (replace(meta, ccache=None),):
        assert BuildMetadata.from_json(without_ccache.to_json()) == without_ccache


def test_the_json_keeps_the_layout_its_readers_use() -> None:
    """The cache service's list and page, the CI workflow and people read these by name."""
    document = json.loads(sample().to_json())
    assert document["build_key"] == KEY and document["schema"] == METADATA_SCHEMA
    assert document["kernel"]["version"] == "5.10.223" and document["kernel"]["release"] == "5.10.223-kci"
    assert document["ccache"]["hit_rate"] == 0.0603
    assert document["series"] == ["ci-smoke"] and document["fragments"][0] == "kconfig/base.config"
    assert document["toolchain"]["gcc"] == "gcc 12" and document["reproduce"].startswith("kernel-ci build")
    assert document["kbuild"]["KBUILD_BUILD_TIMESTAMP"] == sample().kbuild_timestamp


def _document(**changes: object) -> str:
    document = json.loads(sample().to_json())
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = document
        for parent in parents:
            target = target[parent]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return json.dumps(document)


_DELETE = object()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"recipe_key": _DELETE}, r"metadata.json: not the BuildMetadata .*\(missing recipe_key\)"),
        ({"surprise": 1}, r"not the BuildMetadata .*\(unknown surprise\)"),
        ({"kernel__release": _DELETE}, r"metadata.json: kernel: not the KernelInfo .*missing release"),
        ({"kernel__version": 5}, r"metadata.json: kernel.version: expected a str, got int 5"),
        ({"patches": "ci-smoke/0001.patch"}, r"metadata.json: patches: expected a list"),
        ({"durations__build": "slow"}, r"durations.build: expected a number"),
        ({"kbuild__jobs": True}, r"kbuild.jobs: expected .*str \| int"),
        ({"ccache": [1]}, r"metadata.json: ccache: expected .*CcacheFigures"),
        ({"schema": 1}, r"schema 1, this kernel-ci reads schema 2 .*rebuild with: kernel-ci build --kernel"),
    ],
)
def test_a_file_it_cannot_read_is_a_clear_error(changes: dict[str, object], message: str) -> None:
    with pytest.raises(RecordError, match=message):
        BuildMetadata.from_json(_document(**changes))


def test_not_json_not_an_object_and_no_file(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="not JSON"):
        BuildMetadata.from_json("{")
    with pytest.raises(RecordError, match="expected a JSON object, got list"):
        BuildMetadata.from_json("[]")
    with pytest.raises(RecordError, match=r"metadata.json is missing: .* is not a kernel-ci build output"):
        BuildMetadata.read(tmp_path)


def test_an_old_schema_1_file_names_the_command_that_rebuilds_it() -> None:
    """What every build before this change wrote (a real file's shape, without recipe_key)."""
    old = json.loads(sample().to_json())
    del old["recipe_key"]
    old["schema"] = 1
    with pytest.raises(RecordError, match=r"schema 1, .*rebuild with: kernel-ci build --kernel 5\.10\.223"):
        BuildMetadata.from_json(json.dumps(old), "out/build/metadata.json")
