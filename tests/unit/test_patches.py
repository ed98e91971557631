from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest

from kernel_ci.build.patches import (
    PatchApplyError,
    PatchToolMissingError,
    Series,
    SeriesError,
    apply_series,
    break_hardlinks,
    discover_series,
    export_series,
    load_external,
    load_series,
    parse_patch_failures,
    patch_targets,
    series_digest,
)
from kernel_ci.core.paths import KERNEL_PATCHES
from kernel_ci.core.proc import capture, run

GIT = [
    "git",
    "-c",
    "user.name=kernel-ci",
    "-c",
    "user.email=kernel-ci@example.invalid",
    "-c",
    "commit.gpgsign=false",
    "-c",
    "init.defaultBranch=main",
]

VANILLA = {
    "Makefile": "obj-y += core.o\nobj-y += util.o\n",
    "init/Kconfig": "".join(f"config OPTION_{i}\n\tbool\n\n" for i in range(30)),
    "kernel/core.c": "".join(f"int core_{i};\n" for i in range(40)),
    "kernel/old.c": "int old;\n",
}


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


class PatchMaker:
    """Makes real `git format-patch` patches against VANILLA, one commit each."""

    def __init__(self, base: Path) -> None:
        self.repo = write_tree(base / "patch-repo", VANILLA)
        capture([*GIT, "init", "-q"], cwd=self.repo)
        capture([*GIT, "add", "-A"], cwd=self.repo)
        capture([*GIT, "commit", "-q", "-m", "vanilla"], cwd=self.repo)
        self.vanilla_commit = capture(["git", "rev-parse", "HEAD"], cwd=self.repo).strip()
        self.out = base / "formatted"

    def make(self, subject: str, changes: dict[str, str | None], *, base: str | None = None) -> Path:
        """A patch of one commit applying changes (None deletes) on top of base (default: HEAD)."""
        if base is not None:
            capture([*GIT, "checkout", "-q", "--detach", base], cwd=self.repo)
        for name, text in changes.items():
            path = self.repo / name
            if text is None:
                path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        capture([*GIT, "add", "-A"], cwd=self.repo)
        message = (
            f"{subject}\n\nBecause a test needs it.\n\nSigned-off-by: kernel-ci <kernel-ci@example.invalid>"
        )
        capture([*GIT, "commit", "-q", "-m", message], cwd=self.repo)
        made = capture([*GIT, "format-patch", "-1", "-o", str(self.out)], cwd=self.repo).strip()
        return Path(made)


@pytest.fixture
def maker(tmp_path: Path) -> PatchMaker:
    return PatchMaker(tmp_path)


def make_series(root: Path, name: str, patches: list[Path], series_text: str | None = None) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    for patch in patches:
        shutil.copy(patch, directory / patch.name)
    text = series_text if series_text is not None else "".join(f"{p.name}\n" for p in patches)
    (directory / "series").write_text(text)
    (directory / "README.md").write_text(f"# {name}\n")
    return directory


def edited(name: str, old: str, new: str) -> str:
    text = VANILLA[name]
    assert old in text
    return text.replace(old, new)


# -- discovery ---------------------------------------------------------------------------------


def test_discover_series_finds_every_series_sorted_with_patches_in_series_order(
    tmp_path: Path, maker: PatchMaker
) -> None:
    first = maker.make(
        "core: first", {"kernel/core.c": edited("kernel/core.c", "int core_1;", "long core_1;")}
    )
    second = maker.make("core: second", {"kernel/new.c": "int new;\n"})
    root = tmp_path / "kernel-patches"
    make_series(root, "zeta", [second])
    directory = make_series(
        root,
        "alpha",
        [first, second],
        series_text=(
            f"# the alpha series\n\n{second.name}   # comes first\n{first.name} -p1\t# tab, then comment\n"
        ),
    )
    (directory / "b.config").write_text("CONFIG_B=y\n")
    (directory / "a.config").write_text("CONFIG_A=y\n")
    (directory / "notes.txt").write_text("not a fragment\n")
    (root / "README.md").write_text("top-level files are not series\n")
    (root / ".hidden").mkdir()

    found = discover_series(root)

    assert [s.name for s in found] == ["alpha", "zeta"]
    alpha = found[0]
    assert alpha == Series(
        name="alpha",
        directory=root / "alpha",
        patches=(root / "alpha" / second.name, root / "alpha" / first.name),
        fragments=(root / "alpha" / "a.config", root / "alpha" / "b.config"),
    )
    assert [s.name for s in discover_series(root, ["zeta", "alpha"])] == ["zeta", "alpha"]


