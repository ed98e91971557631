"""kernel_ci.build.kbuild without a container: handing trees to the build user."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kernel_ci.build import kbuild
from kernel_ci.core import proc


def test_handing_a_tree_to_the_build_user_survives_files_vanishing_meanwhile(tmp_path: Path) -> None:
    """The ccache dir is shared by concurrent builds: a lock file listed by the walk may be gone before
    its lstat. Seen as a FileNotFoundError that failed a build; now the vanished entry is skipped."""
    gone = tmp_path / "ccache" / "6" / "7" / "stats.lock"
    kbuild._chown_if_needed(os.fspath(gone), os.getuid(), os.getgid())  # absent: no error
    present = tmp_path / "kept"
    present.write_text("")
    kbuild._chown_if_needed(os.fspath(present), os.getuid(), os.getgid())
    assert present.exists()


def test_the_step_script_announces_each_step_and_stops_at_the_first_failure() -> None:
    import subprocess

    steps = [
        kbuild.ScriptStep("one", "echo a"),
        kbuild.ScriptStep("two", "false"),
        kbuild.ScriptStep("x", "echo b"),
    ]
    argv = kbuild.step_script(steps)
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stdout.splitlines() == ["kci-step one", "a", "kci-step two"]


def test_the_step_clock_times_each_step_and_passes_other_lines_on() -> None:
    seen: list[str] = []
    clock = kbuild._StepClock(seen.append)
    for line in ["kci-step ccache_stats", "kci-step make", "  CC kernel/ptrace.o", "kci-step ccache_stats",
                 "kci-step end"]:  # fmt: skip
        clock(line)
    assert seen == ["  CC kernel/ptrace.o"]
    assert set(clock.rounded()) == {"container_start", "ccache_stats", "make"}
    assert clock.current == "end"


def test_builds_use_ccache_depend_mode_without_the_directory_in_the_hash(tmp_path: Path) -> None:
    env = kbuild.BuildEnv("img", tmp_path, tmp_path, tmp_path, 2, "t")
    variables = env.kbuild_vars()
    assert variables["CCACHE_DEPEND"] == "1" and variables["CCACHE_NOHASHDIR"] == "1"
    assert variables["CCACHE_INODECACHE"] == "1"


@pytest.mark.slow
def test_the_builders_ccache_takes_the_settings_it_is_given(tmp_path: Path) -> None:
    """The builder image's own ccache (4.7: inode cache off by default) reads them from the environment."""
    from kernel_ci.build import images

    (tmp_path / "src").mkdir()
    (tmp_path / "ccache").mkdir()
    env = kbuild.BuildEnv(
        images.ensure_builder_image(), tmp_path / "src", tmp_path, tmp_path / "ccache", 2, "t"
    )
    kbuild.give_to_build_user(env.ccache_dir)
    shown = proc.capture(kbuild.docker_run_argv(env, ["ccache", "--show-config"]))
    for setting in (
        "depend_mode = true",
        "inode_cache = true",
        "hash_dir = false",
        "compiler_check = content",
    ):
        assert f"(environment) {setting}" in shown, shown


def _kbuild_trees(tmp_path: Path) -> tuple[Path, Path]:
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "include/linux").mkdir(parents=True)
    (src / "include/linux/a.h").write_text("#define A 1\n")
    (src / "Makefile").write_text("all:\n")
    (out / "include/generated").mkdir(parents=True)
    (out / "include/generated/autoconf.h").write_text("#define CONFIG_X 1\n")
    (out / ".config").write_text("CONFIG_X=y\n")
    return src, out


def test_the_kbuild_export_links_source_files_and_copies_object_files(tmp_path: Path) -> None:
    from kernel_ci.build import artifacts

    src, out = _kbuild_trees(tmp_path)
    artifacts.export_kbuild_tree(src, out, tmp_path / "linked", link_sources=True)
    assert (tmp_path / "linked/include/linux/a.h").stat().st_ino == (src / "include/linux/a.h").stat().st_ino
    # the object tree's files are rewritten in place by kbuild: never shared with an export
    assert (tmp_path / "linked/.config").stat().st_ino != (out / ".config").stat().st_ino
    assert (tmp_path / "linked/include/generated/autoconf.h").read_text() == "#define CONFIG_X 1\n"
    artifacts.export_kbuild_tree(src, out, tmp_path / "copied")
    assert (tmp_path / "copied/include/linux/a.h").stat().st_ino != (src / "include/linux/a.h").stat().st_ino


