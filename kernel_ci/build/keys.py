"""The build key (a digest of a build's input manifest) and human explanations of cache misses.

An input manifest is a flat ``dict[str, str]``. Entry names are conventional, by prefix:

- ``source``: the kernel source, e.g. ``"linux-5.10.223 sha256:<hex>"``
- ``toolchain``: a fingerprint of the compiler/binutils
- ``patch:<series>/<file>``: the sha256 of one patch file
- ``config:CONFIG_X``: one kconfig symbol of the final .config (``"n"`` when it is not set)
- ``flag:<name>``: a build flag (arch, make arguments, ...)
- ``tree-file:<path>``: (``--tree``) one uncommitted file of the user's tree: its sha256, or ``deleted``

Any other name is allowed and is compared like a plain value.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

KEY_SCHEMA = "kernel-ci/build-key/v1"

CONFIG_PREFIX = "config:"
PATCH_PREFIX = "patch:"
FLAG_PREFIX = "flag:"
TREE_FILE_PREFIX = "tree-file:"  # --tree: one uncommitted file of the user's tree (sha256 | "deleted")

_SET_RE = re.compile(r"(CONFIG_[A-Za-z0-9_]+)=(.*)")
_UNSET_RE = re.compile(r"#\s*(CONFIG_[A-Za-z0-9_]+) is not set")
_DIGEST_RE = re.compile(r"(?:(sha\d+|md5|blake2b?):)?([0-9a-fA-F]{16,})")
_MAX_VALUE_CHARS = 60


def config_entries(dot_config_text: str) -> dict[str, str]:
    """Every symbol of a .config as ``"config:CONFIG_X" -> value``.

    Values are kept as written (``y``, ``m``, ``"a string"`` with its quotes, ``0x10``, ``42``);
    ``# CONFIG_X is not set`` becomes ``"n"`` so that flipping a symbol off is a visible change.
    A later line for the same symbol wins, as in kconfig. Other comments and blank lines are ignored;
    any other line is an error (it is not a .config).
    """
    entries: dict[str, str] = {}
    for number, raw in enumerate(dot_config_text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        unset = _UNSET_RE.fullmatch(line)
        if unset:
            entries[CONFIG_PREFIX + unset.group(1)] = "n"
            continue
        if line.startswith("#"):
            continue
        setting = _SET_RE.fullmatch(line)
        if setting is None:
            raise ValueError(
                f"line {number} of the .config is neither 'CONFIG_X=value', '# CONFIG_X is not set' "
                f"nor a comment: {raw!r}"
            )
        entries[CONFIG_PREFIX + setting.group(1)] = setting.group(2)
    return entries


def build_key(manifest: Mapping[str, str]) -> str:
    """sha256 hex of the canonical encoding of a manifest: JSON with sorted keys, tagged with KEY_SCHEMA."""
    for name, value in manifest.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(
                f"build manifest entries must be str -> str, got {name!r}: {value!r} "
                f"({type(name).__name__} -> {type(value).__name__})"
            )
    document = {"schema": KEY_SCHEMA, "inputs": dict(sorted(manifest.items()))}
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


# Order in which groups of differences are listed, most telling first.
_GROUP_ORDER = ("source", "file", "toolchain", "patch", "flag", "other", "config")
_GROUP_NOUNS = {
    "source": ("source", "sources"),
    "file": ("changed file", "changed files"),
    "toolchain": ("toolchain", "toolchains"),
    "patch": ("patch", "patches"),
    "flag": ("build flag", "build flags"),
    "other": ("other input", "other inputs"),
    "config": ("config symbol", "config symbols"),
}


def _group(name: str) -> str:
    if name == "source":
        return "source"
    if name == "toolchain":
        return "toolchain"
    if name.startswith(TREE_FILE_PREFIX):
        return "file"
    if name.startswith(PATCH_PREFIX):
        return "patch"
    if name.startswith(FLAG_PREFIX):
        return "flag"
    if name.startswith(CONFIG_PREFIX):
        return "config"
    return "other"


def _sort_key(name: str) -> tuple[int, str]:
    return _GROUP_ORDER.index(_group(name)), name


def _is_digest(token: str) -> bool:
    return _DIGEST_RE.fullmatch(token) is not None


def _shorten(value: str, digests: bool = True) -> str:
    """Abbreviate digests ("sha256:3f2a9c..." -> "sha256:3f2a9c01..") and cap very long values."""

    def abbreviate(match: re.Match[str]) -> str:
        algorithm, digits = match.group(1), match.group(2)
        return (f"{algorithm}:" if algorithm else "") + digits[:8] + ".."

    text = " ".join(_DIGEST_RE.sub(abbreviate, token) for token in value.split(" ")) if digests else value
    if len(text) > _MAX_VALUE_CHARS:
        half = (_MAX_VALUE_CHARS - 3) // 2
        text = text[:half] + "..." + text[-half:]
    return text


def _change(cached: str, wanted: str) -> str:
    """ "old -> new", leaving out digests when the readable parts already differ."""
    cached_words = [t for t in cached.split() if not _is_digest(t)]
    wanted_words = [t for t in wanted.split() if not _is_digest(t)]
    if cached_words and wanted_words and cached_words != wanted_words:
        return f"{_shorten(' '.join(cached_words))} -> {_shorten(' '.join(wanted_words))}"
    return f"{_shorten(cached)} -> {_shorten(wanted)}"


@dataclass(frozen=True)
class InputDifference:
    """One manifest entry that differs between a cached build and the wanted one (None = absent)."""

    name: str
    cached: str | None
    wanted: str | None

    def describe(self) -> str:
        group = _group(self.name)
        if group == "file":
            return f"file {self.name.removeprefix(TREE_FILE_PREFIX)}: {self._file_change()}"
        if group == "patch":
            label = "patch " + self.name.removeprefix(PATCH_PREFIX)
            return f"{label}: {self._presence() or 'changed'}"
        if group == "config":
            label = self.name.removeprefix(CONFIG_PREFIX)
            cached = "absent" if self.cached is None else _shorten(self.cached, digests=False)
            wanted = "absent" if self.wanted is None else _shorten(self.wanted, digests=False)
            return f"{label}: {cached} -> {wanted}"
        label = "flag " + self.name.removeprefix(FLAG_PREFIX) if group == "flag" else self.name
        presence = self._presence()
        if presence == "added":
            return f"{label}: added ({_shorten(self.wanted or '')})"
        if presence == "removed":
            return f"{label}: removed (was {_shorten(self.cached or '')})"
        return f"{label}: {_change(self.cached or '', self.wanted or '')}"

    def _file_change(self) -> str:
        """An uncommitted file of a --tree build, in the user's words (edited, deleted, committed...)."""
        if self.cached is None:
            return "deleted (uncommitted)" if self.wanted == "deleted" else "edited (uncommitted)"
        if self.wanted is None:
            return "edit reverted or committed"
        return "deleted" if self.wanted == "deleted" else "edited again"

    def _presence(self) -> str | None:
        if self.cached is None:
            return "added"
        if self.wanted is None:
            return "removed"
        return None


