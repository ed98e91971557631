"""A series that does not apply: the plain report and the GitHub Actions annotations, down to the hunk."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from kernel_ci.build.patches import PatchApplyError, apply_series, discover_series
from kernel_ci.build.records import PatchRejection
from kernel_ci.cli import main as cli
from kernel_ci.core.errors import BUILD_FAILED_EXIT
from kernel_ci.report import github as ghactions
from tests.unit.test_patches import VANILLA, PatchMaker, edited, make_series, write_tree

TREE_MAKEFILE = "VERSION = 5\nPATCHLEVEL = 10\nSUBLEVEL = 223\nEXTRAVERSION =\n"


def failing_setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    """kernel-patches/s/ with a good patch and one whose second hunk conflicts with a tiny 5.10.223 tree."""
    maker = PatchMaker(tmp_path)
    good = maker.make(
        "core: rename core_1", {"kernel/core.c": edited("kernel/core.c", "int core_1;", "long core_1;")}
    )
    two_hunks = edited("kernel/core.c", "int core_12;", "short core_12;").replace(
        "int core_35;", "char core_35;"
    )
    bad = maker.make("core: two hunks", {"kernel/core.c": two_hunks}, base=maker.vanilla_commit)
    root = tmp_path / "kernel-patches"
    make_series(root, "s", [good, bad])
    tree = write_tree(tmp_path / "tree", {**VANILLA, "Makefile": TREE_MAKEFILE})
    (tree / "kernel/core.c").write_text(VANILLA["kernel/core.c"].replace("int core_35;", "unsigned core_35;"))
    return root, tree, root / "s" / bad.name


def apply_error(root: Path, tree: Path) -> PatchApplyError:
    with pytest.raises(PatchApplyError) as caught:
        apply_series(discover_series(root), tree)
    return caught.value


def test_hunk_lines_finds_each_hunk_header_of_each_file() -> None:
    patch = (
        "From 0 Mon Sep 17 00:00:00 2001\nSubject: x\n---\n"
        "diff --git a/a.c b/a.c\n--- a/a.c\n+++ b/a.c\n"
        "@@ -1,2 +1,2 @@\n-old\n+new\n ctx\n"  # lines 7-10
        "@@ -10 +10 @@\n--- not a header\n+++ not a header either\n"  # lines 11-13
        "diff --git a/b.c b/b.c\nnew file mode 100644\n--- /dev/null\n+++ b/b.c\n@@ -0,0 +1 @@\n+x\n"
    )
    assert ghactions.hunk_lines(patch) == {"a.c": [7, 11], "b.c": [18]}


def test_annotation_escapes_message_and_properties() -> None:
    line = ghactions.annotation("error", "50% done\nnext: line", file="a,b:c.patch", line=3, title="t: x")
    assert line == "::error file=a%2Cb%3Ac.patch,line=3,title=t%3A x::50%25 done%0Anext: line"
    with pytest.raises(ValueError):
        ghactions.annotation("fatal", "x")


def test_patch_failure_names_patch_target_and_the_hunk_line_in_the_patch(tmp_path: Path) -> None:
    root, tree, bad = failing_setup(tmp_path)
    error = apply_error(root, tree)
    rejection = error.rejection
    assert PatchRejection.from_json(rejection.to_json()) == rejection  # the record crosses stages as JSON too
    failure = ghactions.patch_failure(rejection, ghactions.kernel_label(rejection, "5.10.224"), root)

    assert failure.kernel == "5.10.223 (requested 5.10.224)"  # read from the tree's Makefile
    assert failure.series == "s"
    assert failure.target_file == "kernel/core.c"
    (hunk,) = failure.hunks
    assert hunk.target == "kernel/core.c" and hunk.hunk == 2
    assert hunk.problem.startswith("hunk #2 FAILED at line")
    # the annotation points at the second @@ header of kernel/core.c in the patch file
    headers = [n for n, text in enumerate(bad.read_text().splitlines(), start=1) if text.startswith("@@ ")]
    assert len(headers) == 2 and hunk.patch_line == headers[1]
    text = failure.text()
    assert f"patch file:  {bad}" in text  # outside the repository: the path as it is
    assert "target file: kernel/core.c" in text
    assert "kernel/core.c: hunk #2 FAILED at line" in text and f"(patch line {headers[1]})" in text


def test_report_prints_annotations_and_step_summary_only_under_github_actions(tmp_path: Path) -> None:
    root, tree, bad = failing_setup(tmp_path)
    error = apply_error(root, tree)
    summary = tmp_path / "step-summary.md"

    out, err = io.StringIO(), io.StringIO()
    ghactions.report(error, "5.10.223", env={}, out=out, err=err, patches_root=root)
    assert out.getvalue() == ""
    assert "target file: kernel/core.c" in err.getvalue()
    assert not summary.exists()

    out, err = io.StringIO(), io.StringIO()
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    ghactions.report(error, "5.10.223", env=env, out=out, err=err, patches_root=root)
    (line,) = out.getvalue().splitlines()
    assert line.startswith(f"::error file={bad.as_posix().replace(':', '%3A')},line=")
    assert "title=s%3A patch does not apply to Linux 5.10.223::" in line
    assert f"{bad.name} does not apply to Linux 5.10.223: kernel/core.c: hunk #2 FAILED at line" in line
    assert "%0Ahint: " in line
    markdown = summary.read_text()
    assert "does not apply to Linux 5.10.223" in markdown and "| `kernel/core.c` | hunk #2 FAILED" in markdown


def test_other_errors_get_one_annotation_under_github_actions() -> None:
    out = io.StringIO()
    ghactions.report(
        RuntimeError("the mirror is gone\nsecond line"), None, env={"GITHUB_ACTIONS": "true"}, out=out
    )
    assert out.getvalue() == "::error title=kernel-ci%3A RuntimeError::the mirror is gone%0Asecond line\n"
    out = io.StringIO()
    ghactions.report(RuntimeError("x"), None, env={"GITHUB_ACTIONS": "false"}, out=out, err=io.StringIO())
    assert out.getvalue() == ""


def test_kernel_ci_build_prints_the_failing_hunk_as_an_annotation_and_exits_10(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real CLI path: `kernel-ci build` whose series does not apply, as a matrix cell runs it."""
    root, tree, bad = failing_setup(tmp_path)
    seen: list[argparse.Namespace] = []

    def build(request, **_options):  # type: ignore[no-untyped-def]  # e.g. store=
        seen.append(request)
        apply_series(discover_series(root), tree)  # raises the real PatchApplyError
        raise AssertionError("the series should not apply")

    monkeypatch.setattr("kernel_ci.flow.build.build", build)
    monkeypatch.setattr(ghactions, "KERNEL_PATCHES", root)
    monkeypatch.setattr(ghactions, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)

    code = cli.main(["-o", str(tmp_path / "out"), "build", "--kernel", "5.10.224"])

    assert code == BUILD_FAILED_EXIT
    assert seen and seen[0].kernel == "5.10.224"
    captured = capsys.readouterr()
    errors = [line for line in captured.out.splitlines() if line.startswith("::error ")]
    assert len(errors) == 1
    assert errors[0].startswith(f"::error file=kernel-patches/s/{bad.name},line=")
    assert "Linux 5.10.223 (requested 5.10.224)" in errors[0]
    assert "kernel/core.c: hunk #2 FAILED" in errors[0]
    assert "patch file:  kernel-patches/s/" in captured.err
    assert "target file: kernel/core.c" in captured.err

    monkeypatch.setenv("GITHUB_ACTIONS", "false")
    assert cli.main(["-o", str(tmp_path / "out"), "build", "--kernel", "5.10.224"]) == BUILD_FAILED_EXIT
    assert "::error" not in capsys.readouterr().out
