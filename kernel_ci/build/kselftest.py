"""The kernel's own selftests (tools/testing/selftests/<target>), built from the tree of the kernel.

During `kernel-ci build`, when suites ask for them, the selftests Makefile runs in the builder container
against the patched source tree (read-only) with the kernel's object tree as its output: `headers_install`
puts the uapi headers of that very tree into `<out>/kselftest/usr/include` (used before the toolchain's
own), every target is compiled and linked statically (`LDFLAGS=-static`: the binaries run whatever libc
the guest has) and installed with kselftest's runner (`run_kselftest.sh`, `kselftest/runner.sh`,
`kselftest-list.txt`). That install tree becomes `kselftest/` in the build's outputs and cache entry,
one folder per target: `kselftest/<target>/<binary>`.

Reuse: an incremental kernel build (an edit in kernel/ptrace.c) used to run the selftests make again, 1-9
s of container start, headers_install and make walking every target, for binaries that could not have
changed. The install is now kept beside the other reused outputs (build_selftests' reuse folder) under a key
of everything that can change it (reuse_key): the builder image (compiler, libc linked in statically),
the targets and the whole make command line, the kernel's .config, and every file of the source that the
selftests make reads or could read (SOURCE_INPUTS: all of tools/, the uapi and internal headers, arch/x86,
scripts/, usr/, lib/, the top Makefile and Kbuild, the android staging uapi; more than any target needs,
so a file we did not think of still changes the key). The key is content, never a time stamp; on a match
the kept install is copied to the outputs and checked like a fresh one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

from kernel_ci.build import kbuild as builder
from kernel_ci.core import proc
from kernel_ci.core.errors import BuildError
from kernel_ci.core.files import is_kept, keep_folder

SELFTESTS = f"{builder.SRC}/tools/testing/selftests"
BUILD_DIR = "kselftest"  # under the object tree: selftests objects and installed headers
INSTALL_DIR = "kselftest_install"  # under the object tree, copied to dest afterwards
RUNNER_FILES = ("run_kselftest.sh", "kselftest-list.txt", "kselftest")
_PT_INTERP = 3
# What the selftests make reads from the source tree, generously (see the module docstring): the targets'
# own sources and tools/include, tools/arch, tools/lib...; the uapi headers headers_install exports and
# the internal headers some targets include; arch/x86 (its uapi, the syscall tables, the Makefiles);
# scripts/ (headers_install.sh, unifdef, Kbuild.include); usr/ (the headers' Makefile); lib/ (a test's
# uapi header lives there); the top Makefile and Kbuild; the android target's uapi in staging.
SOURCE_INPUTS = (
    "Makefile",
    "Kbuild",
    "tools",
    "include",
    "arch/x86",
    "scripts",
    "usr",
    "lib",
    "drivers/staging/android",
)
REUSE_SCHEMA = "1"
REUSE_KEPT = 4


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


def build_selftests(
    env: builder.BuildEnv, targets: Sequence[str], dest: Path, *, reuse: Path | None = None
) -> dict[str, list[Path]]:
    """Build and install the targets from env.src into env.out, then copy the install tree to dest; with
    reuse, an install kept there under the same reuse_key is copied instead (no container runs), and a
    fresh one is kept there.

    Returns target -> its installed files (under dest/<target>/). Raises KselftestError if a target
    installed nothing or a binary is dynamically linked.
    """
    targets = normalize_targets(targets)
    if not targets:
        return {}
    missing = [t for t in targets if not (env.src / "tools/testing/selftests" / t / "Makefile").is_file()]
    if missing:
        raise KselftestError(f"no tools/testing/selftests/{{{','.join(missing)}}}/Makefile in {env.src}")
    stored = reuse / reuse_key(env, targets) if reuse is not None else None
    if stored is not None and is_kept(stored):
        try:
            os.utime(stored)  # recently used, for pruning
            _copy_install(stored / "install", dest)
            return _check_install(targets, dest)
        except OSError:  # pruned by a concurrent build meanwhile: build after all
            pass
    install = env.out / INSTALL_DIR
    if install.exists():
        shutil.rmtree(install)  # a target of an earlier build must not ride along
    try:
        builder.run_container(env, make_argv(env, targets), quiet=True)
    except proc.CommandError as exc:
        if not builder.make_failed(exc):
            raise  # Docker's own failure: infrastructure
        raise KselftestError(f"selftests {', '.join(targets)} do not build: {exc}") from exc
    _copy_install(install, dest)
    built = _check_install(targets, dest)
    if stored is not None:
        _store(dest, stored)
    return built


def _copy_install(install: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(install, dest, symlinks=True)


def _check_install(targets: Sequence[str], dest: Path) -> dict[str, list[Path]]:
    """target -> its installed files under dest/<target>/, each non-empty and static; the runner there."""
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


def reuse_key(env: builder.BuildEnv, targets: Sequence[str]) -> str:
    """Everything the install is a function of (the module docstring says why each): the image, the make
    command line (less -j), the object tree's .config, every file under SOURCE_INPUTS of env.src."""
    config = env.out / ".config"
    document = {
        "schema": REUSE_SCHEMA,
        "image": env.image,
        "make": [arg for arg in make_argv(env, normalize_targets(targets)) if not arg.startswith("-j")],
        "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "source": env.source_digests.digest(f"kselftest {REUSE_SCHEMA}", lambda: SOURCE_INPUTS),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _store(dest: Path, stored: Path) -> None:
    """Keep a checked install under its reuse key (written whole, then marked complete; the oldest pruned)."""
    keep_folder(stored, lambda staging: shutil.copytree(dest, staging / "install", symlinks=True), REUSE_KEPT)


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
