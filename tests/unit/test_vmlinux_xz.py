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


def test_an_early_start_begins_at_kbuilds_sysmap_line_and_not_before(tmp_path: Path) -> None:
    """With early, compression starts from kbuild's line saying vmlinux is linked (the rest of make goes on
    beside it), not from any other line; the end of the block has the file."""
    vmlinux, target = _vmlinux(tmp_path), tmp_path / "vmlinux.xz"
    with compressing_vmlinux(vmlinux, target, early=True) as compression:
        for line in ["  LD      vmlinux", "  SORTTAB vmlinux", "  CC      kernel/sysmap.o"]:
            compression.on_line(line)
        assert compression._thread is None, "started before vmlinux was final"
        compression.on_line("  SYSMAP  System.map")
        assert compression._thread is not None
    assert lzma.decompress(target.read_bytes()) == vmlinux.read_bytes()
    assert not compression.recompressed


def test_a_vmlinux_written_after_the_early_start_is_compressed_again(tmp_path: Path) -> None:
    """Whatever kbuild does after its SYSMAP line, vmlinux.xz is the vmlinux make left: a write after the
    start (same size, even) is seen and the file made again."""
    vmlinux, target = _vmlinux(tmp_path), tmp_path / "vmlinux.xz"
    with compressing_vmlinux(vmlinux, target, early=True) as compression:
        compression.on_line("  SYSMAP  System.map")
        compression.start().join()
        data = bytearray(vmlinux.read_bytes())
        data[100:104] = b"EDIT"
        with vmlinux.open("r+b") as handle:  # in place, as ld or objcopy would
            handle.write(bytes(data))
    assert compression.recompressed
    assert lzma.decompress(target.read_bytes()) == bytes(data)


def test_an_early_start_without_the_line_starts_at_the_end(tmp_path: Path) -> None:
    """make had nothing to link (an unchanged tree): the block's end compresses the vmlinux there is."""
    vmlinux, target = _vmlinux(tmp_path), tmp_path / "vmlinux.xz"
    with compressing_vmlinux(vmlinux, target, early=True) as compression:
        compression.on_line("make[1]: Nothing to be done for 'bzImage'.")
    assert lzma.decompress(target.read_bytes()) == vmlinux.read_bytes()


def test_a_failing_build_after_an_early_start_leaves_no_vmlinux_xz(tmp_path: Path) -> None:
    vmlinux, target = _vmlinux(tmp_path), tmp_path / "out" / "vmlinux.xz"
    target.parent.mkdir()
    with (
        pytest.raises(RuntimeError, match="modules failed"),
        compressing_vmlinux(vmlinux, target, early=True) as c,
    ):
        c.on_line("  SYSMAP  System.map")
        c.start().join()
        raise RuntimeError("modules failed")
    assert list(target.parent.iterdir()) == []
