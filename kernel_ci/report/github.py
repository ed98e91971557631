"""GitHub Actions: workflow-command annotations and step summaries for a failed build.

Only active when the environment says the command runs in a workflow (``GITHUB_ACTIONS=true``): then a
patch that does not apply becomes one ``::error file=<patch>,line=<hunk header>,title=...::`` line per failed
hunk (an annotation on the matrix cell and, in a pull request, on the patch file's line), and a Markdown
section in ``$GITHUB_STEP_SUMMARY``. Anywhere else nothing is printed but the plain report.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from kernel_ci.build.records import PatchRejection, header_lines
from kernel_ci.core.paths import KERNEL_PATCHES, REPO_ROOT
from kernel_ci.report.compare import Comparison


def in_github_actions(env: Mapping[str, str] | None = None) -> bool:
    return (os.environ if env is None else env).get("GITHUB_ACTIONS") == "true"


def escape_data(text: str) -> str:
    """Escape a workflow command's message (what follows ``::``)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a workflow command's property value (file=, title=)."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(
    level: str, message: str, *, file: str | None = None, line: int | None = None, title: str | None = None
) -> str:
    """One ``::error``/``::warning``/``::notice`` workflow command."""
    if level not in ("error", "warning", "notice"):
        raise ValueError(f"annotation level must be error, warning or notice, not {level!r}")
    props = []
    if file is not None:
        props.append(f"file={escape_property(file)}")
    if line is not None:
        props.append(f"line={line}")
    if title is not None:
        props.append(f"title={escape_property(title)}")
    head = f"::{level}" + (" " + ",".join(props) if props else "")
    return f"{head}::{escape_data(message)}"


# -- where a hunk is in the patch file -----------------------------------------------------------------

_DIFF_GIT = re.compile(r"diff --git (?:\"?a/)(.+?)\"? (?:\"?b/)(.+?)\"?$")
_HUNK = re.compile(r"@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")


def _header_path(line: str) -> str | None:
    """The -p1 path of a ---/+++ header line; None for /dev/null."""
    path = line[4:].split("\t", 1)[0].strip().strip('"')
    if path == "/dev/null" or "/" not in path:
        return None
    return path.split("/", 1)[1]


def hunk_lines(patch_text: str) -> dict[str, list[int]]:
    """Tree path -> the 1-based line numbers of its hunk headers in the patch file, in hunk order.

    GNU patch numbers hunks per file ("Hunk #2 FAILED"), so hunk N of a file is ``result[file][N-1]``.
    Hunk bodies are skipped by their lengths, so a removed line starting with "--- " is not a header.
    """
    found: dict[str, list[int]] = {}
    current: str | None = None
    old_path: str | None = None
    for number, line in header_lines(patch_text):
        if match := _DIFF_GIT.match(line):
            current = match.group(2)
        elif line.startswith("--- "):
            old_path = _header_path(line)
        elif line.startswith("+++ "):
            current = _header_path(line) or old_path or current
        elif _HUNK.match(line) and current is not None:
            found.setdefault(current, []).append(number)
    return found


# -- a patch failure, as a report -------------------------------------------------------------------------

_PROBLEM_HUNK = re.compile(r"^(?P<target>.+?): hunk #(?P<hunk>\d+) FAILED at line (?P<at>\d+)")


@dataclass(frozen=True)
class FailedHunk:
    """One thing that went wrong applying a patch: a hunk (hunk set), or a file-level problem."""

    target: str | None
    problem: str
    hunk: int | None = None
    patch_line: int | None = None  # where the hunk's @@ header is in the patch file


@dataclass(frozen=True)
class PatchFailure:
    kernel: str
    series: str
    patch_file: str  # as the repository names it, e.g. kernel-patches/ci-smoke/0001-x.patch
    target_file: str | None
    hunks: tuple[FailedHunk, ...]
    hint: str

    def text(self) -> str:
        """The plain report: patch file, target file, failed hunks, one per line."""
        lines = [
            f"patch does not apply to Linux {self.kernel}",
            f"  series:      {self.series}",
            f"  patch file:  {self.patch_file}",
            f"  target file: {self.target_file or '(unknown)'}",
        ]
        for hunk in self.hunks:
            where = f" (patch line {hunk.patch_line})" if hunk.patch_line is not None else ""
            lines.append(f"  failed:      {hunk.target or '(unknown file)'}: {hunk.problem}{where}")
        return "\n".join(lines)

    def annotations(self) -> list[str]:
        """One ``::error`` per failed hunk, on the hunk's line of the patch file."""
        title = f"{self.series}: patch does not apply to Linux {self.kernel}"
        out = []
        for hunk in self.hunks or (FailedHunk(self.target_file, "does not apply"),):
            message = (
                f"{Path(self.patch_file).name} does not apply to Linux {self.kernel}: "
                f"{hunk.target or '(unknown file)'}: {hunk.problem}"
            )
            if self.hint:
                message += f"\nhint: {self.hint}"
            out.append(annotation("error", message, file=self.patch_file, line=hunk.patch_line, title=title))
        return out

    def markdown(self) -> str:
        rows = "\n".join(
            f"| `{h.target or '(unknown)'}` | {h.problem} | {h.patch_line or ''} |" for h in self.hunks
        )
        return (
            f"### :x: `{self.series}` does not apply to Linux {self.kernel}\n\n"
            f"Patch file: `{self.patch_file}`\n\n"
            "| target file | problem | patch line |\n|---|---|---|\n"
            f"{rows}\n\n" + (f"> {self.hint.splitlines()[0]}\n" if self.hint else "")
        )


