"""`kernel-ci bisect GOOD BAD`: drive `git bisect run` on the user's tree with `kernel-ci test --bisect`.

A thin driver over git's own bisect (which already knows how to pick commits and skip ones that cannot be
tested); what kernel-ci adds is the step command, whose exit code says good/bad/skip (core.errors'
bisect mapping), and the per-tree object directory, which makes every step an incremental build and a
revisited commit a build cache hit.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kernel_ci.build import tree as usertree
from kernel_ci.core.console import step
from kernel_ci.core.errors import UsageError
from kernel_ci.core.proc import capture, run

_FIRST_BAD_RE = re.compile(r"^([0-9a-f]{7,64}) is the first bad commit$")


class BisectError(UsageError):
    """The tree cannot be bisected as asked (exit 2); the message says why and what to do."""


@dataclass(frozen=True)
class BisectResult:
    first_bad: str | None  # None: git bisect ended without one (every candidate skipped)
    subject: str
    log: str  # `git bisect log`: replayable with `git bisect replay`


def _git(tree: Path, *args: str) -> str:
    return capture(["git", "-C", tree, *args])


def check_tree(tree: Path, good: str, bad: str) -> None:
    """A git tree, not already bisecting, with no uncommitted tracked change (git would carry it along)."""
    if not usertree.is_git_tree(tree):
        raise BisectError(f"{tree} is not the top of a git checkout: bisect needs its history")
    if usertree.bisecting(tree):
        raise BisectError(f"{tree} is already in a git bisect: finish it or run `git bisect reset`")
    if capture(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"]).strip():
        raise BisectError(f"{tree} has uncommitted changes: commit or stash them before bisecting")
    for revision in (good, bad):
        if not capture(
            ["git", "-C", tree, "rev-parse", "--verify", "-q", revision + "^{commit}"], check=False
        ):
            raise BisectError(f"{revision!r} is not a commit of {tree}")


def step_command(tree: Path, output: Path, test_args: Sequence[str]) -> list[str]:
    """What `git bisect run` runs at each commit: this very kernel-ci, testing the tree in bisect mode."""
    return [
        sys.executable, "-m", "kernel_ci.cli.main", "--output", str(output),
        "test", "--tree", str(tree), "--bisect", *test_args,
    ]  # fmt: skip


def bisect(tree: Path, good: str, bad: str, output: Path, test_args: Sequence[str]) -> BisectResult:
    """Bisect between good and bad with `kernel-ci test`; the tree is reset to where it was afterwards."""
    tree = tree.expanduser().resolve()
    check_tree(tree, good, bad)
    step(f"git bisect {good}..{bad} in {tree}")
    _git(tree, "bisect", "start", bad, good)
    try:
        done = run(["git", "-C", tree, "bisect", "run", *step_command(tree, output, test_args)], check=False)
        log = _git(tree, "bisect", "log")
    finally:
        _git(tree, "bisect", "reset")
    first_bad = next(
        (m.group(1) for line in done.output.splitlines() if (m := _FIRST_BAD_RE.match(line))), None
    )
    subject = _git(tree, "log", "-1", "--format=%s", first_bad).strip() if first_bad else ""
    return BisectResult(first_bad, subject, log)


def summary(result: BisectResult) -> str:
    if result.first_bad is None:
        return "git bisect found no first bad commit (every candidate was skipped?); see the log above"
    return f"first bad commit: {result.first_bad} {result.subject}"


__all__ = ["BisectError", "BisectResult", "bisect", "check_tree", "step_command", "summary"]
