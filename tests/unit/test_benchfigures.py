"""The bench's generic figure table and the README section generated from bench.json."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from kernel_ci.bench import build as buildbench
from kernel_ci.bench.figures import (
    README_BEGIN,
    README_END,
    Figure,
    ReadmeMarkersError,
    figures_from_json,
    markdown_table,
    rewrite_readme,
)


def test_a_figure_with_a_reference_has_its_ratio() -> None:
    figure = Figure("build: cold", 190.0, reference=200.0, reference_name="tuxmake", load=(1.0, 1.0, 1.0))
    assert figure.ratio == 0.95
    assert Figure("build-cache hit", 0.3).ratio is None


def test_a_ratio_is_rounded_once_where_it_is_shown() -> None:
    figure = Figure("build: cold", 365.73, reference=316.72, reference_name="tuxmake", load=(1.0, 1.0, 1.0))
    assert "| 1.15x |" in markdown_table([figure], {}, "kernel-ci bench")  # 1.1547, not 1.155 -> 1.16
    assert buildbench._report([figure], "2026-12-07 22:55 UTC")["ratios"]["build: cold"] == "1.15"


def test_the_markdown_table_has_the_generic_columns_and_the_load() -> None:
    figures = [
        Figure(
            "build: cold",
            190.0,
            "<= 0.95x tuxmake",
            reference=200.0,
            reference_name="tuxmake",
            load=(2.5, 2.0, 1.0),
        ),
        Figure("build: build-cache hit", 0.25, "<= 0.3 s", load=(0.5, 0.5, 0.5)),
    ]
    table = markdown_table(figures, {"cpus": 2, "cpu": "x", "memory_gib": 24}, "kernel-ci bench")
    assert "| figure | kernel-ci | reference (same run) | ratio | target | load |" in table
    assert "| build: cold | 190.0 s | 200.0 s (tuxmake) | 0.95x | <= 0.95x tuxmake | 2.5 |" in table
    assert "| build: build-cache hit | 0.2 s | — | — | <= 0.3 s | 0.5 |" in table


def test_the_readme_section_between_the_markers_is_rewritten_and_nothing_else(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\nbefore\n{README_BEGIN}\nold table\n{README_END}\nafter\n")
    bench = tmp_path / "bench.json"
    figures = [Figure("build: cold", 190.0, reference=200.0, reference_name="tuxmake", load=(1.0, 1.0, 1.0))]
    report = buildbench._report(figures, "2026-12-07 22:55 UTC")
    bench.write_text(json.dumps(report))
    assert buildbench.rewrite_readme(bench, readme)
    text = readme.read_text()
    assert text.startswith(f"# title\nbefore\n{README_BEGIN}\n")
    assert text.endswith(f"{README_END}\nafter\n")
    assert "old table" not in text and "| build: cold | 190.0 s" in text
    assert not buildbench.rewrite_readme(bench, readme)  # unchanged the second time
    # the table says when the run was: one day's span, or both dates
    assert f"(2026-12-07 22:55-{report['ended'][11:]})" in text or "(2026-12-07 22:55 UTC to " in text


def test_a_readme_without_the_markers_is_refused_and_left_alone(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ReadmeMarkersError, match="bench:begin"):
        rewrite_readme(readme, "| table |\n")
    assert readme.read_text() == "# no markers\n"


def test_figures_round_trip_through_bench_json() -> None:
    figures = [
        Figure("a", 1.0, "aim", "note", 2.0, "ref", (1.0, 2.0, 3.0), {"configure": 1.5}),
        Figure("b", 1.5, samples=[1.0, 2.0], reference_samples=[3.0, 4.0]),
    ]
    report = json.loads(json.dumps(buildbench._report(figures, "2026-12-07 22:55 UTC")))
    assert figures_from_json(report) == figures
    assert report["ratios"]["a"] == "0.50"
    assert report["load_average"]


def test_the_one_line_change_never_writes_the_pristine_file(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine.c"
    pristine.write_text("int x;\n")
    tree = tmp_path / "tree"
    (tree / "kernel").mkdir(parents=True)
    edited = tree / buildbench.ONE_LINE_CHANGE
    edited.hardlink_to(pristine)
    with buildbench.one_line_change(tree):
        assert edited.read_text().startswith("int x;\n") and edited.read_text().count("\n") == 2
        assert pristine.read_text() == "int x;\n"
    assert edited.read_text() == "int x;\n"
    assert edited.stat().st_ino == pristine.stat().st_ino  # the hard link is back
    assert not list((tree / "kernel").glob("*.kci-bench-*"))


def test_each_sample_of_the_one_line_change_is_a_different_line(tmp_path: Path) -> None:
    """A second sample with the first's bytes would be a ccache hit, not an incremental build's miss."""
    (tmp_path / "kernel").mkdir()
    edited = tmp_path / buildbench.ONE_LINE_CHANGE
    edited.write_text("int x;\n")
    seen = []
    for sample in (1, 2):
        with buildbench.one_line_change(tmp_path, sample):
            seen.append(edited.read_bytes())
    assert seen[0] != seen[1]


def test_pairs_are_taken_a_b_b_a_and_both_sides_keep_every_sample() -> None:
    order: list[str] = []

    def side(name: str, seconds: float) -> Callable[[int], float]:
        def run(sample: int) -> float:
            order.append(f"{name}{sample}")
            return seconds + sample

        return run

    mine, theirs = buildbench.abba(side("ours", 10.0), side("tux", 20.0))
    assert order == ["ours1", "tux1", "tux2", "ours2"]
    assert (mine, theirs) == ([11.0, 12.0], [21.0, 22.0])
    assert buildbench.median(mine) == 11.5 and buildbench.median([]) is None
    order.clear()
    assert buildbench.abba(side("ours", 1.0), None) == ([2.0, 3.0], [])  # --skip-reference
    assert order == ["ours1", "ours2"]


def test_the_build_summary_breakdown_nests_the_container_steps_under_build() -> None:
    from kernel_ci.cli.main import time_breakdown

    shown = time_breakdown(
        {
            "plan": 1.0,
            "configure": 4.0,
            "build": 100.0,
            "build.container_start": 0.8,
            "build.make": 95.0,
            "collect": 2.0,
            "publish": 1.5,
        }
    )
    assert shown.splitlines() == [
        "plan 1.0 s",
        "configure 4.0 s",
        "build 100.0 s (container_start 0.8 s, make 95.0 s)",
        "collect 2.0 s",
        "publish 1.5 s",
    ]


def test_a_second_bench_on_the_machine_is_refused_naming_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real second process holds the lock as a running bench does; this one is refused, with its pid.
    Once it has ended, the lock is free again."""
    import os
    import subprocess
    import sys

    from kernel_ci.bench.figures import BenchRunning, one_bench_at_a_time

    monkeypatch.setenv("KERNEL_CI_CACHE", str(tmp_path))
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom kernel_ci.bench.figures import one_bench_at_a_time\n"
         "with one_bench_at_a_time():\n    print('held', flush=True)\n    sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ),
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(BenchRunning, match=f"pid {holder.pid}"), one_bench_at_a_time():
            pass
    finally:
        holder.communicate("")
    with one_bench_at_a_time():
        pass
