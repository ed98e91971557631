"""Typed records passed between stages, each with one JSON round trip: `BuildMetadata` (metadata.json),
`PatchRejection` (a patch that does not apply, carried by build.patches.PatchApplyError to report.github).

The build writes metadata.json into its outputs (and so into the build cache, the CI artifact and the cache
service's manifest); the test stage, the CLI and the bench read it back. They used to read a dict by string
keys, so a renamed field broke a reader at run time, far from the writer. Now the writer builds a
`BuildMetadata` and every reader gets one from `read()`.

Why hand-written decoding rather than a library: the records are small frozen dataclasses of str, int,
float, tuples, str-keyed dicts and nested records, and the only runtime need is "exactly these keys, of
these types, or a clear error". `_decode` does that from the dataclasses' own type hints (~40 lines), where
a validation library would be a new runtime dependency of every install for one file format.

The JSON on disk keeps schema 1's layout and field names (the cache service's list and page, the CI
workflow and people read build_key, kernel.version, ccache.hit_rate, ...); schema 2 adds recipe_key.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from kernel_ci.core.errors import UsageError
from kernel_ci.core.files import write_text_atomic

METADATA_SCHEMA = 2
METADATA_FILE = "metadata.json"

T = TypeVar("T")


class RecordError(UsageError, ValueError):
    """A record file that is not what this version of kernel-ci writes; the message says what to do."""


@dataclass(frozen=True)
class KernelInfo:
    requested: str  # the version or alias asked for ("5.10")
    version: str  # the version built (after any fallback)
    release: str  # `uname -r` of the built kernel
    tarball: str
    sha256: str
    fetched_from: str
    fallbacks: tuple[str, ...]  # one note per candidate that could not be had


@dataclass(frozen=True)
class ToolchainInfo:
    image: str  # the builder image tag
    image_id: str
    fingerprint: str  # digest of the package versions inside the image
    gcc: str


@dataclass(frozen=True)
class CcacheFigures:
    hits: int
    misses: int
    hit_rate: float


@dataclass(frozen=True)
class BuildMetadata:
    """metadata.json: what was built, from what, how, and how to build it again."""

    schema: int
    build_key: str
    request_key: str
    recipe_key: str
    created: str  # ISO 8601, UTC
    kernel: KernelInfo
    series: tuple[str, ...]
    patches: tuple[str, ...]  # "series/file.patch" in apply order
    fragments: tuple[str, ...]  # the kconfig fragments merged, by name, in merge order
    external_modules: Mapping[str, tuple[str, ...]]  # module -> its .ko files in the outputs
    kselftests: Mapping[str, tuple[str, ...]]  # selftests target -> its files in the outputs
    toolchain: ToolchainInfo
    kbuild: Mapping[str, str | int]  # the KBUILD_*/CCACHE_* variables, jobs and kbuild steps
    durations: Mapping[str, float]  # seconds per stage
    ccache: CcacheFigures | None  # None: built without ccache
    inputs: Mapping[str, str]  # the build manifest the build key is the digest of
    reproduce: str  # the command that builds it again

    @property
    def kbuild_timestamp(self) -> str:
        return str(self.kbuild["KBUILD_BUILD_TIMESTAMP"])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = METADATA_FILE) -> BuildMetadata:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{where}: not JSON ({exc}); rebuild the kernel to write it again") from exc
        if not isinstance(document, dict):
            raise RecordError(f"{where}: expected a JSON object, got {type(document).__name__}")
        schema = document.get("schema")
        if schema != METADATA_SCHEMA:
            again = document.get("reproduce") or "kernel-ci build"
            raise RecordError(
                f"{where}: build metadata schema {schema!r}, this kernel-ci reads schema {METADATA_SCHEMA} "
                f"(written by another version of kernel-ci); rebuild with: {again}"
            )
        return _decode(cls, document, where)

    def write(self, directory: Path) -> Path:
        return write_text_atomic(directory / METADATA_FILE, self.to_json())

    @classmethod
    def read(cls, directory: Path) -> BuildMetadata:
        """The metadata of a build output dir (or cache entry)."""
        path = directory / METADATA_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise RecordError(f"{path} is missing: {directory} is not a kernel-ci build output") from None
        return cls.from_json(text, str(path))


@dataclass(frozen=True)
class PatchRejection:
    """A patch that does not apply, as the build saw it. PatchApplyError carries one (`.rejection`), so
    that the report (GitHub annotations) reads the failure without importing the build's patch code."""

    series: str
    patch_file: str  # the file name inside the series folder
    target_file: str | None  # the first file patch could not change
    problems: tuple[str, ...]  # "<file>: hunk #N FAILED at line L", "<file>: ..." one per problem
    hint: str
    tree: str | None  # the source tree it was applied to (its Makefile tells the kernel version)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "patch rejection") -> PatchRejection:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{where}: not JSON ({exc})") from exc
        return _decode(cls, document, where)


