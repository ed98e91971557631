"""build.artifacts.compressing_vmlinux: vmlinux.xz made in a thread beside the collecting, whole or not."""

from __future__ import annotations

import lzma
import os
from pathlib import Path

import pytest

from kernel_ci.build.artifacts import compressing_vmlinux


def _vmlinux(tmp_path: Path, size: int = 3 << 20) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF" + os.urandom(size // 2) + bytes(size // 2))
    return path


def test_the_block_runs_while_it_compresses_and_its_end_has_the_file(tmp_path: Path) -> None:
    vmlinux, target = _vmlinux(tmp_path), tmp_path / "staging" / "vmlinux.xz"
    target.parent.mkdir()
    with compressing_vmlinux(vmlinux, target) as compression:
        (target.parent / "bzImage").write_bytes(b"beside it")  # the collecting goes on meanwhile
    assert lzma.decompress(target.read_bytes()) == vmlinux.read_bytes()
    with lzma.open(target) as packed:  # xz with a CRC32 check, what decode_stacktrace's unpacking expects
        assert packed.read(4) == b"\x7fELF"
    assert compression.seconds > 0 and compression.waited >= 0
    assert sorted(p.name for p in target.parent.iterdir()) == ["bzImage", "vmlinux.xz"]


def test_a_failing_block_leaves_no_file_half_written(tmp_path: Path) -> None:
    vmlinux, target = _vmlinux(tmp_path, 64 << 20), tmp_path / "vmlinux.xz"
    with pytest.raises(RuntimeError, match="collect failed"), compressing_vmlinux(vmlinux, target):
        raise RuntimeError("collect failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vmlinux"]  # neither the file nor its .partial


def test_a_missing_vmlinux_fails_at_the_end_of_the_block(tmp_path: Path) -> None:
    target = tmp_path / "vmlinux.xz"
    with pytest.raises(FileNotFoundError), compressing_vmlinux(tmp_path / "vmlinux", target):
        pass
    assert not target.exists()
