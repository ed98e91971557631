"""One measured figure of `kernel-ci bench` and the tables of them (shared by its build, guest and cache
halves): a rich table for the terminal and the README's Markdown table, generated from bench.json.

The README section is rewritten between two marker comments by hand-written code, not a template engine:
it is one table, and the rest of README.md must stay byte-for-byte what its authors wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from kernel_ci.core.errors import UsageError
from kernel_ci.core.paths import cache_dir

README_BEGIN = "<!-- bench:begin (generated from bench.json by `kernel-ci bench --readme`) -->"
README_END = "<!-- bench:end -->"


class BenchRunning(UsageError):
    """Another bench runs on this machine: two side by side measure each other."""


@contextlib.contextmanager
def one_bench_at_a_time() -> Iterator[None]:
    """Hold the machine's bench lock (an flock, gone with the process) for the block, or say who holds it.
    Figures taken while another bench builds, boots or serves are the other bench's load as much as
    their own; such runs are refused, not measured."""
    path = cache_dir() / "bench.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise BenchRunning(
                f"another kernel-ci bench is running on this machine ({holder}): figures taken side by "
                "side measure each other. Wait for it to end, or stop it."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


@dataclass
class Figure:
    name: str
    seconds: float | None
    aim: str = ""
    note: str = ""
    # the reference tool's figure for the same work in the same run, and what it is ("tuxmake cold")
    reference: float | None = None
    reference_name: str = ""
    load: tuple[float, float, float] = field(default_factory=load_average)  # when the figure was taken
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds per step, where known
    # every measurement behind seconds and reference when a pair was taken more than once (their medians)
    samples: list[float] = field(default_factory=list)
    reference_samples: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        """Unrounded: each table rounds it once (rounded to 3 digits first, 365.7 / 316.7 = 1.1547 became
        1.155 and was shown as 1.16x)."""
        if self.seconds is None or not self.reference:
            return None
        return self.seconds / self.reference


def render(figures: list[Figure]) -> Table:
    table = Table(title="kernel-ci bench", title_justify="left")
    table.add_column("measure")
    table.add_column("seconds", justify="right")
    table.add_column("reference", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("aim")
    table.add_column("load")
    table.add_column("note")
    for figure in figures:
        reference = "" if figure.reference is None else f"{figure.reference:.2f} {figure.reference_name}"
        shown_ratio = "" if figure.ratio is None else f"{figure.ratio:.2f}x"
        load = f"{figure.load[0]:.1f}"
        table.add_row(
            figure.name, _seconds(figure.seconds), reference, shown_ratio, figure.aim, load, figure.note
        )
    return table


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def figures_from_json(report: dict) -> list[Figure]:
    """The figures of a bench.json (unknown keys of newer files are ignored)."""
    known = set(Figure.__dataclass_fields__)
    figures = []
    for item in report.get("figures", []):
        fields = {k: v for k, v in item.items() if k in known}
        if "load" in fields:
            fields["load"] = tuple(fields["load"])
        figures.append(Figure(**fields))
    return figures


def markdown_table(figures: list[Figure], machine: dict, command: str, when: str = "") -> str:
    """The README's performance table: figure, kernel-ci, reference, ratio, target (and the load); when:
    the run's date and times."""
    lines = [
        f"Measured by `{command}`{f' ({when})' if when else ''} on {machine.get('cpus', '?')} cores "
        f"({machine.get('cpu', '?')}), "
        f"{machine.get('memory_gib', '?')} GiB; the load average is the 1-minute one when each figure was "
        "taken.",
        "",
        "| figure | kernel-ci | reference (same run) | ratio | target | load |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        ours = "—" if f.seconds is None else f"{f.seconds:.1f} s"
        theirs = "—" if f.reference is None else f"{f.reference:.1f} s ({f.reference_name})"
        shown_ratio = "—" if f.ratio is None else f"{f.ratio:.2f}x"
        note = f" ({f.note})" if f.note else ""
        lines.append(
            f"| {f.name}{note} | {ours} | {theirs} | {shown_ratio} | {f.aim or '—'} | {f.load[0]:.1f} |"
        )
    return "\n".join(lines) + "\n"


class ReadmeMarkersError(UsageError):
    """README.md lacks the bench markers (or has them out of order): exit 2, nothing rewritten."""


def rewrite_readme(readme: Path, table: str) -> bool:
    """Replace what lies between README_BEGIN and README_END with table; True if the file changed.
    Written through a temporary file and a rename: an interrupted rewrite leaves the old README."""
    text = readme.read_text()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ReadmeMarkersError(f"{readme} has no '{README_BEGIN}' ... '{README_END}' section")
    new = text[: start + len(README_BEGIN)] + "\n" + table + text[end:]
    if new == text:
        return False
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(readme)
    return True