def test_unknown_or_repeated_series_names_are_errors_listing_the_known_ones(
    tmp_path: Path, maker: PatchMaker
) -> None:
    patch = maker.make("x", {"kernel/new.c": "int new;\n"})
    root = tmp_path / "kernel-patches"
    make_series(root, "ci-smoke", [patch])
    make_series(root, "ptrace", [patch])
    with pytest.raises(
        SeriesError, match=r"unknown patch series 'ptrac'; known series in .*: ci-smoke, ptrace"
    ):
        discover_series(root, ["ci-smoke", "ptrac"])
    with pytest.raises(SeriesError, match="more than once: ptrace"):
        discover_series(root, ["ptrace", "ptrace"])
    with pytest.raises(SeriesError, match="does not exist"):
        discover_series(tmp_path / "nowhere", ["ci-smoke"])
    assert discover_series(tmp_path / "nowhere") == []  # a bare project: no kernel-patches/, no series


def test_a_series_naming_a_missing_patch_is_an_error(tmp_path: Path, maker: PatchMaker) -> None:
    patch = maker.make("x", {"kernel/new.c": "int new;\n"})
    directory = make_series(tmp_path, "s", [patch], series_text=f"{patch.name}\n0002-forgotten.patch\n")
    with pytest.raises(SeriesError, match=r"series:2 names '0002-forgotten.patch', which does not exist"):
        load_series(directory)


def test_a_patch_not_listed_in_the_series_is_an_error(tmp_path: Path, maker: PatchMaker) -> None:
    listed = maker.make("x", {"kernel/new.c": "int new;\n"})
    forgotten = maker.make("y", {"kernel/new2.c": "int new2;\n"})
    directory = make_series(tmp_path, "s", [listed, forgotten], series_text=f"{listed.name}\n")
    with pytest.raises(SeriesError, match=rf"holds {re.escape(forgotten.name)}, not listed in .*series"):
        load_series(directory)


def test_series_file_problems_are_reported_with_their_line(tmp_path: Path, maker: PatchMaker) -> None:
    patch = maker.make("x", {"kernel/new.c": "int new;\n"})
    cases = {
        "strip": (f"{patch.name} -p0\n", r"series:1: unsupported options '-p0'.*only -p1"),
        "twice": (f"{patch.name}\n{patch.name}\n", r"series:2: .* is listed twice"),
        "escape": ("../outside.patch\n", r"series:1: '../outside.patch' must be a file name inside"),
    }
    for name, (text, message) in cases.items():
        directory = make_series(tmp_path, name, [patch], series_text=text)
        with pytest.raises(SeriesError, match=message):
            load_series(directory)
    (tmp_path / "noseries").mkdir()
    with pytest.raises(SeriesError, match="has no 'series' file"):
        load_series(tmp_path / "noseries")


# -- patch headers -----------------------------------------------------------------------------


def test_patch_targets_reads_modified_created_deleted_and_renamed_files(maker: PatchMaker) -> None:
    patch = maker.make(
        "many",
        {
            "Makefile": VANILLA["Makefile"] + "obj-y += new.o\n",
            "kernel/new.c": "int new;\n",
            "kernel/old.c": None,
        },
    )
    assert patch_targets(patch.read_text()) == ["Makefile", "kernel/new.c", "kernel/old.c"]
    renamed = """\
diff --git a/kernel/old.c b/kernel/renamed.c
similarity index 100%
rename from kernel/old.c
rename to kernel/renamed.c
"""
    assert patch_targets(renamed) == ["kernel/old.c", "kernel/renamed.c"]


def test_patch_targets_does_not_mistake_hunk_lines_for_headers() -> None:
    text = """\
--- a/doc/notes.txt
+++ b/doc/notes.txt
@@ -1,3 +1,3 @@
 keep
--- removed line that looks like a header
+++ added line that looks like a header
 keep
"""
    assert patch_targets(text) == ["doc/notes.txt"]


def test_patch_targets_rejects_paths_outside_the_tree() -> None:
    text = "--- a/../../etc/passwd\n+++ b/../../etc/passwd\n@@ -1 +1 @@\n-x\n+y\n"
    with pytest.raises(SeriesError, match="outside the source tree"):
        patch_targets(text)


