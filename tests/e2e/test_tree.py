"""End to end: `--tree` on a real git tree (5.10.223 committed into a scratch repository).

An edit rebuilds incrementally in the tree's persistent object dir and never writes to the tree; a commit is
a cache hit from a second clone; `git bisect run kernel-ci test --tree .` finds a planted bad commit.
Every series of this repository is committed into the scratch tree, and every build of it is given the
series' fragments: the tree then holds the CI kernel's sources and is built with its config, so its first
build is ccache-warm after any e2e build of the CI kernel (on a fresh CI machine, three cold compiles fewer:
the tree, its edit and the bisect's steps would otherwise each compile a config of their own). The ci-smoke
suite passes there, and the bad commit changes the text of /proc/ci-smoke, which it reads. The packaged
smoke-c passes on the edited tree.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from kernel_ci.build import source
from kernel_ci.build.patches import discover_series
from kernel_ci.cache.store import LocalStore
from kernel_ci.core.paths import CHECKOUT, KERNEL_PATCHES
from kernel_ci.core.proc import capture, run
from kernel_ci.flow.build import BuildRequest, build
from kernel_ci.flow.test import TestOptions, run_tests
from kernel_ci.report.model import Outcome

pytestmark = pytest.mark.slow

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false"]
SERIES = discover_series(KERNEL_PATCHES)
FRAGMENTS = [fragment for series in SERIES for fragment in series.fragments]
PROC_TEXT = "ci-smoke: patch applied"


def _commit(tree: Path, message: str) -> str:
    capture([*GIT, "add", "-A"], cwd=tree)
    capture([*GIT, "commit", "-q", "-m", message], cwd=tree)
    return capture(["git", "rev-parse", "HEAD"], cwd=tree).strip()


def _request(tree: Path, out: Path) -> BuildRequest:
    return BuildRequest(tree=tree, fragments=FRAGMENTS, output=out / "build")


def _snapshot(tree: Path) -> tuple[str, dict[str, int]]:
    status = capture(["git", "status", "--porcelain", "--ignored"], cwd=tree)
    mtimes: dict[str, int] = {}
    for root, dirs, files in os.walk(tree):  # .git pruned, not filtered: git's own gc rewrites it meanwhile
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in [*dirs, *files]:
            path = os.path.join(root, name)
            mtimes[path] = os.lstat(path).st_mtime_ns
    return status, mtimes


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pristine = source.resolve("5.10.223").tree
    tree = tmp_path_factory.mktemp("tree") / "linux"
    run(["cp", "-a", pristine, tree], quiet=True)
    capture([*GIT, "init", "-q"], cwd=tree)
    capture(["git", "config", "gc.auto", "0"], cwd=tree)  # no background gc racing the snapshots
    _commit(tree, "Linux 5.10.223")
    for series in SERIES:  # the CI kernel's sources, as commits
        capture([*GIT, "am", "-q", *map(str, series.patches)], cwd=tree)
    return tree


def test_an_edit_rebuilds_incrementally_never_writes_the_tree_and_passes(repo: Path, tmp_path: Path) -> None:
    # a build cache of the test's own: both builds compile (ccache keeps the first cheap). From the shared
    # cache the first would be restored (an earlier run built it), leaving this new tree path's object dir
    # empty, and the edit, the same every run, would be restored as well: nothing incremental to measure.
    store = LocalStore(tmp_path / "build-cache")
    first = build(_request(repo, tmp_path), store)
    assert not first.cache_hit
    ptrace = repo / "kernel/ptrace.c"
    ptrace.write_text(ptrace.read_text() + "/* an edit */\n")
    before = _snapshot(repo)

    edited = build(_request(repo, tmp_path), store)

    assert not edited.cache_hit and edited.key != first.key
    assert edited.metadata.inputs["tree-file:kernel/ptrace.c"]
    assert int(edited.metadata.kbuild["steps"]) < 100  # incremental: a handful of objects, not the kernel
    assert _snapshot(repo) == before  # the build wrote nothing into the tree
    report = run_tests(TestOptions(kernel_dir=edited.output, output=tmp_path / "run", suites=["smoke-c"]))
    assert report.outcome == Outcome.PASS


def test_a_commit_is_a_cache_hit_in_a_second_clone(repo: Path, tmp_path: Path) -> None:
    _commit(repo, "ptrace: an edit")
    built = build(_request(repo, tmp_path))
    clone = tmp_path / "clone"
    capture(["git", "clone", "-q", str(repo), str(clone)])
    again = build(_request(clone, tmp_path / "clone-out"))
    assert again.cache_hit and again.key == built.key


def test_git_bisect_run_finds_the_planted_bad_commit(repo: Path, tmp_path: Path) -> None:
    good = capture(["git", "rev-parse", "HEAD"], cwd=repo).strip()
    smoke = repo / "kernel/ci_smoke.c"
    comment = repo / "kernel/ptrace.c"
    comment.write_text(comment.read_text() + "/* step 1 */\n")
    _commit(repo, "ptrace: step 1")
    smoke.write_text(smoke.read_text().replace(PROC_TEXT, "ci-smoke: broken"))
    bad = _commit(repo, "proc: break /proc/ci-smoke")
    comment.write_text(comment.read_text() + "/* step 3 */\n")
    _commit(repo, "ptrace: step 3")
    # this checkout as the project (its suites' and modules' needs are in the CI kernel's config: the bisect's
    # builds are then ccache-warm); no series is applied to a --tree unless asked
    capture([*GIT, "bisect", "start", "HEAD", good], cwd=repo)
    try:
        step = [
            sys.executable,
            "-m",
            "kernel_ci.cli.main",
            "--project",
            str(CHECKOUT),
            "-o",
            str(tmp_path / "out"),
        ]
        step += ["test", "--tree", ".", "--suite", "ci-smoke"]
        step += [option for fragment in FRAGMENTS for option in ("--fragment", str(fragment))]
        done = run([*GIT, "bisect", "run", *step], cwd=repo, check=False)
    finally:
        capture([*GIT, "bisect", "reset"], cwd=repo)
    found = re.search(r"^([0-9a-f]{40}) is the first bad commit$", done.output, re.MULTILINE)
    assert found and found.group(1) == bad
    assert "bisect mode" in done.output
