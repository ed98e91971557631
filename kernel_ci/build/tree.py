"""A user's kernel tree as the build's source: what it holds (its content key) and whether it is bisecting.

Hand-written because the key must be what git would commit, cheaply: a git tree is its HEAD's tree id plus
the uncommitted changes (tracked edits and untracked files, never ignored ones, as `git status` sees them),
so an unchanged checkout is a cache hit and a changed one names the changed files in the miss explanation.
A plain directory (no git) is keyed by hashing every file. The tree is only ever read: the build mounts it
read-only and writes its objects elsewhere (make O=).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from kernel_ci.build.source import locked
from kernel_ci.core.errors import UsageError
from kernel_ci.core.paths import cache_dir
from kernel_ci.core.proc import capture, run

DELETED = "deleted"
_VERSION_RE = re.compile(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)[ \t]*=[ \t]*(.*)$", re.MULTILINE)


class TreeError(UsageError):
    """The --tree directory cannot be used as a kernel source (exit 2)."""


@dataclass(frozen=True)
class TreeState:
    """A tree's content, as keys need it: the base and the files that differ from it."""

    path: Path  # resolved
    kind: str  # "git" | "plain"
    base: str  # git: the HEAD commit's tree id; plain: sha256 over every file
    changes: tuple[tuple[str, str], ...]  # git: (path, sha256 | "deleted") of each uncommitted change
    version: str  # from the top Makefile, e.g. "5.10.223"

    @property
    def scheme(self) -> str:
        return "git-tree" if self.kind == "git" else "files-sha256"

    def digest(self) -> str:
        """One digest of the whole content (base and changes): equal digests, equal trees."""
        text = "\n".join([self.kind, self.base, *(f"{p}\0{d}" for p, d in self.changes)])
        return hashlib.sha256(text.encode()).hexdigest()


def kernel_version(tree: Path) -> str:
    """The version the top Makefile declares ("5.10.223"); the tree must look like a kernel source."""
    makefile = tree / "Makefile"
    if not makefile.is_file() or not (tree / "Kconfig").is_file():
        raise TreeError(f"{tree} is not a Linux source tree (no top-level Makefile and Kconfig)")
    fields = dict(_VERSION_RE.findall(makefile.read_text(errors="replace")[:4000]))
    if "VERSION" not in fields or "PATCHLEVEL" not in fields:
        raise TreeError(f"{makefile} declares no VERSION/PATCHLEVEL: is it a Linux source tree?")
    numbers = [fields[name].strip() for name in ("VERSION", "PATCHLEVEL", "SUBLEVEL") if fields.get(name)]
    return ".".join(numbers) + fields.get("EXTRAVERSION", "").strip()


def is_git_tree(tree: Path) -> bool:
    """True when tree is the top of a git work tree (not merely inside another repository)."""
    top = capture(["git", "-C", tree, "rev-parse", "--show-toplevel"], check=False).strip()
    return bool(top) and Path(top).resolve() == tree.resolve()


def _git(tree: Path, *args: str) -> str:
    return capture(["git", "-C", tree, *args])


def _split_z(text: str) -> list[str]:
    return [item for item in text.split("\0") if item]


def _file_digest(path: Path) -> str:
    if path.is_symlink():
        return "symlink:" + hashlib.sha256(os.readlink(path).encode()).hexdigest()
    if not path.exists():
        return DELETED
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def uncommitted_files(tree: Path) -> list[str]:
    """Tracked files that differ from HEAD (staged or not) and untracked files not ignored, sorted."""
    tracked = _split_z(_git(tree, "diff", "HEAD", "--name-only", "--no-renames", "-z"))
    untracked = _split_z(_git(tree, "ls-files", "-o", "--exclude-standard", "-z"))
    return sorted(set(tracked) | set(untracked))


