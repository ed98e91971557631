"""The guest C binary cache: an unchanged suite is not compiled again; any change to what the binary is made
of (a source, a header next to it, the flags, the toolchain) compiles afresh; a failed compile leaves no
entry. Compiled with the host's real gcc, as tests/unit/test_payload.py does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kernel_ci.core import proc
from kernel_ci.core.paths import DEFAULT_SUITES, KTAP_LIB
from kernel_ci.guest.binaries import binary_key, cached_compiler

FLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-Werror")
SOURCES = ["smoke-c/smoke.c", "lib/ktap.c"]


class CountingGcc:
    """The host's gcc -static, counting how often it really ran."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, src_dir: Path, c_files: list[str], out_binary: Path) -> None:
        self.runs += 1
        proc.run(["gcc", *FLAGS, "-o", out_binary, *c_files], cwd=src_dir, quiet=True)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "guest-tests"
    shutil.copytree(DEFAULT_SUITES / "smoke-c", src / "smoke-c")
    shutil.copytree(KTAP_LIB, src / "lib")
    return src


def test_second_compile_of_unchanged_sources_is_a_cache_hit(tree: Path, tmp_path: Path) -> None:
    gcc = CountingGcc()
    compile_c = cached_compiler(gcc, "sha256:tool", FLAGS, tmp_path / "cache")
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    compile_c(tree, SOURCES, tmp_path / "a" / "smoke-c")
    compile_c(tree, SOURCES, tmp_path / "b" / "smoke-c")
    assert gcc.runs == 1
    assert (tmp_path / "a" / "smoke-c").read_bytes() == (tmp_path / "b" / "smoke-c").read_bytes()
    assert (tmp_path / "b" / "smoke-c").read_bytes()[:4] == b"\x7fELF"


def test_a_changed_source_compiles_afresh(tree: Path, tmp_path: Path) -> None:
    gcc = CountingGcc()
    compile_c = cached_compiler(gcc, "sha256:tool", FLAGS, tmp_path / "cache")
    compile_c(tree, SOURCES, tmp_path / "first")
    source = tree / "smoke-c" / "smoke.c"
    source.write_text(source.read_text() + "\n/* edited */\n")
    compile_c(tree, SOURCES, tmp_path / "second")
    assert gcc.runs == 2


def test_a_changed_header_next_to_a_source_compiles_afresh(tree: Path, tmp_path: Path) -> None:
    """lib/ktap.h is no compile argument, but smoke.c includes it: it must be in the key."""
    before = binary_key("t", FLAGS, tree, [*SOURCES, "lib/ktap.h"])
    gcc = CountingGcc()
    compile_c = cached_compiler(gcc, "t", FLAGS, tmp_path / "cache")
    compile_c(tree, SOURCES, tmp_path / "first")
    header = tree / "lib" / "ktap.h"
    header.write_text(header.read_text() + "\n/* edited */\n")
    compile_c(tree, SOURCES, tmp_path / "second")
    assert gcc.runs == 2
    assert binary_key("t", FLAGS, tree, [*SOURCES, "lib/ktap.h"]) != before


def test_flags_and_toolchain_are_in_the_key(tree: Path) -> None:
    key = binary_key("sha256:a", FLAGS, tree, SOURCES)
    assert binary_key("sha256:b", FLAGS, tree, SOURCES) != key
    assert binary_key("sha256:a", (*FLAGS, "-g"), tree, SOURCES) != key
    # length-prefixed parts: moving a byte from one part to the next is another key
    shifted = binary_key("sha256:a", ("-", *FLAGS), tree, SOURCES)
    assert binary_key("sha256:a-", FLAGS, tree, SOURCES) != shifted


def test_a_failed_compile_leaves_no_entry(tree: Path, tmp_path: Path) -> None:
    (tree / "smoke-c" / "smoke.c").write_text("int main(void) { return undeclared; }\n")
    cache = tmp_path / "cache"
    compile_c = cached_compiler(CountingGcc(), "t", FLAGS, cache)
    with pytest.raises(proc.CommandError):
        compile_c(tree, SOURCES, tmp_path / "out")
    assert not [p for p in cache.rglob("*") if p.is_file()]
    assert not (tmp_path / "out").exists()