_HUNK_HEADER = re.compile(r"@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")


def header_lines(patch_text: str) -> Iterator[tuple[int, str]]:
    """(1-based number, line) of every line of a patch outside hunk bodies: file headers and @@ lines.

    The patch file's layout, read by the build (which files a patch touches) and by the report (where a
    failed hunk is in the patch file). Hunk bodies are skipped by their counted lengths, so a removed line
    that happens to start with "--- " is never taken for a file header.
    """
    old_left = new_left = 0
    for number, line in enumerate(patch_text.splitlines(), start=1):
        if old_left > 0 or new_left > 0:
            tag = line[:1]
            if tag == "\\":
                continue
            if tag in (" ", ""):
                old_left, new_left = old_left - 1, new_left - 1
                continue
            if tag == "-":
                old_left -= 1
                continue
            if tag == "+":
                new_left -= 1
                continue
            old_left = new_left = 0  # malformed hunk: read the line as a header
        if hunk := _HUNK_HEADER.match(line):
            old_left = int(hunk.group(1)) if hunk.group(1) is not None else 1
            new_left = int(hunk.group(2)) if hunk.group(2) is not None else 1
        yield number, line


def _decode(kind: Any, value: Any, where: str) -> Any:
    """value (parsed JSON) as an instance of the type `kind`, or a RecordError naming the path in it."""
    origin = typing.get_origin(kind)
    if isinstance(kind, type) and is_dataclass(kind):
        return _decode_record(kind, value, where)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _decode(option, value, where)
                except RecordError:
                    continue
        raise RecordError(f"{where}: expected {_name(kind)}, got {value!r}")
    if origin is tuple:
        item = typing.get_args(kind)[0]
        _expect(isinstance(value, list), where, "a list", value)
        return tuple(_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Mapping:
        key_kind, item = typing.get_args(kind)
        _expect(isinstance(value, dict) and key_kind is str, where, "an object", value)
        return {k: _decode(item, v, _child(where, k)) for k, v in value.items()}
    if kind is float:
        _expect(isinstance(value, int | float) and not isinstance(value, bool), where, "a number", value)
        return float(value)
    if kind in (str, int):
        _expect(isinstance(value, kind) and not isinstance(value, bool), where, f"a {kind.__name__}", value)
        return value
    raise TypeError(f"{where}: no JSON decoding for {kind!r}")  # a field type this module does not know


def _decode_record(kind: type[T], value: Any, where: str) -> T:
    _expect(isinstance(value, dict), where, "an object", value)
    hints = typing.get_type_hints(kind)
    names = [f.name for f in fields(kind)]  # type: ignore[arg-type]  # T is bound to dataclasses by the callers
    missing = [n for n in names if n not in value]
    unknown = sorted(set(value) - set(names))
    if missing or unknown:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(unknown)}"] if unknown else []
        )
        raise RecordError(
            f"{where}: not the {kind.__name__} this kernel-ci writes ({'; '.join(problems)}); "
            "rebuild to write it again"
        )
    return kind(**{n: _decode(hints[n], value[n], _child(where, n)) for n in names})


def _child(where: str, name: str) -> str:
    """ "metadata.json" + "kernel" -> "metadata.json: kernel"; then "metadata.json: kernel.version"."""
    return f"{where}.{name}" if ": " in where else f"{where}: {name}"


def _expect(ok: bool, where: str, what: str, value: Any) -> None:
    if not ok:
        raise RecordError(f"{where}: expected {what}, got {type(value).__name__} {value!r:.60}")


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind)


__all__ = [
    "METADATA_FILE",
    "METADATA_SCHEMA",
    "BuildMetadata",
    "CcacheFigures",
    "KernelInfo",
    "PatchRejection",
    "RecordError",
    "ToolchainInfo",
    "header_lines",
]
