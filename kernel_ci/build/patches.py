"""Kernel patch series: find them, check them, apply them to a source tree, export and digest them.

A series is a folder ``kernel-patches/<name>/`` holding a quilt ``series`` file (one patch file name
per line, in order; ``#`` comments and blank lines ignored; quilt's ``-p1`` option accepted, any other
strip level rejected), the ``git format-patch`` patches it lists (against the vanilla tree, applied
with ``patch -p1``), a ``README.md`` and optional kconfig fragments ``*.config``.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kernel_ci.build.records import PatchRejection, header_lines
from kernel_ci.core.errors import BuildError, InfrastructureError
from kernel_ci.core.proc import capture, run

SERIES_FILE = "series"
PATCH_SUFFIXES = (".patch", ".diff")
# --fuzz=0: a hunk whose context lines do not all match is refused, as `git am` refuses it. GNU patch's
# default (fuzz 2) silently drops up to two context lines, which can put a change in the wrong place.
# An offset (the same context at another line) still applies, as it does for git apply.
PATCH_ARGS = ("-p1", "--forward", "--batch", "--no-backup-if-mismatch", "--fuzz=0")
OUTPUT_TAIL_LINES = 40


class PatchError(BuildError):
    """Base of every error this module raises."""


class SeriesError(PatchError):
    """A series folder (or the request for one) is malformed."""


class PatchToolMissingError(InfrastructureError, PatchError):
    """GNU patch is not installed."""


class PatchApplyError(PatchError):
    """A patch does not apply; names the patch, the target file(s) and the failed hunk(s)."""

    def __init__(
        self,
        series: str,
        patch_file: str,
        target_file: str | None,
        hunk: tuple[int, ...],
        output: str,
        *,
        problems: Sequence[str] = (),
        hint: str = "",
        tree: Path | None = None,
        partially_applied: bool = False,
    ) -> None:
        self.series = series
        self.patch_file = patch_file
        self.target_file = target_file
        self.hunk = hunk
        self.output = output
        self.problems = tuple(problems)
        self.hint = hint
        self.tree = tree
        self.partially_applied = partially_applied
        self.rejection = PatchRejection(
            series, patch_file, target_file, self.problems, hint, str(tree) if tree is not None else None
        )
        where = f" to {tree}" if tree is not None else ""
        lines = [f"patch {series}/{patch_file} does not apply{where}:"]
        lines.extend(
            f"  {problem}" for problem in self.problems or ["(patch gave no details; see its output)"]
        )
        if partially_applied:
            lines.append(
                "  the dry run had succeeded, so the tree is now PARTIALLY patched: "
                "start again from a fresh copy of the source"
            )
        else:
            lines.append("  the tree was left untouched by this patch (the dry run failed)")
        if hint:
            lines.append(f"hint: {hint}")
        tail = "\n".join(output.rstrip().splitlines()[-OUTPUT_TAIL_LINES:])
        lines.append(f"--- output of patch ---\n{tail}")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Series:
    name: str
    directory: Path
    patches: tuple[Path, ...]  # in series order
    fragments: tuple[Path, ...]  # *.config files in the series directory, sorted

    def patch_names(self) -> list[str]:
        """ "series/patchfile" for each patch, in order."""
        return [self.patch_name(patch) for patch in self.patches]

    def patch_name(self, patch: Path) -> str:
        return f"{self.name}/{patch.relative_to(self.directory).as_posix()}"


# -- discovering series -------------------------------------------------------------------------


def discover_series(root: Path, names: Sequence[str] | None = None) -> list[Series]:
    """All series folders under root (sorted by name), or exactly the named ones in the order given. A project
    without kernel-patches/ (a bare one) has no series; naming one there is an error."""
    root = Path(root)
    if not root.is_dir() and not names:
        return []
    if not root.is_dir():
        raise SeriesError(
            f"patch series folder {root} does not exist (expected kernel-patches/<series>/series)"
        )
    known = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if names is None:
        return [load_series(root / name) for name in known]
    duplicates = sorted({name for name in names if list(names).count(name) > 1})
    if duplicates:
        raise SeriesError(f"patch series requested more than once: {', '.join(duplicates)}")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SeriesError(
            f"unknown patch series {', '.join(repr(n) for n in unknown)}; "
            f"known series in {root}: {', '.join(known) if known else '(none)'}"
        )
    return [load_series(root / name) for name in names]


def load_series(directory: Path) -> Series:
    """Read and check one series folder: its series file must list exactly the patches present."""
    directory = Path(directory)
    series_file = directory / SERIES_FILE
    if not series_file.is_file():
        raise SeriesError(
            f"{directory} has no '{SERIES_FILE}' file: add one listing its patches in order, one per line"
        )
    listed: list[Path] = []
    for number, raw in enumerate(series_file.read_text(encoding="utf-8").splitlines(), start=1):
        line = re.split(r"\s#", raw, maxsplit=1)[0].strip()
        if not line or line.startswith("#"):
            continue
        where = f"{series_file}:{number}"
        name, *options = line.split()
        if options not in ([], ["-p1"], ["-p", "1"]):
            raise SeriesError(
                f"{where}: unsupported options {' '.join(options)!r} after {name}: only -p1 is supported "
                "(git format-patch style a/ b/ paths); regenerate the patch with git format-patch"
            )
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise SeriesError(f"{where}: {name!r} must be a file name inside {directory}")
        patch = directory / relative
        if not patch.is_file():
            present = sorted(p.name for p in _patch_files(directory))
            raise SeriesError(
                f"{where} names {name!r}, which does not exist in {directory}; "
                f"patches present: {', '.join(present) if present else '(none)'}"
            )
        if patch in listed:
            raise SeriesError(f"{where}: {name!r} is listed twice")
        listed.append(patch)
    unlisted = sorted(p for p in _patch_files(directory) if p not in listed)
    if unlisted:
        names = ", ".join(p.relative_to(directory).as_posix() for p in unlisted)
        raise SeriesError(
            f"{directory} holds {names}, not listed in {series_file}: add it to the series file in the "
            "right position, or delete it if it is obsolete"
        )
    fragments = tuple(sorted(p for p in directory.glob("*.config") if p.is_file()))
    return Series(name=directory.name, directory=directory, patches=tuple(listed), fragments=fragments)


def _patch_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and p.name.endswith(PATCH_SUFFIXES)]


# -- reading patch headers ----------------------------------------------------------------------

_HUNK_RE = re.compile(r"@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")
_GIT_HEADER_RE = re.compile(r"(rename|copy) (from|to) (.+)")


def _unquote_git_path(text: str) -> str:
    if len(text) >= 2 and text.startswith('"') and text.endswith('"'):
        raw = codecs.decode(text[1:-1].encode("latin-1"), "unicode_escape")
        return raw.encode("latin-1").decode("utf-8", errors="replace")
    return text


def _strip_one(path: str) -> str | None:
    """The -p1 form of a header path ("a/init/Kconfig" -> "init/Kconfig"); None for /dev/null."""
    path = _unquote_git_path(path.split("\t", 1)[0].rstrip())
    if path == "/dev/null":
        return None
    parts = path.split("/", 1)
    return parts[1] if len(parts) == 2 and parts[1] else None


def patch_targets(patch_text: str) -> list[str]:
    """Every tree-relative path a -p1 patch modifies, creates, deletes or renames, in order of appearance."""
    targets: list[str] = []

    def add(path: str | None) -> None:
        if path is not None and path not in targets:
            targets.append(path)

    for _number, line in header_lines(patch_text):
        if _HUNK_RE.match(line):
            continue
        if line.startswith(("--- ", "+++ ")):
            add(_strip_one(line[4:]))
        elif git := _GIT_HEADER_RE.fullmatch(line):
            add(_unquote_git_path(git.group(3)))
    for target in targets:
        pure = PurePosixPath(target)
        if pure.is_absolute() or ".." in pure.parts:
            raise SeriesError(f"the patch touches {target!r}, a path outside the source tree")
    return targets


# -- applying -----------------------------------------------------------------------------------


def check_patch_tool() -> None:
    """Fail clearly when GNU patch is missing (or another patch program is installed)."""
    if shutil.which("patch") is None:
        raise PatchToolMissingError(
            "GNU patch is not installed, and it is needed to apply kernel patch series: "
            "apt-get install patch (dnf install patch; apk add patch)"
        )
    version = capture(["patch", "--version"], check=False)
    if "GNU patch" not in version:
        raise PatchToolMissingError(
            f"'patch' on PATH ({shutil.which('patch')}) is not GNU patch ({version.strip()[:60]!r}); "
            "install GNU patch: apt-get install patch"
        )


def break_hardlinks(tree: Path, relative_paths: Sequence[str]) -> list[str]:
    """Give every listed existing file of tree its own inode (copy, then rename over it).

    The work tree is a ``cp -al`` of a pristine tree; without this a patch edit could reach the
    pristine copy through the shared inode. Returns the paths whose links were broken.
    """
    broken: list[str] = []
    for relative in relative_paths:
        path = tree / relative
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if not path.is_file() or path.is_symlink() or info.st_nlink < 2:
            continue
        private = path.with_name(f".{path.name}.kci-unlink.{os.getpid()}")
        try:
            shutil.copy2(path, private)
            os.replace(private, path)
        finally:
            if private.exists():
                private.unlink()
        broken.append(relative)
    return broken


def apply_series(series: Sequence[Series], tree: Path) -> list[str]:
    """Apply every patch of every series, in order, to tree; returns the "series/patchfile" names applied.

    Each patch is first tried with --dry-run, so a patch that does not apply leaves the tree as the
    previous patches left it; then the hard links of the files it touches are broken and it is applied.
    """
    tree = Path(tree)
    if not tree.is_dir():
        raise PatchError(f"cannot apply patches: source tree {tree} does not exist")
    check_patch_tool()
    applied: list[str] = []
    for one in series:
        for patch in one.patches:
            _apply_one(one, patch, tree)
            applied.append(one.patch_name(patch))
    return applied


def _apply_one(series: Series, patch: Path, tree: Path) -> None:
    patch = patch.resolve()
    relative_name = patch.relative_to(series.directory.resolve()).as_posix()
    targets = patch_targets(patch.read_text(encoding="utf-8", errors="replace"))
    argv = ["patch", *PATCH_ARGS, "-i", str(patch)]
    dry = run([*argv, "--dry-run"], cwd=tree, check=False, quiet=True)
    if dry.returncode != 0:
        raise _apply_error(series.name, relative_name, dry.output, tree, partially_applied=False)
    break_hardlinks(tree, targets)
    real = run(argv, cwd=tree, check=False, quiet=True)
    if real.returncode != 0:
        raise _apply_error(series.name, relative_name, real.output, tree, partially_applied=True)


@dataclass(frozen=True)
class _Failure:
    target: str | None
    problem: str
    hunk: int | None = None
    kind: str = "hunk"  # hunk | missing | applied | exists | malformed | other


_FILE_RE = re.compile(r"(?:patching|checking) file (.+)")
_HUNK_FAILED_RE = re.compile(r"Hunk #(\d+) FAILED at (\d+)(.*)\.")
_MISSING_RE = re.compile(r"can't find file to patch at input line \d+")
_QUOTED_HEADER_RE = re.compile(r"\|(?:\+\+\+|---) (.+)")
_CREATE_EXISTS_RE = re.compile(r"The next patch would create the file (.+),")
_DELETE_MISSING_RE = re.compile(r"The next patch would delete the file (.+),")


def _unquote_patch_name(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("'\\''", "'")
    return text


def parse_patch_failures(output: str) -> list[_Failure]:
    """What GNU patch said went wrong, file by file."""
    failures: list[_Failure] = []
    current: str | None = None
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if match := _FILE_RE.fullmatch(line):
            current = _unquote_patch_name(match.group(1))
        elif match := _HUNK_FAILED_RE.fullmatch(line):
            hunk = int(match.group(1))
            extra = match.group(3).strip()
            detail = f" {extra}" if extra else ""
            failures.append(_Failure(current, f"hunk #{hunk} FAILED at line {match.group(2)}{detail}", hunk))
        elif _MISSING_RE.match(line):
            missing = None
            for following in lines[index + 1 :]:
                if following.startswith("No file to patch"):
                    break
                header = _QUOTED_HEADER_RE.match(following)
                if header:
                    missing = _strip_one(header.group(1)) or missing
            current = missing
            failures.append(_Failure(missing, "file to patch not found in the tree", kind="missing"))
        elif line.startswith("Reversed (or previously applied) patch detected"):
            failures.append(_Failure(current, "already applied (patch detected as reversed)", kind="applied"))
        elif match := _CREATE_EXISTS_RE.match(line):
            target = _unquote_patch_name(match.group(1))
            failures.append(_Failure(target, "would be created, but already exists", kind="exists"))
        elif match := _DELETE_MISSING_RE.match(line):
            target = _unquote_patch_name(match.group(1))
            failures.append(_Failure(target, "would be deleted, but does not exist", kind="missing"))
        elif line.startswith("patch: **** "):
            failures.append(_Failure(current, line.removeprefix("patch: **** ").strip(), kind="malformed"))
    return failures


_HINTS = {
    "hunk": "the patch does not match this tree's text exactly (fuzz is refused, as git am refuses it): "
    "it was made against another version, or an earlier "
    "patch changed the same lines. Rebase it onto the vanilla source plus the patches before it "
    "(git am / git rebase), then regenerate it with git format-patch",
    "missing": "the file is not in this tree: the patch is for another kernel version, needs an earlier "
    "patch that creates the file (check the order in the series file), or is not a -p1 (a/ b/) patch",
    "applied": "the change is already in the tree: the tree is not pristine, the patch is listed twice, "
    "or this kernel version already contains it upstream (drop it from the series)",
    "exists": "the file the patch creates already exists: the tree is not pristine, the patch is listed "
    "twice, or this kernel version already has the file (drop or rebase the patch)",
    "malformed": "the patch file is damaged (edited by hand, or mangled by a mailer or editor that "
    "changed whitespace): regenerate it with git format-patch",
}


def _apply_error(
    series: str, patch_file: str, output: str, tree: Path, partially_applied: bool
) -> PatchApplyError:
    failures = parse_patch_failures(output)
    first_target = next((f.target for f in failures if f.target is not None), None)
    hunks = tuple(f.hunk for f in failures if f.target == first_target and f.hunk is not None)
    problems = [f"{f.target or '(unknown file)'}: {f.problem}" for f in failures]
    kinds = [f.kind for f in failures]
    hint = "\nhint: ".join(
        _HINTS[kind] for kind in ("malformed", "missing", "applied", "exists", "hunk") if kind in kinds
    )
    return PatchApplyError(
        series,
        patch_file,
        first_target,
        hunks,
        output,
        problems=problems,
        hint=hint or "read the output of patch below",
        tree=tree,
        partially_applied=partially_applied,
    )


# -- exporting and digesting --------------------------------------------------------------------


def export_series(series: Series, dest_dir: Path) -> Path:
    """Write ``<dest_dir>/<name>.mbox``: the series' patches concatenated in order, for ``git am``."""
    if not series.patches:
        raise SeriesError(f"series {series.name} has no patches, so there is nothing to export")
    chunks: list[bytes] = []
    for patch in series.patches:
        data = patch.read_bytes()
        if not data.startswith(b"From "):
            raise SeriesError(
                f"{patch} does not start with a 'From <commit> <date>' line, so it is not a git "
                "format-patch file and cannot go into an mbox; regenerate it with git format-patch"
            )
        chunks.append(data if data.endswith(b"\n") else data + b"\n")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    destination = dest_dir / f"{series.name}.mbox"
    partial = dest_dir / f".{series.name}.mbox.{os.getpid()}.tmp"
    try:
        partial.write_bytes(b"".join(chunks))
        os.replace(partial, destination)
    finally:
        if partial.exists():
            partial.unlink()
    return destination