def test_the_source_pass_beside_make_gives_the_export_of_one_pass(tmp_path: Path) -> None:
    """The flow runs the source pass in a thread while make runs, the outputs pass after it: the export is
    the one export_kbuild_tree makes in one go, an object file over a source file of the same name
    included (the outputs pass replaces it)."""
    from kernel_ci.build import artifacts
    from kernel_ci.core.digest import tree_digest

    src, out = _kbuild_trees(tmp_path)
    (src / "include/generated").mkdir()
    (src / "include/generated/autoconf.h").write_text("stale\n")
    artifacts.export_kbuild_tree(src, out, tmp_path / "one/kbuild", link_sources=True)
    two = tmp_path / "two/kbuild"
    with artifacts.exporting_sources(src, two, link=True) as sources:
        sources.wait()
        artifacts.export_kbuild_tree(src, out, two, link_sources=True, sources_placed=True)
    assert tree_digest(tmp_path / "two/kbuild") == tree_digest(tmp_path / "one/kbuild")
    assert (tmp_path / "two/kbuild/include/generated/autoconf.h").read_text() == "#define CONFIG_X 1\n"


def test_a_failed_source_pass_is_raised_where_it_is_waited_for(tmp_path: Path) -> None:
    from kernel_ci.build import artifacts

    absent = tmp_path / "absent"
    with artifacts.exporting_sources(absent, tmp_path / "k", link=True) as sources, pytest.raises(OSError):
        sources.wait()


def test_a_linked_kbuild_export_holds_no_symlinks(tmp_path: Path) -> None:
    """The kernel's scripts/dummy-tools/nm is a symlink to ld: link(2) does not follow symlinks, so a hard
    link made a symlink in the export, and the cache refused the whole build (UnsafeEntryError)."""
    from kernel_ci.build import artifacts

    src, out = _kbuild_trees(tmp_path)
    tools = src / "scripts" / "dummy-tools"
    tools.mkdir(parents=True)
    (tools / "ld").write_text("#!/bin/sh\n")
    (tools / "nm").symlink_to("ld")
    artifacts.export_kbuild_tree(src, out, tmp_path / "linked", link_sources=True)
    nm = tmp_path / "linked" / "scripts" / "dummy-tools" / "nm"
    assert not nm.is_symlink() and nm.read_text() == "#!/bin/sh\n"


def test_what_an_interrupted_build_wrote_is_discarded_and_only_that(tmp_path: Path) -> None:
    """The object tree of a build that never ended (its RUNNING_MARK is still there): every file written
    since the mark is removed (a cut .o.cmd or .o among them), older files stay, and the mark goes."""
    out = tmp_path / "out"
    (out / "kernel").mkdir(parents=True)
    old = out / "kernel" / "fork.o"
    old.write_bytes(b"an object of the last finished build")
    os.utime(old, ns=(1_000_000_000, 1_000_000_000))
    assert kbuild.discard_interrupted(out) == 0  # no mark: a finished build, nothing removed
    with pytest.raises(RuntimeError), kbuild.running(out):  # killed: a non-build exception keeps the mark
        (out / "kernel" / ".ptrace.o.cmd").write_text("cmd_kernel/ptrace.o := gcc -Wp,$(dep")  # cut
        (out / "kernel" / "ptrace.o").write_bytes(b"\x7fELF cut")
        raise RuntimeError("the process died here")
    assert (out / kbuild.RUNNING_MARK).exists()
    assert kbuild.discard_interrupted(out) == 2
    assert sorted(p.name for p in (out / "kernel").iterdir()) == ["fork.o"]
    assert not (out / kbuild.RUNNING_MARK).exists()