# -- applying ----------------------------------------------------------------------------------


def test_apply_series_applies_every_patch_in_order(tmp_path: Path, maker: PatchMaker) -> None:
    one = maker.make("kconfig: add CI", {"init/Kconfig": VANILLA["init/Kconfig"] + "config CI\n\tbool\n"})
    two = maker.make("kernel: add ci.c", {"kernel/ci.c": "int ci;\n", "kernel/old.c": None})
    # the second series depends on the first: it edits the file the first one created
    three = maker.make("kernel: grow ci.c", {"kernel/ci.c": "int ci;\nint ci2;\n"})
    root = tmp_path / "kernel-patches"
    make_series(root, "a-base", [one, two])
    make_series(root, "b-more", [three])
    tree = write_tree(tmp_path / "tree", VANILLA)

    applied = apply_series(discover_series(root), tree)

    assert applied == [f"a-base/{one.name}", f"a-base/{two.name}", f"b-more/{three.name}"]
    assert (tree / "init/Kconfig").read_text().endswith("config CI\n\tbool\n")
    assert (tree / "kernel/ci.c").read_text() == "int ci;\nint ci2;\n"
    assert not (tree / "kernel/old.c").exists()
    assert not list(tree.rglob("*.orig")) and not list(tree.rglob("*.rej"))


def test_a_failing_hunk_names_patch_file_and_hunk_and_leaves_the_tree_untouched(
    tmp_path: Path, maker: PatchMaker
) -> None:
    good = maker.make(
        "core: rename core_1", {"kernel/core.c": edited("kernel/core.c", "int core_1;", "long core_1;")}
    )
    # two hunks far apart in core.c: the first still applies, the second conflicts with the tree below
    two_hunks = edited("kernel/core.c", "int core_12;", "short core_12;").replace(
        "int core_35;", "char core_35;"
    )
    bad = maker.make("core: two hunks", {"kernel/core.c": two_hunks}, base=maker.vanilla_commit)
    root = tmp_path / "kernel-patches"
    make_series(root, "s", [good, bad])
    tree = write_tree(tmp_path / "tree", VANILLA)
    (tree / "kernel/core.c").write_text(VANILLA["kernel/core.c"].replace("int core_35;", "unsigned core_35;"))
    before = (tree / "kernel/core.c").read_text()

    with pytest.raises(PatchApplyError) as caught:
        apply_series(discover_series(root), tree)

    error = caught.value
    assert error.series == "s"
    assert error.patch_file == bad.name
    assert error.target_file == "kernel/core.c"
    assert error.hunk == (2,)
    message = str(error)
    assert f"patch s/{bad.name} does not apply" in message
    assert "kernel/core.c: hunk #2 FAILED at line" in message
    assert "hint: " in message
    assert "left untouched" in message
    # the first patch of the series was applied; the failing one changed nothing (not even hunk #1)
    after = (tree / "kernel/core.c").read_text()
    assert after == before.replace("int core_1;", "long core_1;")
    assert "short core_12;" not in after
    assert not list(tree.rglob("*.rej")) and not list(tree.rglob("*.orig"))


def test_a_missing_target_file_is_named_in_the_error(tmp_path: Path, maker: PatchMaker) -> None:
    patch = maker.make(
        "kconfig: edit", {"init/Kconfig": edited("init/Kconfig", "OPTION_3\n", "OPTION_THREE\n")}
    )
    root = tmp_path / "kernel-patches"
    make_series(root, "s", [patch])
    tree = write_tree(tmp_path / "tree", {k: v for k, v in VANILLA.items() if k != "init/Kconfig"})
    with pytest.raises(PatchApplyError) as caught:
        apply_series(discover_series(root), tree)
    assert caught.value.target_file == "init/Kconfig"
    assert caught.value.hunk == ()
    assert "init/Kconfig: file to patch not found" in str(caught.value)
    assert "another kernel version" in str(caught.value)
    assert "does not match this tree's text" not in str(caught.value), "only the hints that apply"


def test_an_already_applied_patch_is_reported_as_such(tmp_path: Path, maker: PatchMaker) -> None:
    patch = maker.make("kernel: add ci.c", {"kernel/ci.c": "int ci;\n"})
    root = tmp_path / "kernel-patches"
    make_series(root, "s", [patch])
    tree = write_tree(tmp_path / "tree", VANILLA)
    apply_series(discover_series(root), tree)
    with pytest.raises(PatchApplyError, match=r"kernel/ci\.c: would be created, but already exists"):
        apply_series(discover_series(root), tree)