def series_digest(series: Series) -> dict[str, str]:
    """ "series/patchfile" -> sha256 hex of the patch file's bytes, in series order."""
    return {
        series.patch_name(patch): hashlib.sha256(patch.read_bytes()).hexdigest() for patch in series.patches
    }


# -- a series from outside (--patches) ------------------------------------------------------------------

EXTERNAL_SERIES = "patches"  # the series name of --patches in the plan, the metadata and the errors
_COVER_RE = re.compile(r"\[[^\]]*\b0+/\d+\]")  # "[PATCH 0/3]", "[PATCH v2 00/12]"
_DIFF_RE = re.compile(r"^(?:diff --git |--- \S)", re.MULTILINE)


def _messages(path: Path) -> list[tuple[str, bytes]]:
    """(name, raw message) of each mail: the files of a format-patch directory, or the mails of an mbox."""
    import mailbox

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(PATCH_SUFFIXES))
        if not files:
            raise SeriesError(f"--patches {path}: no *.patch or *.diff file in this directory")
        return [(p.name, p.read_bytes()) for p in files]
    if not path.is_file():
        raise SeriesError(f"--patches {path}: no such file or directory")
    data = path.read_bytes()
    if not data.startswith(b"From "):
        raise SeriesError(
            f"--patches {path}: not an mbox (it does not start with a 'From ' line); pass the output of "
            "git format-patch (a directory or --stdout), or what `b4 am` wrote (.mbx)"
        )
    box = mailbox.mbox(path, create=False)
    try:
        return [
            (f"{path.name} message {n}", box.get_bytes(key, from_=True))
            for n, key in enumerate(box.keys(), 1)
        ]
    finally:
        box.close()


