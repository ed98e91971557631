"""One measured figure of `kernel-ci bench` and the table of them (shared by its build and guest halves)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table


@dataclass
class Figure:
    name: str
    seconds: float | None
    aim: str = ""
    note: str = ""


def render(figures: list[Figure]) -> Table:
    table = Table(title="kernel-ci bench", title_justify="left")
    table.add_column("measure")
    table.add_column("seconds", justify="right")
    table.add_column("aim")
    table.add_column("note")
    for figure in figures:
        shown = "-" if figure.seconds is None else f"{figure.seconds:.2f}"
        table.add_row(figure.name, shown, figure.aim, figure.note)
    return table


def ratio(figures: list[Figure], ours: str, theirs: str) -> str:
    by_name = {f.name: f.seconds for f in figures}
    a, b = by_name.get(ours), by_name.get(theirs)
    return f"{a / b:.2f}" if a and b else "n/a"
