"""`kernel-ci build|test --json FILE`: the command's result for machines (as tuxrun's and kunit.py's are).

A dataclass of its own rather than the RunReport: it says what a script needs after the command (outcome,
exit code, build key, where the files are, counts per suite) and stays the same shape when the command
failed before a report existed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kernel_ci.core.files import write_text_atomic

SCHEMA = 1


@dataclass(frozen=True)
class SuiteCounts:
    name: str
    passed: int
    failed: int
    error: int
    skipped: int


@dataclass(frozen=True)
class CommandResult:
    command: str  # build | test
    outcome: str  # PASS, TEST_FAILURE, KERNEL_PANIC, ... (core.errors.ExitCode / report.model.Outcome name)
    exit_code: int
    build_key: str | None = None
    cache_hit: bool | None = None
    kernel: str | None = None  # the version built (e.g. 5.10.224)
    paths: dict[str, str] = field(default_factory=dict)  # output, build, junit, run
    suites: list[SuiteCounts] = field(default_factory=list)
    error: str = ""  # the message of a command that stopped with an error

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, **asdict(self)}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> CommandResult:
        data: dict[str, Any] = json.loads(text)
        if data.pop("schema", None) != SCHEMA:
            raise ValueError(f"not a kernel-ci result of schema {SCHEMA}")
        data["suites"] = [SuiteCounts(**item) for item in data.get("suites", [])]
        return cls(**data)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, self.to_json())