def test_a_build_that_ends_or_fails_in_make_leaves_no_mark(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with kbuild.running(out):
        assert (out / kbuild.RUNNING_MARK).exists()
    assert not (out / kbuild.RUNNING_MARK).exists()
    with pytest.raises(kbuild.CompileError), kbuild.running(out):  # make's own error exit: a sound tree
        raise kbuild.CompileError("make failed")
    assert not (out / kbuild.RUNNING_MARK).exists()


def _export_digest(tmp_path: Path, src: Path, out: Path, name: str, memo: Path | None) -> str:
    from kernel_ci.build import artifacts
    from kernel_ci.core.digest import SourceDigests

    export = tmp_path / name
    artifacts.export_kbuild_tree(src, out, export, link_sources=memo is not None)
    return artifacts.kbuild_export_digest(export, out, SourceDigests(src, memo))


def test_the_kbuild_export_digest_changes_with_every_object_tree_file_it_holds(tmp_path: Path) -> None:
    """The external modules' reuse key: with the source tree's digest remembered, what the object tree
    gave is still read every time (it changes with every build)."""
    src, out = _kbuild_trees(tmp_path)
    memo = tmp_path / "src.digests.json"
    first = _export_digest(tmp_path, src, out, "e1", memo)
    assert memo.is_file()
    assert _export_digest(tmp_path, src, out, "e2", memo) == first  # the same inputs: the same key
    (out / "include/generated/autoconf.h").write_text("#define CONFIG_X 2\n")
    second = _export_digest(tmp_path, src, out, "e3", memo)
    assert second != first
    (out / "Module.symvers").write_text("0x1\tsym\tvmlinux\tEXPORT_SYMBOL\t\n")  # a file that was absent
    assert _export_digest(tmp_path, src, out, "e4", memo) not in (first, second)


def test_the_kbuild_export_digest_of_a_tree_without_a_memo_reads_the_whole_export(tmp_path: Path) -> None:
    """A user's tree may change while it is exported: every file of the export itself is read."""
    from kernel_ci.core.digest import tree_digest

    src, out = _kbuild_trees(tmp_path)
    first = _export_digest(tmp_path, src, out, "e1", None)
    assert first == tree_digest(tmp_path / "e1")
    (src / "include/linux/a.h").write_text("#define A 2\n")
    assert _export_digest(tmp_path, src, out, "e2", None) != first


def test_the_kbuild_export_digest_differs_between_source_trees(tmp_path: Path) -> None:
    """Two of kernel-ci's own trees (two memos): a header that differs gives another key."""
    src, out = _kbuild_trees(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(src, other)
    (other / "include/linux/a.h").write_text("#define A 2\n")
    mine = _export_digest(tmp_path, src, out, "e1", tmp_path / "src.json")
    theirs = _export_digest(tmp_path, other, out, "e2", tmp_path / "other.json")
    assert mine != theirs


def test_a_kept_export_brought_up_to_date_is_the_fresh_export(tmp_path: Path) -> None:
    """A no-cache build keeps its kbuild export for the next build of the object tree, which updates it
    (SourceExport with kept) instead of making it anew. Whatever happened in between (a source replaced,
    an object file rewritten or gone, a file planted in the kept export, a link there replaced by other
    bytes), the result is byte for byte the fresh export, and unchanged source files keep their links."""
    from kernel_ci.build import artifacts
    from kernel_ci.core.digest import tree_digest

    src, out = _kbuild_trees(tmp_path)
    (src / "include/linux/b.h").write_text("#define B 1\n")
    (src / "include/linux/c.h").write_text("#define C 1\n")
    (out / "include/generated/gone.h").write_text("old\n")
    kept = tmp_path / "kept"
    artifacts.export_kbuild_tree(src, out, kept, link_sources=True)

    replaced = src / "include/linux/b.h"  # a new inode under the same name, as a patch applied anew gives
    (src / "include/linux/b.h.new").write_text("#define B 2\n")
    (src / "include/linux/b.h.new").replace(replaced)
    (out / ".config").write_text("CONFIG_X=m\n")  # rewritten in place by kbuild
    (out / "include/generated/gone.h").unlink()
    (kept / "planted").write_text("not of this build\n")
    (kept / "stale/dir").mkdir(parents=True)
    (kept / "stale/dir/file").write_text("")
    (kept / "include/linux/c.h").unlink()
    (kept / "include/linux/c.h").write_text("#define C 666\n")  # same name, other bytes, its own inode

    staging = tmp_path / "staging/kbuild"
    staging.parent.mkdir()
    with artifacts.exporting_sources(src, staging, link=True, kept=kept) as sources:
        sources.wait()
        assert sources.placed is not None  # the kept export was taken and updated, not made anew
        artifacts.export_kbuild_tree(
            src, out, staging, link_sources=True, sources_placed=True, kept_sources=sources.placed
        )
    assert not kept.exists()
    fresh = tmp_path / "fresh"
    artifacts.export_kbuild_tree(src, out, fresh, link_sources=True)
    assert tree_digest(staging) == tree_digest(fresh)
    assert sorted(p.relative_to(staging) for p in staging.rglob("*")) == sorted(
        p.relative_to(fresh) for p in fresh.rglob("*")
    )
    for name in ("a.h", "b.h", "c.h"):
        assert (staging / "include/linux" / name).stat().st_ino == (
            src / "include/linux" / name
        ).stat().st_ino


def test_without_a_kept_export_the_source_pass_makes_one(tmp_path: Path) -> None:
    from kernel_ci.build import artifacts

    src, _out = _kbuild_trees(tmp_path)
    with artifacts.exporting_sources(src, tmp_path / "k", link=True, kept=tmp_path / "none") as sources:
        sources.wait()
        assert sources.placed is None
    assert (tmp_path / "k/include/linux/a.h").read_text() == "#define A 1\n"


def test_a_kept_export_lies_beside_its_object_tree_and_goes_with_it(tmp_path: Path) -> None:
    """Never inside the object tree (mounted into the builder container, which runs patch code); pruned
    with its tree, and never taken for an object tree itself."""
    import os
    import time

    from kernel_ci.flow.build import _prune_object_trees, kept_export

    trees = []
    for n in range(3):
        tree = tmp_path / f"out-{n}"
        tree.mkdir()
        kept_export(tree).mkdir()
        os.utime(tree, (time.time() - 100 + n, time.time() - 100 + n))
        trees.append(tree)
    assert not kept_export(trees[0]).is_relative_to(trees[0])
    _prune_object_trees(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "export-1", "export-2", "out-1", "out-2",
    ]  # fmt: skip


def test_the_kbuild_export_holds_what_an_out_of_tree_build_reads_and_not_the_whole_trees_makefiles(
    tmp_path: Path,
) -> None:
    """An `M=` build reads the top and arch Makefiles, include/, scripts/ and the arch's include/ folders,
    never a subsystem's Makefile or Kconfig (kbuild does not descend into the kernel's own folders for
    it; upstream's install-extmod-build selects the same): those were ~4,300 of the export's 11,600
    files, most of a restore's work."""
    from kernel_ci.build import artifacts

    src, out = _kbuild_trees(tmp_path)
    kept = [
        "Makefile", "Kbuild", "Kconfig",
        "arch/x86/Makefile", "arch/x86/Makefile_32.cpu", "arch/x86/Kconfig",
        "arch/x86/include/asm/ptrace.h",
        "arch/x86/entry/syscalls/syscall_64.tbl",
        "scripts/Makefile.build", "scripts/Kbuild.include", "scripts/gdb/linux/utils.py",
        "tools/include/linux/types.h", "tools/objtool/Makefile",
        "include/linux/a.h", "include/uapi/Kbuild",
    ]  # fmt: skip
    dropped = [
        "drivers/net/Makefile", "drivers/net/Kconfig", "fs/ext4/Kbuild", "kernel/ptrace.c",
        "arch/x86/kernel/Makefile", "arch/x86/kvm/Kconfig", "arch/x86/kvm/mmu.h", "arch/x86/lib/memcpy_64.S",
        "arch/x86/boot/Makefile", "tools/Makefile", "tools/perf/Makefile",
    ]  # fmt: skip
    for rel in kept + dropped:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel + "\n")
    export = tmp_path / "kbuild"
    artifacts.export_kbuild_tree(src, out, export, link_sources=True)
    held = {str(p.relative_to(export)) for p in export.rglob("*") if p.is_file()}
    assert set(kept) <= held
    assert not set(dropped) & held, sorted(set(dropped) & held)
    assert not (export / "drivers").exists() and not (export / "arch/x86/kvm").exists()
