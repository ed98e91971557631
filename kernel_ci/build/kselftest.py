"""The kernel's own selftests (tools/testing/selftests/<target>), built from the tree of the kernel.

During `kernel-ci build`, when suites ask for them, the selftests Makefile runs in the builder container
against the patched source tree (read-only) with the kernel's object tree as its output: `headers_install`
puts the uapi headers of that very tree into `<out>/kselftest/usr/include` (used before the toolchain's
own), every target is compiled and linked statically (`LDFLAGS=-static`: the binaries run whatever libc
the guest has) and installed with kselftest's runner (`run_kselftest.sh`, `kselftest/runner.sh`,
`kselftest-list.txt`). That install tree becomes `kselftest/` in the build's outputs and cache entry,
one folder per target: `kselftest/<target>/<binary>`.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

from kernel_ci.build import kbuild as builder
from kernel_ci.core import proc
from kernel_ci.core.errors import BuildError

SELFTESTS = f"{builder.SRC}/tools/testing/selftests"
BUILD_DIR = "kselftest"  # under the object tree: selftests objects and installed headers
INSTALL_DIR = "kselftest_install"  # under the object tree, copied to dest afterwards
RUNNER_FILES = ("run_kselftest.sh", "kselftest-list.txt", "kselftest")
_PT_INTERP = 3


class KselftestError(BuildError):
    pass


def normalize_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """Sorted, without repeats: the form that goes into the build key (`flag:kselftest`)."""
    return tuple(sorted(set(targets)))


def make_argv(env: builder.BuildEnv, targets: Sequence[str]) -> list[str]:
    """make for the selftests' `install` (which builds first) with O= the kernel's object tree."""
    argv = [
        "make",
        "-C",
        SELFTESTS,
        f"O={builder.OUT}",
        f"ARCH={builder.ARCH}",
        f"-j{env.jobs}",
        f"TARGETS={' '.join(targets)}",
        "FORCE_TARGETS=1",  # a target that does not build is an error, not a silent skip
        "LDFLAGS=-static",
        f"USERCFLAGS=-isystem {builder.OUT}/{BUILD_DIR}/usr/include",
        f"KSFT_INSTALL_PATH={builder.OUT}/{INSTALL_DIR}",
    ]
    if env.use_ccache:  # the same compilers as the kernel's build: its host tools keep their .cmd lines
        argv += ["CC=ccache gcc", "HOSTCC=ccache gcc"]
    return [*argv, "install"]


def build_selftests(env: builder.BuildEnv, targets: Sequence[str], dest: Path) -> dict[str, list[Path]]:
    """Build and install the targets from env.src into env.out, then copy the install tree to dest.

    Returns target -> its installed files (under dest/<target>/). Raises KselftestError if a target
    installed nothing or a binary is dynamically linked.
    """
    targets = normalize_targets(targets)
    if not targets:
        return {}
    missing = [t for t in targets if not (env.src / "tools/testing/selftests" / t / "Makefile").is_file()]
    if missing:
        raise KselftestError(f"no tools/testing/selftests/{{{','.join(missing)}}}/Makefile in {env.src}")
    install = env.out / INSTALL_DIR
    if install.exists():
        shutil.rmtree(install)  # a target of an earlier build must not ride along
    try:
        builder.run_container(env, make_argv(env, targets), quiet=True)
    except proc.CommandError as exc:
        if not builder.make_failed(exc):
            raise  # Docker's own failure: infrastructure
        raise KselftestError(f"selftests {', '.join(targets)} do not build: {exc}") from exc
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(install, dest, symlinks=True)
    built: dict[str, list[Path]] = {}
    for target in targets:
        files = sorted(p for p in (dest / target).rglob("*") if p.is_file())
        if not files:
            raise KselftestError(f"selftests target {target}: `make install` installed nothing")
        dynamic = [p.name for p in files if is_elf(p) and not is_static_elf(p)]
        if dynamic:
            raise KselftestError(f"selftests target {target}: dynamically linked: {', '.join(dynamic)}")
        built[target] = files
    for name in RUNNER_FILES:
        if not (dest / name).exists():
            raise KselftestError(f"the selftests install has no {name}")
    return built


def is_elf(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == b"\x7fELF"


def is_static_elf(path: Path) -> bool:
    """True for an ELF file without a PT_INTERP program header (no dynamic loader needed)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF":
        raise KselftestError(f"{path}: not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise KselftestError(f"{path}: not a 64-bit little-endian ELF file")
    phoff, phentsize, phnum = struct.unpack_from("<Q", data, 0x20)[0], *struct.unpack_from("<HH", data, 0x36)
    for index in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + index * phentsize)
        if p_type == _PT_INTERP:
            return False
    return True
