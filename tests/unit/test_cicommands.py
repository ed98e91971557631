"""kernel-ci summary (JUnit -> Markdown), key (recipe key), patches (export + checkpatch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kernel_ci.build import patchexport
from kernel_ci.build import recipe as recipekey
from kernel_ci.cli import main as cli
from kernel_ci.core.paths import KERNEL_PATCHES
from kernel_ci.core.proc import capture
from kernel_ci.report import junit, render
from kernel_ci.report.junit import write_junit
from kernel_ci.report.model import Case, Outcome, RootfsRef, RunRecord, RunReport, SuiteResult
from tests.unit.test_patches import GIT, VANILLA, PatchMaker, edited, make_series, write_tree

PROPS = {"kernel.version": "5.10.223", "kernel.requested": "5.10.224", "build_key": "ab" * 32}


def report() -> RunReport:
    return RunReport(
        Outcome.KERNEL_OOPS,
        [
            SuiteResult("boot", [Case("boot", "boot", "passed", 0.8)], dict(PROPS), seconds=0.8),
            SuiteResult(
                "smoke-c",
                [
                    Case("a", "smoke-c", "passed", 1.25),
                    Case("b|c", "smoke-c", "failed", message="expected 1 got 2", detail="line 1\nline 2"),
                    Case("d", "smoke-c", "skipped", message="no module"),
                ],
                dict(PROPS),
                seconds=1.25,
            ),
            SuiteResult(
                "smoke-py",
                [Case("kernel: WARNING", "smoke-py", "error", 2.0, message="WARN at <x>", detail="trace")],
                dict(PROPS),
                seconds=2.0,
            ),
        ],
    )


def run_record(**after_the_run: object) -> RunRecord:
    return RunRecord(
        created="20261204T170000",
        build_key="ab" * 32,
        kernel_dir="/out/kernel",
        kernel={"version": "5.10.223", "requested": "5.10.224", "fallbacks": ["5.10.224: not found"]},
        reproduce_build="kernel-ci build --kernel 5.10.224",
        rootfs=RootfsRef("cd" * 32, "/cache/rootfs.ext4"),
        suites=("smoke-c", "smoke-py"),
        options={"memory": "1024M", "cpus": 2, "keep_overlay": False, "suites": None},
        **after_the_run,  # type: ignore[arg-type]
    )


def test_summary_reads_counts_and_problems_back_from_junit(tmp_path: Path) -> None:
    path = write_junit(report(), tmp_path / "junit.xml")
    read = junit.read_report(path)
    counts = {s.name: (s.failed, s.errors, s.skipped, s.passed) for s in read.rows}
    assert counts == {"boot": (0, 0, 0, 1), "smoke-c": (1, 0, 1, 1), "smoke-py": (0, 1, 0, 0)}
    assert [(suite, p.name, p.state) for suite, p in read.problems()] == [
        ("smoke-c", "b|c", "failed"),
        ("smoke-py", "kernel: WARNING", "error"),
    ]
    assert not read.ok and read.verdict == "FAILED" and read.outcome is None


def test_summary_markdown_is_the_run_report_table(tmp_path: Path) -> None:
    path = write_junit(report(), tmp_path / "runs" / "r1" / "junit.xml")
    run_record(outcome="KERNEL_OOPS", exit_code=3).write(path.parent)
    text = render.to_markdown(junit.read_report(path), "Linux 5.10.224")
    lines = text.splitlines()
    assert lines[0] == "### :x: Linux 5.10.224: KERNEL_OOPS (exit 3)"
    assert "Kernel **5.10.223** (requested 5.10.224)" in text and "build key `abababababababab`" in text
    table = lines[lines.index("| suite | failed | errors | skipped | passed | time |") :]
    assert table[2:6] == [  # suites with failures first, then the rest, then the total
        "| smoke-c | 1 | 0 | 1 | 1 | 1.2s |",
        "| smoke-py | 0 | 1 | 0 | 0 | 2.0s |",
        "| boot | 0 | 0 | 0 | 1 | 0.8s |",
        "| **total** | **1** | **1** | **1** | **2** | |",
    ]
    assert "<details><summary>FAILED smoke-c :: b|c: expected 1 got 2</summary>" in text
    assert "ERROR smoke-py :: kernel: WARNING: WARN at &lt;x&gt;</summary>" in text
    assert "line 1\nline 2" in text


def test_summary_of_a_passing_run(tmp_path: Path) -> None:
    passing = RunReport(Outcome.PASS, [SuiteResult("boot", [Case("boot", "boot", "passed")], {})])
    text = render.to_markdown(junit.read_report(write_junit(passing, tmp_path / "junit.xml")))
    assert text.startswith("### :white_check_mark: kernel-ci test: PASS\n")
    assert "<details>" not in text


def test_summary_command_appends_markdown_to_the_step_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_junit(report(), tmp_path / "junit.xml")
    step = tmp_path / "step.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    assert cli.main(["summary", str(path), "--markdown", "--step-summary"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### :x: kernel-ci test: FAILED") and step.read_text() == out + "\n"
    assert cli.main(["summary", str(path), "--markdown", "--strict"]) == 1
    missing = tmp_path / "nothing.xml"
    assert cli.main(["summary", str(missing), "--markdown"]) == 0  # a summary step must not hide the cause
    assert "no report" in capsys.readouterr().out
    assert cli.main(["summary", str(missing), "--markdown", "--strict"]) == 1


def test_summary_refuses_what_is_not_junit(tmp_path: Path) -> None:
    bad = tmp_path / "x.xml"
    bad.write_text("<html/>")
    with pytest.raises(junit.JunitError, match="not a JUnit report"):
        junit.read_report(bad)
    bad.write_text("<testsuites>")
    with pytest.raises(junit.JunitError, match="not valid XML"):
        junit.read_report(bad)


# -- recipe key ----------------------------------------------------------------------------------------------


def test_recipe_key_follows_patches_kernel_and_fragments(tmp_path: Path) -> None:
    root = tmp_path / "kernel-patches"
    shutil.copytree(KERNEL_PATCHES / "ci-smoke", root / "ci-smoke")
    modules = tmp_path / "no-modules"

    def key(kernel: str = "5.10.224", fragments: tuple[Path, ...] = ()) -> str:
        manifest = recipekey.recipe_manifest(kernel, None, fragments, patches_root=root, modules_root=modules)
        return recipekey.recipe_key(manifest)

    first = key()
    assert first == key()  # files alone: stable
    assert len(first) == 64
    assert key("5.10.223") != first  # another candidate list
    fragment = tmp_path / "extra.config"
    fragment.write_text("CONFIG_KASAN=y\n")
    assert key(fragments=(fragment,)) != first
    patch = next((root / "ci-smoke").glob("*.patch"))
    patch.write_bytes(patch.read_bytes() + b"\n")
    assert key() != first
    manifest = recipekey.recipe_manifest("5.10.224", None, (), patches_root=root, modules_root=modules)
    assert manifest["source"].startswith("linux-5.10.224 sha256:unpinned linux-5.10.223 sha256:")
    assert manifest["toolchain-recipe"].startswith("kernel-ci/builder:")


# -- patches -------------------------------------------------------------------------------------------------


def test_export_writes_patches_series_mboxes_and_an_index_that_git_am_applies(tmp_path: Path) -> None:
    maker = PatchMaker(tmp_path)
    first = maker.make("core: one", {"kernel/core.c": edited("kernel/core.c", "int core_1;", "long core_1;")})
    second = maker.make("old: remove", {"kernel/old.c": None})
    third = maker.make("init: option", {"init/Kconfig": VANILLA["init/Kconfig"] + "config NEW\n\tbool\n"})
    root = tmp_path / "kernel-patches"
    make_series(root, "b-series", [third])
    make_series(root, "a-series", [first, second])
    dest = tmp_path / "out" / "patches"

    result = patchexport.run(dest, check=False, patches_root=root)

    assert [s.name for s in result.series] == ["a-series", "b-series"]
    assert (dest / "a-series" / first.name).read_bytes() == first.read_bytes()  # byte for byte
    assert (dest / "a-series.mbox").read_bytes() == first.read_bytes() + second.read_bytes()
    assert (
        dest / "all-series.mbox"
    ).read_bytes() == first.read_bytes() + second.read_bytes() + third.read_bytes()
    index = json.loads((dest / "index.json").read_text())
    assert list(index["series"]["a-series"]["patches"]) == [
        f"a-series/{first.name}",
        f"a-series/{second.name}",
    ]
    assert not (dest / "checkpatch.txt").exists()

    tree = write_tree(tmp_path / "am", VANILLA)
    capture([*GIT, "init", "-q"], cwd=tree)
    capture([*GIT, "add", "-A"], cwd=tree)
    capture([*GIT, "commit", "-q", "-m", "vanilla"], cwd=tree)
    capture([*GIT, "am", "-q", str(dest / "all-series.mbox")], cwd=tree)
    assert "long core_1;" in (tree / "kernel/core.c").read_text()
    assert not (tree / "kernel/old.c").exists()
    assert len(capture(["git", "log", "--oneline"], cwd=tree).splitlines()) == 4

    # a second export replaces the first: a series removed since is gone
    shutil.rmtree(root / "b-series")
    patchexport.run(dest, check=False, patches_root=root)
    assert not (dest / "b-series").exists() and not (dest / "b-series.mbox").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["patches"]  # no staging or old folders left


def test_export_refuses_to_replace_a_folder_it_did_not_write(tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep me")
    with pytest.raises(patchexport.ExportError, match="not written by `kernel-ci patches`"):
        patchexport.run(dest, check=False)
    assert (dest / "precious.txt").read_text() == "keep me"


def test_finding_locations_point_at_the_repository_patch_and_line(tmp_path: Path) -> None:
    from kernel_ci.build.kcheck import CheckResult

    result = patchexport.run(tmp_path / "patches", check=False)
    exported = result.patch_files[0]
    finding = f"/target/{exported.name}:12: WARNING:LONG_LINE: line length of 120 exceeds 100 columns"
    result.checks = [CheckResult("checkpatch", str(exported), [finding], finding)]
    ((where, line, text),) = patchexport.finding_locations(result)
    assert where == f"kernel-patches/ci-smoke/{exported.name}" and line == 12 and text == finding


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_checkpatch_in_the_builder_container_flags_a_bad_patch_and_passes_the_real_series(
    tmp_path: Path,
) -> None:
    """Real checkpatch.pl of the pinned tree: a patch with style errors fails, ci-smoke is clean."""
    maker = PatchMaker(tmp_path)
    ugly = "int core_0;\n" + "".join(f"int core_{i};\n" for i in range(1, 40)) + "int  x = 1 ;;\n"
    bad = maker.make("core: add x", {"kernel/core.c": ugly + "void f(void){ if(x) x=2; }\n"})
    root = tmp_path / "kernel-patches"
    make_series(root, "ugly", [bad])

    result = patchexport.run(tmp_path / "bad-out", patches_root=root)
    assert result.findings, (tmp_path / "bad-out" / "checkpatch.txt").read_text()
    located = patchexport.finding_locations(result)
    assert all(line is not None and line > 0 for _, line, _ in located)
    assert "FINDINGS" in (tmp_path / "bad-out" / "checkpatch.txt").read_text()

    clean = patchexport.run(tmp_path / "good-out", series=["ci-smoke"])
    assert [c.ok for c in clean.checks] == [True], [c.describe() for c in clean.checks]
    assert "MAINTAINERS" in (tmp_path / "good-out" / "checkpatch.txt").read_text()  # seen, and accepted
