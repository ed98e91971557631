"""Guest test suites: each is a folder `guest-tests/<name>/` with a `manifest.toml`.

Suites are found along a *suite path* (core.paths.Project.suite_path): the project's guest-tests/, then the
defaults shipped in the package (kernel_ci/data/guest/suites/: smoke-c, smoke-py); a name found earlier
hides the same name later, so a project's own guest-tests/smoke-c replaces the packaged one. A folder of the
path that does not exist is skipped (a project without guest-tests/ still has the defaults). C suites build
with a KTAP lib/: the one next to the suite's folder when there is one, else the packaged one.

name = "smoke-c"                    # must equal the folder name
language = "c"                      # "c" (static binary printing KTAP), "python" (pytest) or
                                    # "kselftest" (tools/testing/selftests/<targets>, built with the kernel)
timeout = 60                        # seconds before the runner kills the suite
modules = ["kci-smoke"]             # module folders (Project.module_path: the project's kernel-modules/<dir>,
                                    # else the packaged kernel_ci/data/modules/<dir>) the runner loads
                                    # before and unloads after
ship_modules = []                   # module folders only copied to /kci/modules
kconfig = ["CONFIG_PROC_FS=y"]      # options the kernel under test must have
sources = ["smoke.c"]               # C: the .c files; Python: the test files; kselftest: none
targets = ["ptrace"]                # kselftest only: the selftests TARGETS to build and run
description = "..."                 # optional

A kselftest suite may list the selftests expected to fail in `expected-failures.toml` next to its manifest:

[[xfail]]
test = "ptrace:vmaccess"            # collection:binary, as kselftest-list.txt names it
case = "global.attach"              # optional: one kselftest_harness case of that binary
kernels = ["5.10"]                  # optional: kernel versions (prefixes of the release) it applies to
reason = "why it fails there"
timeout = 10                        # optional, with case: cut kselftest_harness's per-test timeout (30 s)
                                    # for this case to 10 s, for a case whose failure IS that timeout
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kernel_ci.core.errors import UsageError
from kernel_ci.core.paths import KTAP_LIB, SUITE_PATH

Language = Literal["c", "python", "kselftest"]
# one folder of suites, or a suite path (folders in order, the first holding a name wins)
SuiteRoots = Path | Sequence[Path]
MANIFEST = "manifest.toml"
EXPECTED_FAILURES = "expected-failures.toml"
NOT_SUITES = frozenset({"lib", "runner", "init"})
LANGUAGES: tuple[Language, ...] = ("c", "python", "kselftest")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_KCONFIG = re.compile(
    r'^(CONFIG_[A-Za-z0-9_]+=(?:y|m|n|-?\d+|0x[0-9a-fA-F]+|"[^"]*")|# CONFIG_[A-Za-z0-9_]+ is not set)$'
)
_KEYS = {
    "name", "language", "timeout", "modules", "ship_modules", "kconfig", "sources", "description", "targets"
}  # fmt: skip
_TARGET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*(?:/[A-Za-z0-9][A-Za-z0-9_.+-]*)*$")
HARNESS_TIMEOUT = 30  # kselftest_harness.h TEST_TIMEOUT_DEFAULT
_XFAIL_KEYS = {"test", "case", "kernels", "reason", "timeout"}


class ManifestError(UsageError, ValueError):
    """A suite folder or manifest that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class ExpectedFailure:
    """A kselftest expected to fail (expected-failures.toml): reported as skipped with the reason."""

    collection: str  # the selftests target (kselftest-list.txt's collection)
    test: str  # the binary
    case: str  # one kselftest_harness case of it, or "" for the binary's own result
    reason: str
    kernels: tuple[str, ...] = ()  # version prefixes ("5.10"); empty: every kernel
    # seconds: the guest runner fires the harness's own timeout (SIGALRM) for this case after this long
    # instead of the compiled-in 30 s; None: the harness's own
    timeout: float | None = None

    def applies_to(self, kernel_release: str) -> bool:
        return not self.kernels or any(
            kernel_release == k or kernel_release.startswith((f"{k}.", f"{k}-")) for k in self.kernels
        )

    @property
    def testcase(self) -> str:
        """The testcase name the KTAP of kselftest's runner gives it (kernel_ci.report.ktap.flatten)."""
        name = f"selftests: {self.collection}: {self.test}"
        return f"{name}.{self.case}" if self.case else name


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
    targets: tuple[str, ...] = ()  # kselftest: tools/testing/selftests TARGETS
    expected_failures: tuple[ExpectedFailure, ...] = ()

    @property
    def lib(self) -> Path:
        """The KTAP lib/ a C suite builds with: its folder's sibling lib/ (a project's own), else the
        packaged one."""
        own = self.path.parent / "lib"
        return own if (own / "ktap.c").is_file() else KTAP_LIB

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


