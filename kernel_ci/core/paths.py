"""Where things live: the tool's own data (shipped in the package), the user's project, the per-user cache.

Two kinds of files, found two ways:

- the tool's data ships IN the package (``kernel_ci/data/``: container recipes, the guest's init and
  runner, the protocol, the default suites and their module, the default kernel-sources lock), so a wheel
  or a pipx install has it wherever it is installed: found from this file, never from the current
  directory;
- the user's *project* (``kernel-patches/``, ``guest-tests/``, ``kernel-modules/``, ``kconfig/``, and
  optionally its own ``kernel-sources.lock.toml`` that overrides the packaged one) is found by
  ``find_project``: ``--project DIR``, else ``$KERNEL_CI_PROJECT``, else the first directory from the
  current one upwards that holds the project markers, else the current directory as a *bare* project
  (every folder optional: the packaged default suites, the packaged lock). The CLI resolves it once and
  hands the paths down. Suites are looked up along ``Project.suite_path``: the project's ``guest-tests/``
  first, then the defaults shipped in ``kernel_ci/data/guest/suites/``; out-of-tree modules along
  ``Project.module_path``: its ``kernel-modules/`` first, then ``kernel_ci/data/modules/``.

``CHECKOUT`` and the ``KERNEL_PATCHES``/``GUEST_TESTS``/... constants below name the source checkout this
package was imported from (an editable install, the tests): they are the defaults of library functions, not
what the CLI uses, which passes its ``Project``'s paths explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kernel_ci.core.errors import UsageError
from kernel_ci.core.settings import default_cache_root

# --- the tool's own data, inside the package ---------------------------------------------------------
PACKAGE_DATA = Path(__file__).resolve().parents[1] / "data"
CONTAINERS = PACKAGE_DATA / "containers"
GUEST_DATA = PACKAGE_DATA / "guest"
GUEST_INIT = GUEST_DATA / "init" / "kci-init"
GUEST_RUNNER = GUEST_DATA / "runner" / "kci-runner.py"
PROTOCOL_DOC = GUEST_DATA / "PROTOCOL.md"
DEFAULT_SUITES = GUEST_DATA / "suites"  # smoke-c, smoke-py: a project's guest-tests/<name> overrides one
DEFAULT_MODULES = PACKAGE_DATA / "modules"  # kci-smoke, the default suites load it; kernel-modules/ wins
KTAP_LIB = GUEST_DATA / "lib"  # ktap.h / ktap.c for C suites (a project's own guest-tests/lib/ wins)
DEFAULT_BASE_CONFIG = PACKAGE_DATA / "kconfig" / "base.config"  # a project's kconfig/base.config wins
LOCK_NAME = "kernel-sources.lock.toml"
DEFAULT_SOURCES_LOCK = PACKAGE_DATA / LOCK_NAME

# --- the project: what makes a directory one, and how it is found -------------------------------------
PROJECT_ENV = "KERNEL_CI_PROJECT"
# both must be there: `guest-tests/` alone is too common a name to claim a directory on
PROJECT_MARKERS = ("kernel-patches", "guest-tests")


@dataclass(frozen=True)
class Project:
    """A project directory and the folders kernel-ci reads from it."""

    root: Path

    @property
    def kernel_patches(self) -> Path:
        return self.root / "kernel-patches"

    @property
    def guest_tests(self) -> Path:
        return self.root / "guest-tests"

    @property
    def suite_path(self) -> tuple[Path, ...]:
        """Where suites are found, first match of a name wins: the project's guest-tests/ (when it has one),
        then the defaults shipped in the package."""
        return (self.guest_tests, DEFAULT_SUITES)

    @property
    def kernel_modules(self) -> Path:
        return self.root / "kernel-modules"

    @property
    def module_path(self) -> tuple[Path, ...]:
        """Where out-of-tree modules are found, first match of a name wins: the project's kernel-modules/,
        then the defaults shipped in the package (the kci-smoke module the default suites load)."""
        return (self.kernel_modules, DEFAULT_MODULES)

    @property
    def kconfig(self) -> Path:
        return self.root / "kconfig"

    @property
    def base_config(self) -> Path:
        """The kconfig fragment every build starts from: the project's kconfig/base.config, else the
        packaged one."""
        own = self.kconfig / "base.config"
        return own if own.is_file() else DEFAULT_BASE_CONFIG

    @property
    def sources_lock(self) -> Path:
        """The project's own lock when it has one (pin other kernels), else the packaged default."""
        own = self.root / LOCK_NAME
        return own if own.is_file() else DEFAULT_SOURCES_LOCK

    @property
    def output(self) -> Path:
        """The default --output: `out/` in the project, wherever the command was started from."""
        return self.root / "out"


def is_project(directory: Path) -> bool:
    return all((directory / marker).is_dir() for marker in PROJECT_MARKERS)


def find_project(
    explicit: Path | None = None, *, cwd: Path | None = None, environ: Mapping[str, str] | None = None
) -> Project | None:
    """--project (explicit), else $KERNEL_CI_PROJECT, else the nearest directory from cwd upwards that holds
    the markers; None when there is none. A directory given explicitly may be a *bare* project (a kconfig
    fragment, nothing at all: the packaged default suites, a vanilla kernel) but must exist (exit 2)."""
    env = os.environ if environ is None else environ
    given = explicit or (Path(env[PROJECT_ENV]) if env.get(PROJECT_ENV) else None)
    if given is not None:
        root = given.expanduser().resolve()
        if not root.is_dir():
            where = "--project" if explicit is not None else f"${PROJECT_ENV}"
            raise UsageError(f"{where} {given}: no such directory")
        return Project(root)
    start = (cwd or Path.cwd()).resolve()
    for directory in (start, *start.parents):
        if is_project(directory):
            return Project(directory)
    return None


def require_project(
    explicit: Path | None = None, *, cwd: Path | None = None, environ: Mapping[str, str] | None = None
) -> Project:
    """find_project, else the current directory as a bare project: no series, modules or fragments of its
    own, the packaged default suites (smoke-c, smoke-py) and lock file."""
    found = find_project(explicit, cwd=cwd, environ=environ)
    return found if found is not None else Project((cwd or Path.cwd()).resolve())


# --- the source checkout this package came from (library defaults, tests) -----------------------------
CHECKOUT = Path(__file__).resolve().parents[2]
REPO_ROOT = CHECKOUT  # the older name
KERNEL_PATCHES = CHECKOUT / "kernel-patches"
KERNEL_MODULES = CHECKOUT / "kernel-modules"
MODULE_PATH = (KERNEL_MODULES, DEFAULT_MODULES)  # the checkout's Project(CHECKOUT).module_path
GUEST_TESTS = CHECKOUT / "guest-tests"
SUITE_PATH = (GUEST_TESTS, DEFAULT_SUITES)  # the checkout's Project(CHECKOUT).suite_path
KCONFIG_DIR = CHECKOUT / "kconfig"
SOURCES_LOCK = DEFAULT_SOURCES_LOCK


def cache_root() -> Path:
    """$KERNEL_CI_CACHE, else $XDG_CACHE_HOME/kernel-ci, else ~/.cache/kernel-ci (the user's input, read
    by the same rule as Settings.cache_root; no module of ours sets the variable for another)."""
    return default_cache_root(os.environ)


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
