"""The guest suites' C binaries, cached by content so an unchanged suite is not compiled again.

Compiling one suite means starting a toolchain container (2-4 s each under load, four C suites): most of a
warm `kernel-ci test`'s host time before the boot. The key is everything the binary is made of: the
compiler's identity (the toolchain image id, which changes with any package in it), the flags, and each
source file's name and bytes; a change to any of them compiles afresh. An entry is written to a temporary
name and renamed into place, so an interrupted compile leaves no half entry, and a concurrent run that
computes the same key just takes whichever rename lands (the bytes are the same).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

KEY_SCHEMA = "kci-guest-binary-1"

# compile_c(src_dir, c_files, out_binary), as kernel_ci.guest.payload.CompileC
CompileC = Callable[[Path, list[str], Path], None]


def binary_key(toolchain_id: str, flags: Sequence[str], src_dir: Path, c_files: Sequence[str]) -> str:
    """sha256 over the toolchain id, the flags and each source's name and content (length-prefixed, so
    no two different inputs can concatenate to the same bytes)."""
    digest = hashlib.sha256()
    parts = [KEY_SCHEMA.encode(), toolchain_id.encode(), *(f.encode() for f in flags)]
    for name in c_files:
        parts += [name.encode(), (src_dir / name).read_bytes()]
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def cached_compiler(compile_c: CompileC, toolchain_id: str, flags: Sequence[str], cache: Path) -> CompileC:
    """compile_c behind the cache in `cache`. The headers next to each source (the suite's own *.h, and
    lib/ktap.h next to lib/ktap.c) are part of the key too: a changed header changes the binary."""

    def compile_cached(src_dir: Path, c_files: list[str], out_binary: Path) -> None:
        keyed = list(c_files) + _headers(src_dir, c_files)
        entry = cache / binary_key(toolchain_id, flags, src_dir, keyed)
        if not entry.is_file():
            _fill(compile_c, src_dir, c_files, out_binary.name, entry)
        if entry.is_file():  # else the payload reports "the C compiler produced no binary"
            shutil.copyfile(entry, out_binary)

    return compile_cached


def _headers(src_dir: Path, c_files: Sequence[str]) -> list[str]:
    """The header files in each source's folder."""
    found: set[str] = set()
    for name in c_files:
        folder = (src_dir / name).parent
        found.update(p.relative_to(src_dir).as_posix() for p in folder.glob("*.h"))
    return sorted(found - set(c_files))


def _fill(compile_c: CompileC, src_dir: Path, c_files: list[str], name: str, entry: Path) -> None:
    """Compile into a private temporary folder, then rename the binary to its key."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=".tmp-") as tmp:
        built = Path(tmp) / name
        compile_c(src_dir, c_files, built)
        if built.is_file():
            os.replace(built, entry)