def _plural(count: int, group: str) -> str:
    singular, plural = _GROUP_NOUNS[group]
    return f"{count} more {singular if count == 1 else plural}"


@dataclass
class MissExplanation:
    """Why a build key was not in the cache: the nearest cached build and how its inputs differ.

    ``nearest_key`` is None when nothing is cached at all; ``candidates`` is how many cached builds
    were compared.
    """

    nearest_key: str | None
    differences: list[InputDifference]
    candidates: int = 0

    def render(self, limit: int = 12) -> str:
        if self.nearest_key is None:
            return "cache miss: nothing is cached yet, so there is no earlier build to compare with"
        head = f"cache miss: the nearest of {self.candidates} cached build(s) is {self.nearest_key[:12]}"
        if not self.differences:
            return (
                f"{head}, whose inputs are identical: its key was computed differently "
                f"(build key schema changed from {KEY_SCHEMA}?)"
            )
        count = len(self.differences)
        lines = [f"{head}; {count} input{'s' if count != 1 else ''} differ:"]
        shown = self.differences[: max(limit, 0)]
        lines.extend(f"  - {difference.describe()}" for difference in shown)
        rest = self.differences[len(shown) :]
        if rest:
            counts: dict[str, int] = {}
            for difference in rest:
                group = _group(difference.name)
                counts[group] = counts.get(group, 0) + 1
            parts = [_plural(counts[group], group) for group in _GROUP_ORDER if group in counts]
            lines.append("  ... and " + ", ".join(parts))
        return "\n".join(lines)


def manifest_differences(cached: Mapping[str, str], wanted: Mapping[str, str]) -> list[InputDifference]:
    """Every entry that differs, sorted source, toolchain, patches, flags, others, then config symbols."""
    names = sorted(set(cached) | set(wanted), key=_sort_key)
    return [
        InputDifference(name, cached.get(name), wanted.get(name))
        for name in names
        if cached.get(name) != wanted.get(name)
    ]


def explain_miss(
    wanted: Mapping[str, str], cached: Iterable[tuple[str, Mapping[str, str]]]
) -> MissExplanation:
    """Compare the wanted manifest with every cached one (given newest first) and explain the nearest.

    Nearest = fewest differing entries; ties go to an entry with the same source, then to the one
    given first (the most recent).
    """
    best: tuple[tuple[int, int, int], str, list[InputDifference]] | None = None
    candidates = 0
    for position, (key, manifest) in enumerate(cached):
        candidates += 1
        differences = manifest_differences(manifest, wanted)
        same_source = manifest.get("source") == wanted.get("source")
        rank = (len(differences), 0 if same_source else 1, position)
        if best is None or rank < best[0]:
            best = (rank, key, differences)
    if best is None:
        return MissExplanation(nearest_key=None, differences=[], candidates=0)
    return MissExplanation(nearest_key=best[1], differences=best[2], candidates=candidates)


__all__ = [
    "KEY_SCHEMA",
    "InputDifference",
    "MissExplanation",
    "build_key",
    "config_entries",
    "explain_miss",
    "manifest_differences",
]
