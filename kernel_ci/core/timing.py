"""The one way durations are measured: build metadata (`durations`), kbuild's step timings, the benchmarks.

One helper so that every figure kernel-ci reports is taken the same way: a monotonic clock (never the wall
clock, which NTP may step), seconds as a float, rounded only where it is recorded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field

RECORD_DIGITS = 2  # durations in metadata.json: hundredths of a second


@dataclass
class Duration:
    """A duration being measured; `seconds` is set when its block ends (elapsed() reads it meanwhile)."""

    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def stop(self) -> float:
        self.seconds = self.elapsed()
        return self.seconds

    @property
    def rounded(self) -> float:
        return round(self.seconds, RECORD_DIGITS)


@contextlib.contextmanager
def measure_duration(
    record: MutableMapping[str, float] | None = None, name: str | None = None
) -> Iterator[Duration]:
    """Measure the block: `with measure_duration(durations, "configure") as took: ...`.

    With a record and a name, the rounded seconds are stored under that name when the block succeeds (a
    step that failed has no duration to report)."""
    took = Duration()
    yield took
    took.stop()
    if record is not None and name is not None:
        record[name] = took.rounded
