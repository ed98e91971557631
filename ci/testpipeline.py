"""The test half of the pipeline: built kernel -> rootfs overlay -> QEMU -> guest suites -> JUnit.

It composes the stages (suites, payload, rootfs, qemu, scanner, results); none of them knows the others.
"""

from __future__ import annotations

from collections.abc import Sequence

from ci import kconfig, suites
from ci.paths import GUEST_TESTS


def suite_fragments(names: Sequence[str] | None = None) -> list[kconfig.Fragment]:
    """One kconfig fragment per guest suite, from its manifest's `kconfig` list."""
    chosen = suites.load_suites(GUEST_TESTS, names)
    suites.kconfig_lines(chosen)  # two suites asking for different values is an error
    return [kconfig.Fragment(f"suite {s.name}", "\n".join(s.kconfig) + "\n") for s in chosen if s.kconfig]
