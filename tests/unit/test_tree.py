"""The content key of a user's tree (--tree): git base + uncommitted changes, or every file (plain)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kernel_ci.build import tree as usertree
from kernel_ci.core.proc import capture

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false"]
MAKEFILE = "VERSION = 5\nPATCHLEVEL = 10\nSUBLEVEL = 223\nEXTRAVERSION =\nNAME = Dare mighty things\n"


def kernel_like(root: Path) -> Path:
    (root / "kernel").mkdir(parents=True)
    (root / "Makefile").write_text(MAKEFILE)
    (root / "Kconfig").write_text('mainmenu "Linux"\n')
    (root / "kernel/ptrace.c").write_text("int ptrace;\n")
    (root / ".gitignore").write_text("*.o\n")
    return root


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = kernel_like(tmp_path / "linux")
    capture([*GIT, "init", "-q"], cwd=root)
    capture([*GIT, "add", "-A"], cwd=root)
    capture([*GIT, "commit", "-q", "-m", "base"], cwd=root)
    return root


def test_an_unchanged_checkout_has_the_commit_tree_and_no_changes(repo: Path) -> None:
    state = usertree.tree_state(repo)
    assert state.kind == "git" and state.version == "5.10.223"
    assert state.base == capture(["git", "rev-parse", "HEAD^{tree}"], cwd=repo).strip()
    assert state.changes == ()
    assert usertree.tree_state(repo).digest() == state.digest()


def test_a_tracked_edit_changes_the_key_and_is_named(repo: Path) -> None:
    before = usertree.tree_state(repo)
    (repo / "kernel/ptrace.c").write_text("int ptrace = 1;\n")
    after = usertree.tree_state(repo)
    assert [name for name, _ in after.changes] == ["kernel/ptrace.c"]
    assert after.digest() != before.digest()
    capture([*GIT, "add", "kernel/ptrace.c"], cwd=repo)  # staged: still uncommitted, the same content
    assert usertree.tree_state(repo).digest() == after.digest()


def test_committing_the_edit_gives_the_same_key_as_a_fresh_clone(repo: Path, tmp_path: Path) -> None:
    (repo / "kernel/ptrace.c").write_text("int ptrace = 1;\n")
    capture([*GIT, "commit", "-q", "-am", "edit"], cwd=repo)
    clone = tmp_path / "clone"
    capture(["git", "clone", "-q", str(repo), str(clone)])
    assert usertree.tree_state(clone).digest() == usertree.tree_state(repo).digest()


def test_an_untracked_file_counts_and_an_ignored_one_does_not(repo: Path) -> None:
    before = usertree.tree_state(repo)
    (repo / "kernel/ptrace.o").write_bytes(b"\x7fELF")  # ignored by .gitignore
    assert usertree.tree_state(repo).digest() == before.digest()
    (repo / "kernel/new.c").write_text("int added;\n")
    after = usertree.tree_state(repo)
    assert [name for name, _ in after.changes] == ["kernel/new.c"]
    assert after.digest() != before.digest()


def test_a_deleted_file_is_a_change(repo: Path) -> None:
    (repo / "kernel/ptrace.c").unlink()
    assert usertree.tree_state(repo).changes == (("kernel/ptrace.c", usertree.DELETED),)


def test_a_plain_tree_is_keyed_by_every_file(tmp_path: Path) -> None:
    root = kernel_like(tmp_path / "plain")
    state = usertree.tree_state(root)
    assert state.kind == "plain" and state.changes == ()
    (root / "kernel/ptrace.c").write_text("int ptrace = 2;\n")
    assert usertree.tree_state(root).digest() != state.digest()
    (root / "kernel/ptrace.c").write_text("int ptrace;\n")
    assert usertree.tree_state(root).digest() == state.digest()


def test_a_plain_tree_inside_another_repository_is_not_keyed_by_that_repository(repo: Path) -> None:
    inner = kernel_like(repo / "sub")
    assert usertree.tree_state(inner).kind == "plain"


def test_keying_never_writes_to_the_tree(repo: Path) -> None:
    (repo / "kernel/ptrace.c").write_text("int ptrace = 1;\n")
    (repo / "untracked.c").write_text("x\n")
    before = {p: p.stat().st_mtime_ns for p in repo.rglob("*") if ".git" not in p.parts}
    status = capture(["git", "status", "--porcelain", "--ignored"], cwd=repo)
    usertree.tree_state(repo)
    assert capture(["git", "status", "--porcelain", "--ignored"], cwd=repo) == status
    assert {p: p.stat().st_mtime_ns for p in repo.rglob("*") if ".git" not in p.parts} == before


@pytest.mark.parametrize("files", [{}, {"Makefile": "all:\n", "Kconfig": ""}])
def test_a_directory_that_is_not_a_kernel_tree_is_a_usage_error(
    tmp_path: Path, files: dict[str, str]
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(usertree.TreeError, match="Linux source tree"):
        usertree.tree_state(tmp_path)
    with pytest.raises(usertree.TreeError, match="no such directory"):
        usertree.tree_state(tmp_path / "missing")


def test_bisecting_follows_git_bisect_state(repo: Path) -> None:
    assert not usertree.bisecting(repo)
    (repo / "kernel/ptrace.c").write_text("int ptrace = 1;\n")
    capture([*GIT, "commit", "-q", "-am", "second"], cwd=repo)
    capture([*GIT, "bisect", "start", "HEAD", "HEAD~1"], cwd=repo)
    assert usertree.bisecting(repo)
    capture([*GIT, "bisect", "reset"], cwd=repo)
    assert not usertree.bisecting(repo)
    assert not usertree.bisecting(Path(os.sep))


def test_a_miss_names_the_changed_files(repo: Path) -> None:
    """`why did this miss`: the plan of an edited tree against the plan of the clean one, in keys' words."""
    from kernel_ci.build import keys
    from kernel_ci.build.plan import make_plan

    clean = make_plan(tree=usertree.tree_state(repo), suites_dir=None, external_modules=False).plan
    (repo / "kernel/ptrace.c").write_text("int ptrace = 1;\n")
    (repo / "kernel/new.c").write_text("int added;\n")
    edited = make_plan(tree=usertree.tree_state(repo), suites_dir=None, external_modules=False).plan
    assert edited.recipe_key() != clean.recipe_key()
    text = keys.explain_miss(edited.recipe_inputs(), [("clean", clean.recipe_inputs())]).render()
    assert "file kernel/ptrace.c: edited (uncommitted)" in text
    assert "file kernel/new.c: edited (uncommitted)" in text
    assert "2 input(s) differ" in text.replace("inputs differ", "input(s) differ")  # the commit is the same
    assert clean.source[0].render().startswith("linux-5.10.223 tree git-tree:")