def test_parse_patch_failures_reads_gnu_patch_output() -> None:
    output = """\
checking file 'drivers/odd name.c'
Hunk #1 FAILED at 10.
Hunk #3 FAILED at 70 (different line endings).
2 out of 3 hunks FAILED
can't find file to patch at input line 40
Perhaps you used the wrong -p or --strip option?
The text leading up to this was:
--------------------------
|diff --git a/kernel/gone.c b/kernel/gone.c
|--- a/kernel/gone.c
|+++ b/kernel/gone.c
--------------------------
No file to patch.  Skipping patch.
"""
    failures = parse_patch_failures(output)
    assert [(f.target, f.hunk, f.kind) for f in failures] == [
        ("drivers/odd name.c", 1, "hunk"),
        ("drivers/odd name.c", 3, "hunk"),
        ("kernel/gone.c", None, "missing"),
    ]
    assert failures[1].problem == "hunk #3 FAILED at line 70 (different line endings)"


def test_applying_to_a_hardlinked_copy_never_changes_the_pristine_tree(
    tmp_path: Path, maker: PatchMaker
) -> None:
    patch = maker.make(
        "edit",
        {"kernel/core.c": edited("kernel/core.c", "int core_5;", "long core_5;"), "kernel/old.c": None},
    )
    root = tmp_path / "kernel-patches"
    make_series(root, "s", [patch])
    pristine = write_tree(tmp_path / "pristine", VANILLA)
    work = tmp_path / "work"
    run(["cp", "-al", str(pristine), str(work)], quiet=True)
    assert (work / "kernel/core.c").stat().st_ino == (pristine / "kernel/core.c").stat().st_ino

    apply_series(discover_series(root), work)

    for name, text in VANILLA.items():
        assert (pristine / name).read_text() == text, f"pristine {name} was changed"
    assert "long core_5;" in (work / "kernel/core.c").read_text()
    assert (work / "kernel/core.c").stat().st_nlink == 1
    assert (pristine / "kernel/core.c").stat().st_nlink == 1
    # files the patch does not touch stay shared with the pristine tree (cheap copies)
    assert (work / "Makefile").stat().st_ino == (pristine / "Makefile").stat().st_ino


def test_break_hardlinks_gives_each_listed_file_its_own_inode(tmp_path: Path) -> None:
    pristine = write_tree(tmp_path / "pristine", VANILLA)
    work = tmp_path / "work"
    run(["cp", "-al", str(pristine), str(work)], quiet=True)
    broken = break_hardlinks(work, ["kernel/core.c", "kernel/not-there.c", "Makefile"])
    assert broken == ["kernel/core.c", "Makefile"]
    assert (work / "kernel/core.c").stat().st_ino != (pristine / "kernel/core.c").stat().st_ino
    assert (work / "kernel/core.c").read_text() == VANILLA["kernel/core.c"]
    (work / "kernel/core.c").write_text("changed\n")
    assert (pristine / "kernel/core.c").read_text() == VANILLA["kernel/core.c"]
    assert (work / "init/Kconfig").stat().st_nlink == 2
    assert [p.name for p in (work / "kernel").iterdir() if "kci-unlink" in p.name] == []


