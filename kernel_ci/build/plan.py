"""The build plan: every input that decides which kernel is built, gathered once, and the three keys.

Three keys name a build, each computed at a different moment:

- the *recipe key* (`kernel-ci key`, CI cache keys): from the repository's files alone, before Docker;
- the *request key* (the build cache's alias table): the same plus the toolchain fingerprint, read from the
  builder image, before `make olddefconfig`;
- the *build key* (the build cache's entries): the same plus the final .config.

They used to be derived in two places (the pipeline and kernel_ci/build/recipe.py), which drifted: the
recipe key
left out the kselftest targets, so equal recipe keys could give different build keys. Now both derive from
one `BuildPlan`, and each key is the plan's entries plus what is known at its moment, so the three carry the
same inputs by construction (tests/unit/test_buildplan.py checks every field of the plan against each key).

Guest suites never choose what is built: the plan carries every suite's needs (kconfig lines and kselftest
targets), and `--suite` only filters what runs. A suite's need that the chosen series cannot meet (a symbol
only a patch adds) is not a build error: the build says which suite will be skipped, and `kernel-ci test`
skips it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from kernel_ci.build import artifacts as outputs
from kernel_ci.build import extmodules, images, kconfig, kselftest, patches, source
from kernel_ci.build import kbuild as builder
from kernel_ci.build import keys as buildkey
from kernel_ci.build import tree as usertree
from kernel_ci.build.source import Tarball
from kernel_ci.core.errors import BuildError
from kernel_ci.core.paths import (
    DEFAULT_BASE_CONFIG,
    KCONFIG_DIR,
    KERNEL_PATCHES,
    MODULE_PATH,
    SUITE_PATH,
    cache_dir,
)
from kernel_ci.guest import suites

BASE_FRAGMENT = DEFAULT_BASE_CONFIG  # the packaged one; a project's kconfig/base.config wins
BUILD_TARGETS = "bzImage modules scripts_gdb modules_install vmlinux.xz"
RECIPE_SCHEMA = "kernel-ci-recipe-3"  # 2: one plan for all keys (kselftest targets, series order added);
# 3: the outputs hold vmlinux.xz and the gdb scripts (an entry of 2 lacks them)
SUITE_FRAGMENT_PREFIX = "suite "


class PlanError(BuildError):
    """A plan that cannot be made or used as asked; the message says why."""


@dataclass(frozen=True)
class SourcePin:
    """One kernel tarball of the lock file: its version and pinned sha256 ("" = not pinned yet); or a user's
    tree (--tree): its Makefile version and content digest, under another scheme."""

    version: str
    sha256: str
    scheme: str = "sha256"

    @classmethod
    def of(cls, tarball: source.Tarball) -> SourcePin:
        return cls(tarball.version, tarball.sha256)

    def render(self) -> str:
        return f"linux-{self.version} {self.scheme}:{self.sha256 or 'unpinned'}"

    @classmethod
    def of_tree(cls, state: usertree.TreeState) -> SourcePin:
        """A --tree source: its base (commit tree id, or every file's digest); the changes are entries."""
        return cls(f"{state.version} tree", state.base, state.scheme)


def build_flags() -> tuple[tuple[str, str], ...]:
    """The make invocation's fixed settings: a change to any of them is a different build."""
    return (
        ("arch", builder.ARCH),
        ("targets", BUILD_TARGETS),
        # what the outputs keep for debugging, and how (build.artifacts: the gdb scripts' constants.py)
        (
            "debug",
            f"vmlinux.xz (xz -{outputs.VMLINUX_XZ_PRESET}, {outputs.VMLINUX_XZ_STREAMS} streams); "
            "gdb scripts: int literals, an import each",
        ),
        ("kbuild", f"user={builder.KBUILD_USER} host={builder.KBUILD_HOST} version=1 timestamp=source"),
        # which source files the kbuild/ export holds: an entry with another selection is another output
        ("kbuild-export", outputs.EXPORT_SELECTION),
    )


@dataclass(frozen=True)
class BuildPlan:
    """What is built, as data: equal plans (and toolchains) build the same kernel.

    Every field must reach every key through `entries()`; tests/unit/test_buildplan.py changes each field
    in turn (found by introspection) and requires all three keys to change.
    """

    source: tuple[SourcePin, ...]  # the lock file's candidates in order; after resolved(): the one fetched
    series: tuple[str, ...]  # patch series in the order they are applied
    patches: tuple[tuple[str, str], ...]  # ("series/file.patch", sha256), in apply order
    kconfig: str  # the merged fragment (base, series, every suite's needs, the user's), as kconfig reads it
    kselftests: tuple[str, ...]  # tools/testing/selftests targets built with the kernel (every suite's)
    modules: tuple[tuple[str, str], ...]  # ("<module>/<file>", sha256) of the out-of-tree modules
    toolchain_recipe: str  # the builder image tag: a digest of its recipe files
    flags: tuple[tuple[str, str], ...]  # build_flags()
    # --tree: (path, sha256 | "deleted") of each uncommitted change, so a miss names the files that changed
    tree_files: tuple[tuple[str, str], ...] = ()

    def entries(self) -> dict[str, str]:
        """The plan as build-manifest entries (names per kernel_ci.build.keys's conventions)."""
        return {
            "source": " ".join(pin.render() for pin in self.source),
            "series": " ".join(self.series),
            **{buildkey.PATCH_PREFIX + name: digest for name, digest in self.patches},
            "fragment": hashlib.sha256(self.kconfig.encode()).hexdigest(),
            buildkey.FLAG_PREFIX + "kselftest": " ".join(self.kselftests),
            **{f"module:{name}": digest for name, digest in self.modules},
            "toolchain-recipe": self.toolchain_recipe,
            **{buildkey.FLAG_PREFIX + name: value for name, value in self.flags},
            **{buildkey.TREE_FILE_PREFIX + name: digest for name, digest in self.tree_files},
        }

    def recipe_inputs(self) -> dict[str, str]:
        """Files only: what a CI cache can be keyed by before Docker runs."""
        return {"schema": RECIPE_SCHEMA, **self.entries()}

    def request_inputs(self, toolchain_fingerprint: str) -> dict[str, str]:
        """Before configure. The fingerprint (package versions in the image) is in: a mirror that serves
        other versions for the same recipe builds another toolchain, and the alias must not cross that."""
        return {**self.entries(), "toolchain": toolchain_fingerprint}

    def build_inputs(self, final_config: str, toolchain_fingerprint: str) -> dict[str, str]:
        """After configure: the request's inputs and every symbol of the final .config."""
        return {**self.request_inputs(toolchain_fingerprint), **buildkey.config_entries(final_config)}

    def recipe_key(self) -> str:
        return buildkey.build_key(self.recipe_inputs())

    def request_key(self, toolchain_fingerprint: str) -> str:
        return buildkey.build_key(self.request_inputs(toolchain_fingerprint))

    def build_key(self, final_config: str, toolchain_fingerprint: str) -> str:
        return buildkey.build_key(self.build_inputs(final_config, toolchain_fingerprint))

    def resolved(self, tarball: Tarball) -> BuildPlan:
        """The plan once the source is fetched: the candidate actually built instead of the list, so that a
        version reached by a fallback ("5.10" -> 5.10.223) builds the same as asking for it directly."""
        pin = SourcePin.of(tarball)
        if pin not in self.source:
            raise PlanError(f"{pin.render()} is not a candidate of this plan ({self._source_text()})")
        return replace(self, source=(pin,))

    def prefix(self, series: str, count: int) -> BuildPlan:
        """The plan with series truncated after its count-th patch (0: the kernel without it), the series
        before it kept whole and those after it dropped: the kernels attribution tests (flow/attribute.py).

        Its keys derive from it like any plan's, so each prefix is its own build-cache entry, and the full
        length gives back this very plan (the same keys: the run's own build is reused)."""
        if series not in self.series:
            raise PlanError(f"series {series!r} is not in this plan ({' '.join(self.series) or 'none'})")
        names = [name for name, _digest in self.patches if name.split("/", 1)[0] == series]
        if not 0 <= count <= len(names):
            raise PlanError(f"series {series} has {len(names)} patches: no prefix of {count}")
        position = self.series.index(series)
        kept_series = self.series[: position + 1] if count else self.series[:position]
        earlier = set(self.series[:position])
        kept = set(names[:count])
        return replace(
            self,
            series=kept_series,
            patches=tuple(p for p in self.patches if p[0].split("/", 1)[0] in earlier or p[0] in kept),
        )

    def _source_text(self) -> str:
        return ", ".join(pin.render() for pin in self.source)


@dataclass(frozen=True)
class SuiteNeeds:
    """What the guest suites need from the kernel under test: kconfig lines and kselftest targets."""

    fragments: tuple[kconfig.Fragment, ...]  # one per suite with kconfig lines, named "suite <name>"
    kselftests: tuple[str, ...]  # sorted, without repeats


def suite_needs(
    suites_dir: suites.SuiteRoots | None = SUITE_PATH, names: Sequence[str] | None = None
) -> SuiteNeeds:
    """The needs of the named suites along suites_dir, a folder or a suite path (default: all of them;
    None: none)."""
    if suites_dir is None:
        return SuiteNeeds((), ())
    chosen = suites.load_suites(suites_dir, names)
    suites.kconfig_lines(chosen)  # two suites asking for different values is an error
    fragments = tuple(
        kconfig.Fragment(SUITE_FRAGMENT_PREFIX + s.name, "\n".join(s.kconfig) + "\n")
        for s in chosen
        if s.kconfig
    )
    targets = kselftest.normalize_targets([t for s in chosen if s.language == "kselftest" for t in s.targets])
    return SuiteNeeds(fragments, targets)


def _base_config(kconfig_dir: Path) -> Path:
    """The project's kconfig/base.config (core.paths.Project.base_config), else the packaged one."""
    own = kconfig_dir / "base.config"
    return own if own.is_file() else DEFAULT_BASE_CONFIG


@dataclass(frozen=True)
class PlannedBuild:
    """A plan and the files behind it, which the pipeline needs to carry it out (none of them goes into a
    key by itself: their digests are in the plan)."""

    plan: BuildPlan
    candidates: tuple[source.Tarball, ...]
    series: tuple[patches.Series, ...]
    fragments: tuple[kconfig.Fragment, ...]  # in merge order
    merged: kconfig.Merged
    modules: tuple[extmodules.ModuleSource, ...]
    # fragments whose requests may be lost without failing the build: those of a series cut short by
    # prefix() (the symbol they ask for may come with a later patch of it)
    tolerated: frozenset[str] = frozenset()

    def prefix(self, series: str, count: int) -> PlannedBuild:
        """This build with series truncated after its count-th patch (BuildPlan.prefix, the one definition
        of a prefix); everything else of the build (the user's fragments, the suites' needs, the modules,
        the source) is this build's.

        The patch files carried follow the plan. A series left out entirely leaves its kconfig fragments
        out too, so that the prefix without any series is the very plan of the kernel without them (the
        baseline: the same key as `--series none` with the same options); a series cut short keeps its
        fragments, whose requests it may not meet yet (a later patch adds the symbol): tolerated, a
        warning rather than a failed build."""
        plan = self.plan.prefix(series, count)
        position = self.plan.series.index(series)
        chosen = list(self.series[:position])
        whole = self.series[position]
        if count:
            chosen.append(replace(whole, patches=whole.patches[:count]))
        dropped = {
            series_fragment_name(s.name, f)
            for s in self.series
            if s.name not in plan.series
            for f in s.fragments
        }
        fragments = tuple(f for f in self.fragments if f.name not in dropped)
        merged = kconfig.merge(fragments)
        cut_short = 0 < count < len(whole.patches)
        tolerated = {series_fragment_name(whole.name, f) for f in whole.fragments} if cut_short else set()
        return replace(
            self,
            plan=replace(plan, kconfig=merged.render()),
            series=tuple(chosen),
            fragments=fragments,
            merged=merged,
            tolerated=self.tolerated | tolerated,
        )

    def unmet_needs(self, final_config: str) -> tuple[list[kconfig.Lost], list[kconfig.Lost]]:
        """Requested symbols that did not survive olddefconfig: (errors, suites' needs only).

        A lost request is a suite's need only when no other fragment asked for the same value: a suite
        whose need cannot be met is skipped at test time, while base, series and user fragments are
        requirements of the build itself.
        """
        lost = kconfig.verify(final_config, self.merged.requests)
        required = kconfig.merge(
            f for f in self.fragments if not _is_suite_fragment(f.name) and f.name not in self.tolerated
        ).requests
        errors, suite_only = [], []
        for item in lost:
            if item.request.fragment in self.tolerated:
                suite_only.append(item)
                continue
            also_required = required.get(item.request.symbol)
            if _is_suite_fragment(item.request.fragment) and (
                also_required is None or also_required.value != item.request.value
            ):
                suite_only.append(item)
            else:
                errors.append(item)
        return errors, suite_only


def _external_staging(path: Path) -> Path:
    """Where --patches' mails are written as a quilt series: by content, so a rerun reuses the folder."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes() if file.exists() else b"")
    return cache_dir("external-patches", digest.hexdigest()[:16])


def series_fragment_name(series: str, path: Path) -> str:
    """The name a series' kconfig fragment is merged under (and reported by)."""
    return f"series {series}: {path.name}"


def _is_suite_fragment(name: str) -> bool:
    return name.startswith(SUITE_FRAGMENT_PREFIX)


def make_plan(
    kernel: str | None = None,
    series: Sequence[str] | None = None,
    fragments: Sequence[Path] = (),
    *,
    suites_dir: suites.SuiteRoots | None = SUITE_PATH,
    external_modules: bool = True,
    patches_root: Path = KERNEL_PATCHES,
    modules_root: extmodules.ModuleRoots = MODULE_PATH,
    kconfig_dir: Path = KCONFIG_DIR,
    lock: source.SourceLock | None = None,
    tree: usertree.TreeState | None = None,
    external: Path | None = None,
) -> PlannedBuild:
    """The plan for a request, from the repository's files alone (no network, no Docker).

    kernel: a version or alias of the lock file (None: its default); series: names under patches_root
    (None: all); fragments: the user's kconfig fragments, merged last; suites_dir: whose suites' needs the
    build carries (None: none); tree: a user's tree as the source instead of the lock file's tarball, with
    no series unless named.
    """
    candidates = () if tree else tuple((lock or source.load_lock()).candidates(kernel))
    if tree and series is None:
        series = ()  # the user's tree is the change under test: the repository's series only when asked
    chosen = tuple(patches.discover_series(patches_root, None if series is None else list(series)))
    if external is not None:  # --patches: applied after the repository's series
        chosen = (*chosen, patches.load_external(external, _external_staging(external)))
    needs = suite_needs(suites_dir)
    merge_order = (
        kconfig.Fragment.from_file(_base_config(kconfig_dir), "kconfig/base.config"),
        *(
            kconfig.Fragment.from_file(f, series_fragment_name(s.name, f))
            for s in chosen
            for f in s.fragments
        ),
        *needs.fragments,
        *(kconfig.Fragment.from_file(Path(f)) for f in fragments),
    )
    merged = kconfig.merge(merge_order)
    modules = tuple(extmodules.discover(modules_root)) if external_modules else ()
    plan = BuildPlan(
        source=(SourcePin.of_tree(tree),) if tree else tuple(SourcePin.of(t) for t in candidates),
        series=tuple(s.name for s in chosen),
        patches=tuple(item for s in chosen for item in patches.series_digest(s).items()),
        kconfig=merged.render(),
        kselftests=needs.kselftests,
        modules=tuple((name.removeprefix("module:"), d) for name, d in extmodules.digests(modules).items()),
        toolchain_recipe=images.builder_image_tag(images.base_image_tag()),
        flags=build_flags(),
        tree_files=tree.changes if tree else (),
    )
    return PlannedBuild(plan, candidates, chosen, merge_order, merged, modules)


__all__ = [
    "BUILD_TARGETS",
    "RECIPE_SCHEMA",
    "BuildPlan",
    "PlanError",
    "PlannedBuild",
    "SourcePin",
    "SuiteNeeds",
    "build_flags",
    "make_plan",
    "suite_needs",
]