def _repo_relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO_ROOT.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def patch_failure(exc: PatchRejection, kernel: str, patches_root: Path | None = None) -> PatchFailure:
    """What a rejected patch (PatchApplyError.rejection) says, with each failed hunk located in its file."""
    patch_path = (patches_root or KERNEL_PATCHES) / exc.series / exc.patch_file
    try:
        lines = hunk_lines(patch_path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        lines = {}
    hunks = []
    for problem in exc.problems:
        match = _PROBLEM_HUNK.match(problem)
        if match:
            target, number = match.group("target"), int(match.group("hunk"))
            headers = lines.get(target, [])
            line = headers[number - 1] if 0 < number <= len(headers) else None
            hunks.append(FailedHunk(target, problem[len(target) + 2 :], number, line))
        else:
            target, _, what = problem.partition(": ")
            target_or_none = None if target.startswith("(") else target
            first = lines.get(target_or_none or "", [None])[0]
            hunks.append(FailedHunk(target_or_none, what or problem, None, first))
    return PatchFailure(
        kernel=kernel,
        series=exc.series,
        patch_file=_repo_relative(patch_path),
        target_file=exc.target_file,
        hunks=tuple(hunks),
        hint=exc.hint,
    )


def tree_version(tree: Path | None) -> str | None:
    """The kernel version of a source tree, from its top Makefile (VERSION.PATCHLEVEL.SUBLEVEL)."""
    if tree is None:
        return None
    try:
        text = (tree / "Makefile").read_text(errors="replace")[:4000]
    except OSError:
        return None
    fields = dict(re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL) = (\d+)$", text, flags=re.MULTILINE))
    if len(fields) != 3:
        return None
    return f"{fields['VERSION']}.{fields['PATCHLEVEL']}.{fields['SUBLEVEL']}"


def kernel_label(exc: PatchRejection, requested: str | None) -> str:
    """ "5.10.223", or "5.10.223 (requested 5.10.224)" when the request resolved to another version."""
    actual = tree_version(Path(exc.tree) if exc.tree is not None else None)
    if actual is None:
        return requested or "(default version)"
    if requested and requested != actual:
        return f"{actual} (requested {requested})"
    return actual


def report(
    exc: BaseException,
    requested_kernel: str | None,
    *,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    patches_root: Path | None = None,
) -> None:
    """Report a user-facing build error for CI before its full message is printed.

    A patch that does not apply: its patch file, target file and failed hunks as plain lines (to err),
    and in a workflow one annotation per hunk (to out) plus a section in $GITHUB_STEP_SUMMARY. Any other
    error: in a workflow, one annotation with its first lines.
    """
    env = os.environ if env is None else env
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    rejection = getattr(exc, "rejection", None)  # build.patches.PatchApplyError carries one
    if isinstance(rejection, PatchRejection):
        failure = patch_failure(rejection, kernel_label(rejection, requested_kernel), patches_root)
        print(failure.text(), file=err)
        err.flush()
        if in_github_actions(env):
            for line in failure.annotations():
                print(line, file=out)
            summary = env.get("GITHUB_STEP_SUMMARY")
            if summary:
                with open(summary, "a", encoding="utf-8") as handle:
                    handle.write(failure.markdown() + "\n")
    elif in_github_actions(env):
        lines = str(exc).strip().splitlines()
        message = "\n".join(lines[:20]) or type(exc).__name__
        print(annotation("error", message, title=f"kernel-ci: {type(exc).__name__}"), file=out)
    out.flush()


def finding_annotations(comparison: Comparison, patches_root: Path | None = None) -> list[str]:
    """The explained failures as annotations: a regression on the patch that broke it (in a pull request,
    on the patch file), a flaky test as a warning, a pre-existing failure as a notice."""
    root = patches_root or KERNEL_PATCHES
    lines = []
    for finding in comparison.findings:
        title = f"kernel-ci: {finding.test}"
        if finding.verdict == "regression" and finding.blamed_patch:
            where = _repo_relative(root / finding.blamed_patch)
            lines.append(annotation("error", finding.line(), file=where, line=1, title=title))
        elif finding.verdict == "regression":
            lines.append(annotation("error", finding.line(), title=title))
        elif finding.verdict == "flaky":
            lines.append(annotation("warning", finding.line(), title=title))
        elif finding.verdict == "preexisting":
            lines.append(annotation("notice", finding.line(), title=title))
    return lines