def git_state(tree: Path) -> TreeState:
    base = capture(["git", "-C", tree, "rev-parse", "--verify", "-q", "HEAD^{tree}"], check=False).strip()
    if not base:
        raise TreeError(f"{tree} is a git repository without a commit: commit the source first")
    changes = tuple((name, _file_digest(tree / name)) for name in uncommitted_files(tree))
    return TreeState(tree, "git", base, changes, kernel_version(tree))


def plain_state(tree: Path) -> TreeState:
    """Every regular file and symlink under tree (sorted), hashed: the key of a tree without git."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(tree):
        dirs.sort()
        for name in sorted(files):
            path = Path(root, name)
            relative = path.relative_to(tree).as_posix()
            digest.update(f"{relative}\0{_file_digest(path)}\n".encode())
    return TreeState(tree, "plain", digest.hexdigest(), (), kernel_version(tree))


def tree_state(path: Path) -> TreeState:
    """The content key of the tree at path (git when it is the top of a work tree, plain otherwise)."""
    tree = Path(path).expanduser().resolve()
    if not tree.is_dir():
        raise TreeError(f"--tree {path}: no such directory")
    kernel_version(tree)
    return git_state(tree) if is_git_tree(tree) else plain_state(tree)


def bisecting(path: Path) -> bool:
    """True while `git bisect` runs in the tree (git keeps BISECT_START in its git dir until reset)."""
    tree = Path(path).resolve()
    answer = capture(["git", "-C", tree, "rev-parse", "--git-path", "BISECT_START"], check=False).strip()
    if not answer:
        return False
    marker = Path(answer)
    return (marker if marker.is_absolute() else tree / marker).exists()


def resolve_commit(tree: Path, revision: str) -> str:
    """The commit id a revision (--base REV) names in the git tree; a usage error when it names none."""
    if not is_git_tree(tree):
        raise TreeError(f"--base {revision}: {tree} is not a git work tree, so it has no revisions")
    if revision.startswith("-"):
        raise TreeError(f"--base {revision}: not a revision")
    found = capture(
        ["git", "-C", tree, "rev-parse", "--verify", "-q", "--end-of-options", f"{revision}^{{commit}}"],
        check=False,
    ).strip()
    if not found:
        raise TreeError(f"--base {revision}: no such commit in {tree}")
    return found


def upstream_merge_base(tree: Path) -> str | None:
    """The merge-base of HEAD with the branch's upstream (what the branch's own commits apply on); None
    when the tree is not a git work tree or its branch has no upstream."""
    if not is_git_tree(tree):
        return None
    upstream = capture(["git", "-C", tree, "rev-parse", "-q", "--verify", "@{upstream}"], check=False).strip()
    if not upstream:
        return None
    return capture(["git", "-C", tree, "merge-base", "HEAD", upstream], check=False).strip() or None


def base_checkout(tree: Path, commit: str) -> Path:
    """A clean checkout of one commit of the user's git tree, made once per commit in the cache: a clone
    sharing the tree's objects (`git clone --shared`: nothing is written into the user's repository), so
    that the baseline of a --tree run builds like any --tree (keyed by the commit's tree id)."""
    work = cache_dir("tree-bases", commit)
    checkout = work / "src"
    with locked(work / "lock", f"another checkout of {commit[:12]}"):
        if (work / "done").is_file():
            return checkout
        if checkout.exists():
            shutil.rmtree(checkout)
        run(["git", "clone", "-q", "--shared", "--no-checkout", tree, checkout], quiet=True)
        run(["git", "-C", checkout, "checkout", "-q", "--detach", commit], quiet=True)
        (work / "done").write_text(f"{tree}\n")
    return checkout


def object_dir_name(tree: TreeState) -> str:
    """The persistent object directory of this tree path: edits keep it, so rebuilds stay incremental."""
    return hashlib.sha256(str(tree.path).encode()).hexdigest()[:16]


__all__ = [
    "TreeError",
    "TreeState",
    "base_checkout",
    "bisecting",
    "git_state",
    "is_git_tree",
    "kernel_version",
    "object_dir_name",
    "plain_state",
    "resolve_commit",
    "tree_state",
    "uncommitted_files",
    "upstream_merge_base",
]