def roots_of(roots: SuiteRoots) -> tuple[Path, ...]:
    """A suite path as a tuple of folders (one folder is a path of one)."""
    return (roots,) if isinstance(roots, Path) else tuple(roots)


def suite_folders(roots: SuiteRoots = SUITE_PATH) -> dict[str, Path]:
    """Every suite folder along the path by name, the first of a name winning, sorted by name."""
    found: dict[str, Path] = {}
    for root in roots_of(roots):
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            if p.is_dir() and p.name not in NOT_SUITES and not p.name.startswith("."):
                found.setdefault(p.name, p)
    return dict(sorted(found.items()))


def load_suites(roots: SuiteRoots = SUITE_PATH, names: Sequence[str] | None = None) -> list[Suite]:
    """All suites along roots (sorted by name), or the named ones in the order given."""
    available = suite_folders(roots)
    if names is None:
        return [load_suite(p) for p in available.values()]
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
            raise fail(f"module {module!r} is not a module folder name (kernel-modules/<name>)")
    kconfig = _strings(data, "kconfig", fail)
    for line in kconfig:
        if not _KCONFIG.match(line):
            raise fail(
                f"kconfig line {line!r} is not CONFIG_X=y|m|n|number|\"string\" or '# CONFIG_X is not set'"
            )
    sources = _strings(data, "sources", fail)
    targets = _strings(data, "targets", fail)
    if language == "kselftest":
        if not targets:
            raise fail('a kselftest suite needs targets, e.g. targets = ["ptrace"]')
        for target in targets:
            if not _TARGET.match(target) or ".." in target.split("/"):
                raise fail(f"target {target!r} is not a folder under tools/testing/selftests")
        if sources:
            raise fail("a kselftest suite has no sources: its tests are built from the kernel tree")
    elif targets:
        raise fail(f"targets is only for kselftest suites, not {language}")
    elif not sources:
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
    expected = _expected_failures(folder, language, targets)
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
        targets=targets,
        expected_failures=expected,
    )


def _expected_failures(folder: Path, language: str, targets: tuple[str, ...]) -> tuple[ExpectedFailure, ...]:
    path = folder / EXPECTED_FAILURES
    if not path.exists():
        return ()

    def fail(message: str) -> ManifestError:
        return ManifestError(f"{path}: {message}")

    if language != "kselftest":
        raise fail("only kselftest suites have expected failures")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise fail(f"not valid TOML: {exc}") from exc
    if set(data) - {"xfail"}:
        raise fail(f"unknown key(s) {', '.join(sorted(set(data) - {'xfail'}))} (only [[xfail]] tables)")
    entries = data.get("xfail", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise fail("xfail must be an array of tables ([[xfail]])")
    found: list[ExpectedFailure] = []
    for index, entry in enumerate(entries, 1):
        where = f"[[xfail]] #{index}"
        extra = sorted(set(entry) - _XFAIL_KEYS)
        if extra:
            known = ", ".join(sorted(_XFAIL_KEYS))
            raise fail(f"{where}: unknown key(s) {', '.join(extra)} (known: {known})")
        test, case, reason = entry.get("test"), entry.get("case", ""), entry.get("reason")
        if not isinstance(test, str) or test.count(":") != 1 or not all(test.split(":")):
            raise fail(f"{where}: test must be 'collection:binary' (e.g. 'ptrace:vmaccess'), got {test!r}")
        collection, binary = test.split(":")
        if collection not in targets:
            raise fail(f"{where}: {collection!r} is not one of the suite's targets ({', '.join(targets)})")
        if not isinstance(case, str):
            raise fail(f"{where}: case must be a string")
        if not isinstance(reason, str) or not reason.strip():
            raise fail(f"{where}: every expected failure needs its reason")
        kernels = entry.get("kernels", [])
        if not isinstance(kernels, list) or not all(isinstance(k, str) and k for k in kernels):
            raise fail(f"{where}: kernels must be a list of versions, got {kernels!r}")
        timeout = _xfail_timeout(entry, case, fail, where)
        found.append(ExpectedFailure(collection, binary, case, reason.strip(), tuple(kernels), timeout))
    return tuple(found)


def _xfail_timeout(
    entry: dict[str, Any], case: str, fail: Callable[[str], ManifestError], where: str
) -> float | None:
    """An expected failure's cut harness timeout: only for one case (the harness times cases, not
    binaries), a number of seconds in (0, 30) (30 s is the harness's own)."""
    if "timeout" not in entry:
        return None
    value = entry["timeout"]
    if not case:
        raise fail(f"{where}: timeout needs a case (kselftest_harness times each case)")
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < HARNESS_TIMEOUT:
        raise fail(f"{where}: timeout must be seconds between 0 and {HARNESS_TIMEOUT}, got {value!r}")
    return float(value)


def _strings(data: dict[str, Any], key: str, fail: Callable[[str], ManifestError]) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise fail(f"{key} must be a list of strings, got {value!r}")
    return tuple(value)