def _subject(raw: bytes) -> str:
    from email.parser import BytesHeaderParser

    return " ".join(str(BytesHeaderParser().parsebytes(raw).get("Subject", "")).split())


def load_external(path: Path, staging: Path) -> Series:
    """A series from outside the repository, strictly: each mail must carry a patch (a cover letter,
    "[PATCH 0/N]", is left out); the patches are written to staging as a quilt series, in mail order."""
    path = Path(path)
    picked: list[tuple[str, bytes]] = []
    for name, raw in _messages(path):
        subject = _subject(raw)
        has_diff = _DIFF_RE.search(raw.decode("utf-8", errors="replace")) is not None
        if not has_diff and _COVER_RE.search(subject):
            continue  # the cover letter: the series' description, not a change
        if not has_diff:
            raise SeriesError(
                f"--patches {path}: {name} ({subject or 'no subject'!r}) holds no patch: "
                "remove it (a reply or a note), keep only the series' patches and its cover letter"
            )
        picked.append((subject, raw))
    if not picked:
        raise SeriesError(f"--patches {path}: no patch in it (only a cover letter?)")
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    names = []
    for number, (_subject_text, raw) in enumerate(picked, start=1):
        name = f"{number:04d}.patch"
        (staging / name).write_bytes(raw)
        names.append(name)
    (staging / SERIES_FILE).write_text("".join(f"{n}\n" for n in names))
    loaded = load_series(staging)
    return Series(EXTERNAL_SERIES, loaded.directory, loaded.patches, ())
