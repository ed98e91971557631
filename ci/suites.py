"""Guest test suites: each is a folder `guest-tests/<name>/` with a `manifest.toml`.

name = "smoke-c"                    # must equal the folder name
language = "c"                      # "c" (static binary printing KTAP) or "python" (pytest)
timeout = 60                        # seconds before the runner kills the suite
modules = ["kci-smoke"]             # kernel-modules/<dir> the runner loads before and unloads after
ship_modules = []                   # kernel-modules/<dir> only copied to /kci/modules
kconfig = ["CONFIG_PROC_FS=y"]      # options the kernel under test must have
sources = ["smoke.c"]               # C: the .c files; Python: the test files
description = "..."                 # optional
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ci.paths import GUEST_TESTS

Language = Literal["c", "python"]
MANIFEST = "manifest.toml"
NOT_SUITES = frozenset({"lib", "runner", "init"})
LANGUAGES: tuple[Language, ...] = ("c", "python")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_KCONFIG = re.compile(
    r'^(CONFIG_[A-Za-z0-9_]+=(?:y|m|n|-?\d+|0x[0-9a-fA-F]+|"[^"]*")|# CONFIG_[A-Za-z0-9_]+ is not set)$'
)
_KEYS = {"name", "language", "timeout", "modules", "ship_modules", "kconfig", "sources", "description"}


class ManifestError(ValueError):
    """A suite folder or manifest that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Suite:
    name: str
    language: Language
    timeout: int
    modules: tuple[str, ...]
    ship_modules: tuple[str, ...]
    kconfig: tuple[str, ...]
    sources: tuple[str, ...]
    description: str
    path: Path

    @property
    def all_modules(self) -> tuple[str, ...]:
        """Every module folder whose .ko the payload must carry (loaded or only shipped), in order."""
        return tuple(dict.fromkeys(self.modules + self.ship_modules))


def load_suite(folder: Path) -> Suite:
    """Read and check folder/manifest.toml."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ManifestError(
            f"{folder}: no {MANIFEST} (every folder under guest-tests/ but lib, runner, init is a suite)"
        )
    try:
        data = tomllib.loads(manifest.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{manifest}: not valid TOML: {exc}") from exc
    return _suite_from(data, folder, manifest)


def load_suites(root: Path = GUEST_TESTS, names: Sequence[str] | None = None) -> list[Suite]:
    """All suites under root (sorted by name), or the named ones in the order given."""
    folders = sorted(
        p for p in root.iterdir() if p.is_dir() and p.name not in NOT_SUITES and not p.name.startswith(".")
    )
    available = {p.name: p for p in folders}
    if names is None:
        return [load_suite(p) for p in folders]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ManifestError(
            f"unknown suite(s) {', '.join(unknown)}; available: {', '.join(available) or 'none'}"
        )
    return [load_suite(available[n]) for n in dict.fromkeys(names)]


def kconfig_lines(suites: Iterable[Suite]) -> list[str]:
    """The kconfig lines the suites need, in order, without repeats; two suites disagreeing is an error."""
    chosen: dict[str, tuple[str, str]] = {}
    for suite in suites:
        for line in suite.kconfig:
            symbol = _symbol(line)
            if symbol in chosen and chosen[symbol][0] != line:
                other_line, other = chosen[symbol]
                raise ManifestError(f"suites {other} and {suite.name} disagree: {other_line!r} vs {line!r}")
            chosen.setdefault(symbol, (line, suite.name))
    return [line for line, _ in chosen.values()]


def _symbol(line: str) -> str:
    if line.startswith("# "):
        return line.split()[1]
    return line.split("=", 1)[0]


def _suite_from(data: dict[str, Any], folder: Path, manifest: Path) -> Suite:
    def fail(message: str) -> ManifestError:
        return ManifestError(f"{manifest}: {message}")

    extra = sorted(set(data) - _KEYS)
    if extra:
        raise fail(f"unknown key(s) {', '.join(extra)} (known: {', '.join(sorted(_KEYS))})")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise fail(f"name must be a lowercase identifier (letters, digits, - _ .), got {name!r}")
    if name != folder.name:
        raise fail(f"name {name!r} must equal the folder name {folder.name!r}")
    language = data.get("language")
    if language not in LANGUAGES:
        raise fail(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")
    timeout = data.get("timeout")
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
        raise fail(f"timeout must be a positive number of seconds, got {timeout!r}")
    modules = _strings(data, "modules", fail)
    ship_modules = _strings(data, "ship_modules", fail)
    for module in modules + ship_modules:
        if not _NAME.match(module):
            raise fail(f"module {module!r} is not a folder name under kernel-modules/")
    kconfig = _strings(data, "kconfig", fail)
    for line in kconfig:
        if not _KCONFIG.match(line):
            raise fail(
                f"kconfig line {line!r} is not CONFIG_X=y|m|n|number|\"string\" or '# CONFIG_X is not set'"
            )
    sources = _strings(data, "sources", fail)
    if not sources:
        raise fail("sources must list at least one file")
    for source in sources:
        path = folder / source
        if Path(source).is_absolute() or ".." in Path(source).parts:
            raise fail(f"source {source!r} must be a path inside the suite folder")
        if not path.is_file():
            raise fail(f"source {source!r} does not exist in {folder}")
        if language == "c" and path.suffix != ".c":
            raise fail(f"C suite source {source!r} is not a .c file")
        if language == "python" and path.suffix != ".py":
            raise fail(f"Python suite source {source!r} is not a .py file")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise fail("description must be a string")
    return Suite(
        name=name,
        language=language,
        timeout=timeout,
        modules=modules,
        ship_modules=ship_modules,
        kconfig=kconfig,
        sources=sources,
        description=description,
        path=folder,
    )


def _strings(data: dict[str, Any], key: str, fail: Callable[[str], ManifestError]) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise fail(f"{key} must be a list of strings, got {value!r}")
    return tuple(value)
