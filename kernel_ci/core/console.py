"""The shared rich console: progress and summaries go to stderr, so stdout stays clean for data."""

from __future__ import annotations

import os

from rich.console import Console

_TTY = os.isatty(2)
console = Console(
    stderr=True,
    highlight=False,
    log_path=False,
    force_terminal=None if _TTY else False,
    width=None if _TTY else 160,
)


def warn(message: str) -> None:
    console.print(f"[bold yellow]warning:[/] {message}")


def step(message: str) -> None:
    console.rule(f"[bold]{message}")
