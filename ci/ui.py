"""The shared rich console: progress and summaries go to stderr, so stdout stays clean for data."""

from __future__ import annotations

import os

from rich.console import Console

console = Console(stderr=True, highlight=False, log_path=False, force_terminal=None if os.isatty(2) else False)


def warn(message: str) -> None:
    console.print(f"[bold yellow]warning:[/] {message}")


def step(message: str) -> None:
    console.rule(f"[bold]{message}")