def test_a_missing_patch_program_says_how_to_install_it(
    tmp_path: Path, maker: PatchMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    patch = maker.make("x", {"kernel/new.c": "int new;\n"})
    root = tmp_path / "kernel-patches"
    make_series(root, "s", [patch])
    tree = write_tree(tmp_path / "tree", VANILLA)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(PatchToolMissingError, match="apt-get install patch"):
        apply_series(discover_series(root), tree)


# -- export and digest -------------------------------------------------------------------------


def test_export_series_writes_one_mbox_that_git_am_applies(tmp_path: Path, maker: PatchMaker) -> None:
    one = maker.make("kconfig: add CI", {"init/Kconfig": VANILLA["init/Kconfig"] + "config CI\n\tbool\n"})
    two = maker.make("kernel: add ci.c", {"kernel/ci.c": "int ci;\n"})
    series = load_series(make_series(tmp_path, "pair", [one, two]))

    mbox = export_series(series, tmp_path / "downloads")

    assert mbox == tmp_path / "downloads" / "pair.mbox"
    assert mbox.read_bytes() == one.read_bytes() + two.read_bytes()
    target = write_tree(tmp_path / "am-target", VANILLA)
    capture([*GIT, "init", "-q"], cwd=target)
    capture([*GIT, "add", "-A"], cwd=target)
    capture([*GIT, "commit", "-q", "-m", "vanilla"], cwd=target)
    capture([*GIT, "am", "-q", str(mbox)], cwd=target)
    subjects = capture(["git", "log", "--format=%s", "-3"], cwd=target).splitlines()
    assert subjects == ["kernel: add ci.c", "kconfig: add CI", "vanilla"]
    assert (target / "kernel/ci.c").read_text() == "int ci;\n"


def test_export_refuses_patches_that_are_not_format_patch_files(tmp_path: Path) -> None:
    directory = tmp_path / "plain"
    directory.mkdir()
    (directory / "0001-plain.patch").write_text("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n")
    (directory / "series").write_text("0001-plain.patch\n")
    with pytest.raises(SeriesError, match="not a git format-patch file"):
        export_series(load_series(directory), tmp_path / "out")
    assert not (tmp_path / "out" / "plain.mbox").exists()


def test_series_digest_is_the_sha256_of_each_patch_in_order(tmp_path: Path, maker: PatchMaker) -> None:
    one = maker.make("a", {"kernel/a.c": "int a;\n"})
    two = maker.make("b", {"kernel/b.c": "int b;\n"})
    series = load_series(make_series(tmp_path, "s", [two, one], series_text=f"{two.name}\n{one.name}\n"))
    digest = series_digest(series)
    assert list(digest) == [f"s/{two.name}", f"s/{one.name}"]
    assert digest[f"s/{one.name}"] == hashlib.sha256(one.read_bytes()).hexdigest()
    (series.directory / one.name).write_bytes(one.read_bytes() + b"\n")
    assert series_digest(series)[f"s/{one.name}"] != digest[f"s/{one.name}"]


# -- the real kernel-patches folder ------------------------------------------------------------

_CONFIG_LINE = re.compile(r"(CONFIG_[A-Za-z0-9_]+=.*|# CONFIG_[A-Za-z0-9_]+ is not set|#.*|)")


def test_every_real_series_is_well_formed() -> None:
    all_series = discover_series(KERNEL_PATCHES)
    assert "ci-smoke" in [s.name for s in all_series]
    for series in all_series:
        assert (series.directory / "README.md").is_file(), f"{series.name} has no README.md"
        assert series.patches, f"{series.name} lists no patches"
        assert len(series_digest(series)) == len(series.patches)
        for patch in series.patches:
            text = patch.read_text(encoding="utf-8")
            assert re.match(r"From [0-9a-f]{40} ", text), f"{patch} lacks the format-patch 'From <sha>' line"
            assert re.search(r"^From: .+ <.+@.+>$", text, re.M), f"{patch} has no From: author"
            assert re.search(r"^Subject: \[PATCH[^\]]*\] \S", text, re.M), f"{patch} has no Subject"
            assert re.search(r"^Signed-off-by: .+ <.+@.+>$", text, re.M), f"{patch} has no Signed-off-by"
            assert patch_targets(text), f"{patch} changes no file"
        for fragment in series.fragments:
            for number, line in enumerate(fragment.read_text().splitlines(), start=1):
                assert _CONFIG_LINE.fullmatch(line.strip()), (
                    f"{fragment}:{number}: not a kconfig line: {line!r}"
                )


def test_the_ci_smoke_series_adds_the_proc_file_its_option_and_its_fragment() -> None:
    (series,) = discover_series(KERNEL_PATCHES, ["ci-smoke"])
    assert [p.name for p in series.patches] == ["0001-proc-add-proc-ci-smoke.patch"]
    text = series.patches[0].read_text()
    assert patch_targets(text) == ["init/Kconfig", "kernel/Makefile", "kernel/ci_smoke.c"]
    assert "Subject: [PATCH] proc: add /proc/ci-smoke to prove a patch reached the running" in text
    assert "+config CI_SMOKE\n" in text
    assert "+obj-$(CONFIG_CI_SMOKE) += ci_smoke.o\n" in text
    assert 'proc_create_single("ci-smoke", 0444, NULL, ci_smoke_show)' in text
    assert '"ci-smoke: patch applied\\n"' in text
    assert [f.name for f in series.fragments] == ["ci-smoke.config"]
    fragment = series.fragments[0].read_text().splitlines()
    assert "CONFIG_CI_SMOKE=y" in fragment and "CONFIG_PROC_FS=y" in fragment


def test_the_helpers_do_not_leave_stray_files(tmp_path: Path, maker: PatchMaker) -> None:
    patch = maker.make("x", {"kernel/new.c": "int new;\n"})
    series = load_series(make_series(tmp_path, "s", [patch]))
    export_series(series, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["s.mbox"]


def test_a_hunk_that_needs_fuzz_is_refused_naming_the_patch_and_hunk(
    tmp_path: Path, maker: PatchMaker
) -> None:
    """Strictness: GNU patch's default fuzz would apply this hunk with one context line ignored; git am
    refuses it, and so must we (the change could land beside code it was never reviewed against)."""
    patch = maker.make(
        "core: widen core_20", {"kernel/core.c": edited("kernel/core.c", "int core_20;", "long core_20;")}
    )
    root = tmp_path / "kernel-patches"
    make_series(root, "s", [patch])
    tree = write_tree(tmp_path / "tree", VANILLA)
    # a context line two lines above the change differs: fuzz 1 would have applied it
    fuzzy = VANILLA["kernel/core.c"].replace("int core_18;", "int core_18; /* moved */")
    (tree / "kernel/core.c").write_text(fuzzy)
    lenient = run(
        ["patch", "-p1", "--dry-run", "--batch", "-i", str(patch)], cwd=tree, check=False, quiet=True
    )
    assert lenient.returncode == 0 and "with fuzz" in lenient.output  # the default would have taken it

    with pytest.raises(PatchApplyError) as caught:
        apply_series(discover_series(root), tree)

    assert caught.value.patch_file == patch.name and caught.value.hunk == (1,)
    assert "kernel/core.c: hunk #1 FAILED" in str(caught.value)
    assert (tree / "kernel/core.c").read_text() == fuzzy


def test_a_hunk_at_an_offset_still_applies_as_with_git_am(tmp_path: Path, maker: PatchMaker) -> None:
    patch = maker.make(
        "core: widen core_20", {"kernel/core.c": edited("kernel/core.c", "int core_20;", "long core_20;")}
    )
    root = tmp_path / "kernel-patches"
    make_series(root, "s", [patch])
    tree = write_tree(tmp_path / "tree", VANILLA)
    (tree / "kernel/core.c").write_text("int added_above;\n" * 3 + VANILLA["kernel/core.c"])

    apply_series(discover_series(root), tree)

    assert "long core_20;" in (tree / "kernel/core.c").read_text()


# -- --patches: a series from outside ------------------------------------------------------------------

COVER = (
    "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
    "From: kernel-ci <kernel-ci@example.invalid>\nSubject: [PATCH 0/2] core: two changes\n\n"
    "This series changes two things.\n\n-- \n2.39.2\n\n"
)


def _two_patches(maker: PatchMaker) -> list[Path]:
    one = maker.make(
        "core: widen core_1", {"kernel/core.c": edited("kernel/core.c", "int core_1;", "long core_1;")}
    )
    text = (maker.repo / "kernel/core.c").read_text().replace("int core_30;", "long core_30;")
    return [one, maker.make("core: widen core_30", {"kernel/core.c": text})]


def test_external_patches_from_a_format_patch_directory_apply_in_order(
    tmp_path: Path, maker: PatchMaker
) -> None:
    patches = _two_patches(maker)
    series = load_external(patches[0].parent, tmp_path / "staged")
    assert series.name == "patches" and len(series.patches) == 2
    tree = write_tree(tmp_path / "tree", VANILLA)
    apply_series([series], tree)
    text = (tree / "kernel/core.c").read_text()
    assert "long core_1;" in text and "long core_30;" in text


def test_a_b4_mbx_with_a_cover_letter_applies_without_it(tmp_path: Path, maker: PatchMaker) -> None:
    mbx = tmp_path / "v2_20240101_core.mbx"
    mbx.write_text(COVER + "".join(p.read_text() for p in _two_patches(maker)))
    series = load_external(mbx, tmp_path / "staged")
    assert len(series.patches) == 2  # the cover letter is left out
    assert series.patches[0].read_text().startswith("From ")
    tree = write_tree(tmp_path / "tree", VANILLA)
    apply_series([series], tree)
    assert "long core_30;" in (tree / "kernel/core.c").read_text()


def test_a_mail_that_is_not_a_patch_is_rejected_by_name(tmp_path: Path, maker: PatchMaker) -> None:
    reply = (
        "From 1111111111111111111111111111111111111111 Mon Sep 17 00:00:00 2001\n"
        "From: reviewer <r@example.invalid>\nSubject: Re: [PATCH 1/2] core: widen core_1\n\nLooks good.\n\n"
    )
    patches = _two_patches(maker)
    mbox = tmp_path / "series.mbox"
    mbox.write_text(patches[0].read_text() + reply + patches[1].read_text())
    with pytest.raises(
        SeriesError, match=r"message 2 \('Re: \[PATCH 1/2\] core: widen core_1'\) holds no patch"
    ):
        load_external(mbox, tmp_path / "staged")


@pytest.mark.parametrize("content", ["just some text\n", ""])
def test_a_file_that_is_not_an_mbox_is_rejected(tmp_path: Path, content: str) -> None:
    path = tmp_path / "notes.txt"
    path.write_text(content)
    with pytest.raises(SeriesError, match="not an mbox"):
        load_external(path, tmp_path / "staged")
    with pytest.raises(SeriesError, match="no such file"):
        load_external(tmp_path / "missing.mbx", tmp_path / "staged")


def test_a_cover_letter_alone_is_no_series(tmp_path: Path) -> None:
    mbx = tmp_path / "cover.mbx"
    mbx.write_text(COVER)
    with pytest.raises(SeriesError, match="no patch in it"):
        load_external(mbx, tmp_path / "staged")


def test_an_external_patch_needing_fuzz_is_refused(tmp_path: Path, maker: PatchMaker) -> None:
    patches = _two_patches(maker)
    series = load_external(patches[0].parent, tmp_path / "staged")
    tree = write_tree(tmp_path / "tree", VANILLA)
    (tree / "kernel/core.c").write_text(
        VANILLA["kernel/core.c"].replace("int core_28;", "int core_28; /* x */")
    )
    with pytest.raises(PatchApplyError) as caught:
        apply_series([series], tree)
    assert caught.value.series == "patches" and caught.value.patch_file == "0002.patch"
    assert caught.value.hunk == (1,)


def test_a_mangled_external_patch_is_rejected_as_malformed(tmp_path: Path, maker: PatchMaker) -> None:
    patch = _two_patches(maker)[0]
    mangled = tmp_path / "mangled"
    mangled.mkdir()
    # a mailer that ate the leading space of a context line: the hunk no longer parses
    (mangled / patch.name).write_text(re.sub(r"\n int core_0;", "\nint core_0;", patch.read_text(), count=1))
    series = load_external(mangled, tmp_path / "staged")
    with pytest.raises(PatchApplyError, match=r"malformed|damaged"):
        apply_series([series], write_tree(tmp_path / "tree", VANILLA))


def test_series_on_a_user_tree_go_onto_a_private_copy_without_git(
    tmp_path: Path, maker: PatchMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--tree --series: the user's tree is copied (no hard links, no .git) and only the copy is patched."""
    from kernel_ci.build import source
    from kernel_ci.flow import build as buildflow

    monkeypatch.setenv("KERNEL_CI_CACHE", str(tmp_path / "cache"))
    patch = maker.make("edit", {"kernel/core.c": edited("kernel/core.c", "int core_5;", "long core_5;")})
    root = tmp_path / "kernel-patches"
    make_series(root, "s", [patch])
    user = write_tree(tmp_path / "user", VANILLA)
    capture([*GIT, "init", "-q"], cwd=user)
    src = source.KernelSource(
        "tree", source.Tarball("5.10", "tree", str(user), "0" * 64, "user"), user, "git:"
    )

    copy = buildflow._prepare_tree(src, discover_series(root), "u" * 16, private_copy=True)

    assert "long core_5;" in (copy / "kernel/core.c").read_text()
    assert (user / "kernel/core.c").read_text() == VANILLA["kernel/core.c"]
    assert not (copy / ".git").exists()
    assert (copy / "Makefile").stat().st_ino != (user / "Makefile").stat().st_ino
