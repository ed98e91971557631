"""Which guest runs which suite when a run boots several at once (`kernel-ci test --guests N|auto`).

Why several guests: TCG runs a guest's vCPUs on one host thread (single-threaded TCG, see PROTOCOL.md:
MTTCG ran stale translations of kprobe-patched text), so one guest keeps one host core busy however many
vCPUs it has, and the suites of a run wait for each other. Spread over N guests they use N cores.

How: each suite runs whole in one guest (its tests may share state, and its kconfig and modules were
checked for the kernel, not for a guest). Longest suite first onto the least loaded guest (LPT, within
4/3 of the best split), by each suite's seconds in the last run that ran it (suite-times.json in the
cache; an unknown suite counts DEFAULT_SECONDS). Each guest runs its suites in the run's order.

`auto` takes one guest per host CPU, no more than there are suites, no more than the host's available
memory holds (the guest's memory plus QEMU's own), and one guest when the suites are too short for a
second boot to pay for itself.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from kernel_ci.core.errors import UsageError
from kernel_ci.core.files import write_text_atomic

DEFAULT_SECONDS = 10.0  # a suite no run has timed yet
QEMU_OVERHEAD_MIB = 256  # QEMU's own memory beside the guest's RAM (TCG's translation cache included)
MIN_SPLIT_SECONDS = 15.0  # below this much suite time, a second boot (~1-3 s under TCG) is not worth it


class GuestsError(UsageError):
    """--guests is neither a positive number nor auto: exit 2."""


def parse_guests(value: str) -> int | None:
    """--guests as TestOptions takes it: None for auto, else a positive number."""
    if value == "auto":
        return None
    try:
        number = int(value)
    except ValueError:
        raise GuestsError(f"--guests {value!r}: expected a number of guests or 'auto'") from None
    if number < 1:
        raise GuestsError(f"--guests {value!r}: at least one guest runs the suites")
    return number


def memory_mib(memory: str) -> int:
    """QEMU's -m value (1024M, 2G, 512) in MiB."""
    text = memory.strip().upper().removesuffix("B")
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    try:
        if text and text[-1] in scale:
            return max(1, int(float(text[:-1]) * scale[text[-1]]))
        return int(text)
    except ValueError:
        raise GuestsError(f"--memory {memory!r}: expected a size such as 1024M or 2G") from None


def available_mib(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable in MiB, None where the kernel does not say."""
    with contextlib.suppress(OSError, ValueError):
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return None


def auto_guests(
    names: Sequence[str],
    seconds: Mapping[str, float],
    guest_memory_mib: int,
    *,
    cpus: int | None = None,
    free_mib: int | None = None,
) -> int:
    """How many guests `auto` boots for these suites (see the module doc)."""
    if sum(seconds.get(name, DEFAULT_SECONDS) for name in names) < MIN_SPLIT_SECONDS:
        return 1
    count = min(cpus or os.cpu_count() or 1, len(names))
    if free_mib is not None:
        count = min(count, free_mib // (guest_memory_mib + QEMU_OVERHEAD_MIB))
    return max(1, count)


def split(names: Sequence[str], guests: int, seconds: Mapping[str, float]) -> list[list[str]]:
    """The suites of each guest (no empty guest: at most len(names) lists), each in the run's order."""
    count = max(1, min(guests, len(names)))
    loads = [0.0] * count
    chosen: list[list[str]] = [[] for _ in range(count)]
    order = {name: index for index, name in enumerate(names)}
    # longest first; equal times keep the run's order, so the split is the same on every run
    for name in sorted(names, key=lambda n: (-seconds.get(n, DEFAULT_SECONDS), order[n])):
        target = min(range(count), key=lambda i: (loads[i], i))
        chosen[target].append(name)
        loads[target] += seconds.get(name, DEFAULT_SECONDS)
    return [sorted(group, key=order.__getitem__) for group in chosen if group]


def load_times(path: Path) -> dict[str, float]:
    """suite -> seconds of its last run; {} for a missing or unreadable file (it is only a hint)."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return {str(k): float(v) for k, v in data.items() if isinstance(v, int | float) and v >= 0}
    return {}


def record_times(path: Path, measured: Mapping[str, float]) -> None:
    """Remember the measured suites' seconds (the others keep theirs). A lost update between two runs
    at once only costs the next split its balance."""
    times = load_times(path) | {name: round(value, 2) for name, value in measured.items()}
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(times, indent=1, sort_keys=True))