# --- the baseline of a --tree run: --base REV, else the merge-base with the upstream branch --------------


def test_base_names_a_commit_and_a_bad_one_is_a_usage_error(repo: Path) -> None:
    head = capture(["git", "rev-parse", "HEAD"], cwd=repo).strip()
    assert usertree.resolve_commit(repo, "HEAD") == head
    for bad in ("no-such-branch", "--output=x", "HEAD^{tree}"):
        with pytest.raises(usertree.TreeError, match="--base"):
            usertree.resolve_commit(repo, bad)


def test_the_default_base_is_the_merge_base_with_the_upstream_branch(repo: Path, tmp_path: Path) -> None:
    assert usertree.upstream_merge_base(repo) is None  # no upstream: no default (flow: no baseline)
    upstream = capture(["git", "rev-parse", "HEAD"], cwd=repo).strip()
    clone = tmp_path / "clone"
    capture(["git", "clone", "-q", str(repo), str(clone)])
    (clone / "kernel/ptrace.c").write_text("int ptrace = 1;\n")
    capture([*GIT, "commit", "-q", "-am", "the change under test"], cwd=clone)
    assert usertree.upstream_merge_base(clone) == upstream


def test_a_base_checkout_is_the_commit_and_writes_nothing_into_the_user_s_repository(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERNEL_CI_CACHE", str(tmp_path / "cache"))
    base = capture(["git", "rev-parse", "HEAD"], cwd=repo).strip()
    (repo / "kernel/ptrace.c").write_text("int ptrace = 2;\n")
    capture([*GIT, "commit", "-q", "-am", "change"], cwd=repo)
    before = sorted(str(p.relative_to(repo)) for p in (repo / ".git").rglob("*") if "objects" not in p.parts)
    checkout = usertree.base_checkout(repo, base)
    assert (checkout / "kernel/ptrace.c").read_text() == "int ptrace;\n"
    state = usertree.tree_state(checkout)
    assert state.kind == "git" and state.changes == ()
    assert state.base == capture(["git", "rev-parse", f"{base}^{{tree}}"], cwd=repo).strip()
    assert usertree.base_checkout(repo, base) == checkout  # made once
    after = sorted(str(p.relative_to(repo)) for p in (repo / ".git").rglob("*") if "objects" not in p.parts)
    assert after == before
