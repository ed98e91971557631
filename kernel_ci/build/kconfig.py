"""Kconfig fragments: parse, merge in order (scripts/kconfig/merge_config.sh semantics), verify the result.

The merged fragment is applied with `make allnoconfig KCONFIG_ALLCONFIG=<merged>` then `make olddefconfig`
(what `merge_config.sh -n` does); afterwards every requested value must still be there, or a dependency
is missing and the build stops, naming the symbol and the fragment that asked for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kernel_ci.core.errors import BuildError

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
NOT_SET = "n"


class KconfigError(BuildError):
    pass


@dataclass(frozen=True)
class Fragment:
    name: str  # where it came from, for messages: "kconfig/base.config", "series ci-smoke", "suite smoke-c"
    text: str

    @classmethod
    def from_file(cls, path: Path, label: str | None = None) -> Fragment:
        if not path.is_file():
            raise KconfigError(f"kconfig fragment {path} does not exist")
        return cls(label or str(path), path.read_text())


@dataclass(frozen=True)
class Request:
    symbol: str
    value: str  # "y", "m", "n" (not set), a number or a quoted string
    fragment: str


@dataclass(frozen=True)
class Redefinition:
    symbol: str
    old: Request
    new: Request

    def describe(self) -> str:
        return (
            f"{self.symbol} redefined by {self.new.fragment}: {self.old.value} ({self.old.fragment}) "
            f"-> {self.new.value}"
        )


def parse(text: str, name: str = "<fragment>") -> dict[str, str]:
    """symbol -> value of a .config or fragment; "n" for `# CONFIG_X is not set` and for `=n`."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if match := _SET.match(line):
            values[match.group(1)] = NOT_SET if match.group(2) == "n" else match.group(2)
        elif match := _UNSET.match(line):
            values[match.group(1)] = NOT_SET
        elif not line.startswith("#"):
            raise KconfigError(f"{name}:{number}: not a kconfig line: {raw!r}")
    return values


@dataclass
class Merged:
    requests: dict[str, Request]
    redefinitions: list[Redefinition]

    def render(self) -> str:
        """The merged fragment, in the syntax KCONFIG_ALLCONFIG reads."""
        lines = []
        for symbol, request in sorted(self.requests.items()):
            if request.value == NOT_SET:
                lines.append(f"# {symbol} is not set")
            else:
                lines.append(f"{symbol}={request.value}")
        return "\n".join(lines) + "\n"


def merge(fragments: Iterable[Fragment]) -> Merged:
    """Later fragments override earlier ones, as merge_config.sh does; every override is reported."""
    requests: dict[str, Request] = {}
    redefinitions: list[Redefinition] = []
    for fragment in fragments:
        for symbol, value in parse(fragment.text, fragment.name).items():
            new = Request(symbol, value, fragment.name)
            old = requests.get(symbol)
            if old is not None and old.value != value:
                redefinitions.append(Redefinition(symbol, old, new))
            requests[symbol] = new
    return Merged(requests, redefinitions)


@dataclass(frozen=True)
class Lost:
    request: Request
    actual: str

    def describe(self) -> str:
        got = "not set" if self.actual == NOT_SET else self.actual
        return (
            f"{self.request.symbol}={self.request.value} (asked by {self.request.fragment}) ended up {got}: "
            "a dependency is missing or the symbol does not exist in this kernel"
        )


def verify(final_config: str, requests: Mapping[str, Request]) -> list[Lost]:
    """Requests whose value did not survive olddefconfig."""
    final = parse(final_config, ".config")
    lost = []
    for symbol, request in sorted(requests.items()):
        actual = final.get(symbol, NOT_SET)
        if actual != request.value:
            lost.append(Lost(request, actual))
    return lost
