"""The build half of the pipeline: source + patches + kconfig fragments -> kernel outputs, cached by key.

It composes the stages (source, patches, kconfig, images, builder, outputs, buildkey, cachestore); none of
them knows about the others.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kernel_ci.build import artifacts as outputs
from kernel_ci.build import extmodules, images, kconfig, kselftest, patches, source
from kernel_ci.build import kbuild as builder
from kernel_ci.build import keys as buildkey
from kernel_ci.build import plan as buildplan
from kernel_ci.build.plan import BASE_FRAGMENT, BUILD_TARGETS  # noqa: F401  (their home used to be here)
from kernel_ci.build.records import METADATA_SCHEMA, BuildMetadata, CcacheFigures, KernelInfo, ToolchainInfo
from kernel_ci.cache.store import ENTRY_FILE, BuildStore, LocalStore, copy_entry
from kernel_ci.core import proc
from kernel_ci.core.console import console, step, warn
from kernel_ci.core.paths import GUEST_TESTS, REPO_ROOT, cache_dir
from kernel_ci.host import setup as hostsetup

OBJECT_TREES_KEPT = 3  # per patched source tree


@dataclass
class BuildRequest:
    kernel: str | None = None  # a version or alias from kernel-sources.lock.toml; None = its default
    series: Sequence[str] | None = None  # None = every series under kernel-patches/
    fragments: Sequence[Path] = ()  # extra kconfig fragments from the user
    # Whose guest suites' needs (kconfig, kselftest targets) the kernel carries: every suite there, whichever
    # of them a run then chooses (None: none). A suite never changes what is built, only what runs.
    suites_dir: Path | None = GUEST_TESTS
    output: Path = REPO_ROOT / "out" / "build"
    jobs: int = field(default_factory=lambda: os.cpu_count() or 2)
    use_cache: bool = True  # the build cache (never ccache: see use_ccache)
    use_ccache: bool = True
    fresh: bool = False  # start from an empty object tree (no incremental build)
    ccache_dir: Path | None = None  # default: the per-user ccache of kernel-ci
    external_modules: bool = True  # build every kernel-modules/<name> against the kernel (extmod/)
    # CCACHE_REMOTE_STORAGE for the container (core.settings.Settings.ccache_remote); None: local ccache only
    ccache_remote: str | None = field(default=None, repr=False)


# The fields of a BuildRequest that say how to build, not what: they never reach a key. Every other field
# must reach the plan (plan_request); tests/unit/test_buildplan.py holds the two lists together.
HOW_NOT_WHAT = frozenset(
    {"output", "jobs", "use_cache", "use_ccache", "fresh", "ccache_dir", "ccache_remote"}
)


def plan_request(request: BuildRequest) -> buildplan.PlannedBuild:
    """The plan of what a request builds (files only: no network, no Docker)."""
    return buildplan.make_plan(
        request.kernel,
        request.series,
        request.fragments,
        suites_dir=request.suites_dir,
        external_modules=request.external_modules,
    )


@dataclass
class BuildResult:
    key: str
    output: Path
    metadata: BuildMetadata
    cache_hit: bool
    seconds: float
    work: Path | None = None  # the patched source and object trees (None on a cache hit)

    @property
    def bzimage(self) -> Path:
        return self.output / "bzImage"

    @property
    def kernel_release(self) -> str:
        return self.metadata.kernel.release


def _digest_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def kbuild_timestamp(tree: Path) -> str:
    """KBUILD_BUILD_TIMESTAMP: the release date of the source (its top Makefile's mtime), never now."""
    mtime = (tree / "Makefile").stat().st_mtime
    return datetime.fromtimestamp(mtime, UTC).strftime("%a %b %d %H:%M:%S UTC %Y")


def reproduce_command(request: BuildRequest, version: str, series: Sequence[patches.Series]) -> str:
    argv = ["kernel-ci", "build", "--kernel", version]
    argv += [arg for s in series for arg in ("--series", s.name)] or ["--series", "none"]
    argv += [arg for f in request.fragments for arg in ("--fragment", str(f))]
    if not request.use_ccache:
        argv.append("--no-ccache")
    return shlex.join(argv)


def _prepare_tree(src: source.KernelSource, series: Sequence[patches.Series], tree_id: str) -> Path:
    """A patched copy of the pristine tree (hard links; patched files get their own copies), made once.

    Under the work dir's lock: a second build of the same sources waits for the first one's tree instead of
    deleting it (it was being built from) and making its own.
    """
    work = cache_dir("work", tree_id)
    with source.locked(work.with_name(work.name + ".lock"), "another build preparing the same patched tree"):
        return _prepare_tree_locked(src, series, work)


def _prepare_tree_locked(src: source.KernelSource, series: Sequence[patches.Series], work: Path) -> Path:
    tree = work / "src"
    marker = work / "src.applied.json"
    if marker.exists() and tree.is_dir():
        return tree
    if tree.exists():
        shutil.rmtree(tree)
    staging = work / f"src.tmp.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        proc.run(["cp", "-al", src.tree, staging], quiet=True)
        applied = patches.apply_series(series, staging)
        staging.rename(tree)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    marker.write_text(json.dumps({"source": src.version, "patches": applied}, indent=1))
    if applied:
        console.print(f"applied {len(applied)} patch(es): " + ", ".join(applied))
    return tree


def _link_or_copy_tree(entry: Path, dest: Path) -> None:
    """Restore an entry into the output dir: a verified copy (never hard links: editing the output dir
    must not change the cache); a build's own staging dir (no cache) is simply copied."""
    if (entry / ENTRY_FILE).is_file():
        copy_entry(entry, dest)
        return
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(entry, dest, symlinks=True)


def build(request: BuildRequest, store: BuildStore | None = None) -> BuildResult:
    started = time.monotonic()
    durations: dict[str, float] = {}
    step("kernel source")
    hostsetup.prepare_build_host()
    planned = plan_request(request)
    src = source.resolve(request.kernel)
    plan = planned.plan.resolved(src.tarball)
    chosen = planned.series
    patch_digests = dict(plan.patches)

    step("toolchain")
    image = images.ensure_builder_image()
    if image != plan.toolchain_recipe:  # both are digests of the same recipe files: a bug if they differ
        raise buildplan.PlanError(f"the builder image is {image}, the plan expected {plan.toolchain_recipe}")
    toolchain = images.toolchain(image)
    console.print(f"toolchain {toolchain.gcc_version}, image {image} ({toolchain.image_id[7:19]})")

    for redefinition in planned.merged.redefinitions:
        warn(redefinition.describe())
    merged_text = plan.kconfig
    source_id = plan.source[0].render()
    request_key = plan.request_key(toolchain.fingerprint)
    store = store or LocalStore()

    if request.use_cache:
        known = store.get_alias(request_key)
        entry = store.get(known) if known else None
        if known and entry:
            return _restore(entry, known, request, started, "inputs unchanged")

    step("configure")
    tree_id = _digest_text(source_id + json.dumps(patch_digests, sort_keys=True))[:16]
    src_tree = _prepare_tree(src, chosen, tree_id)
    # One object tree per (patched source, requested config): builds of different configs never undo each
    # other's objects, and a rebuild of the same config stays incremental.
    out_tree = cache_dir("work", tree_id) / f"out-{_digest_text(merged_text)[:12]}"
    env = builder.BuildEnv(
        image=image,
        src=src_tree,
        out=out_tree,
        ccache_dir=request.ccache_dir or cache_dir("ccache"),
        jobs=request.jobs,
        timestamp=kbuild_timestamp(src.tree),
        use_ccache=request.use_ccache,
        ccache_remote=request.ccache_remote,
    )
    with _ObjectTreeLock(out_tree):  # one build at a time per object tree; --fresh empties it under the lock
        if request.fresh and out_tree.exists():
            shutil.rmtree(out_tree)
        t0 = time.monotonic()
        final_config = builder.configure(env, merged_text)
        durations["configure"] = round(time.monotonic() - t0, 2)
        _check_config(planned, final_config)
        manifest = plan.build_inputs(final_config, toolchain.fingerprint)
        key = buildkey.build_key(manifest)
        if request.use_cache:
            entry = store.get(key)
            if entry:
                store.put_alias(request_key, key)
                return _restore(entry, key, request, started, "same final config")
            console.print(buildkey.explain_miss(manifest, store.manifests()).render())

        with store.lock(key):
            entry = store.get(key) if request.use_cache else None
            if entry:  # another process built it while we waited for the lock
                return _restore(entry, key, request, started, "built concurrently")
            step(f"build {src.version} ({len(patch_digests)} patches) key {key[:16]}")
            before = builder.ccache_counters(env)
            t0 = time.monotonic()
            _seconds, steps = builder.build(env)
            durations["build"] = round(time.monotonic() - t0, 2)
            ccache = builder.ccache_delta(before, builder.ccache_counters(env)) if request.use_ccache else {}
            release = builder.kernel_release(env)

            staging = Path(tempfile.mkdtemp(prefix="outputs-", dir=cache_dir("tmp")))
            try:
                t0 = time.monotonic()
                outputs.collect(src_tree, out_tree, staging)
                for s in chosen:
                    patches.export_series(s, staging / "patches")
                durations["collect"] = round(time.monotonic() - t0, 2)
                t0 = time.monotonic()
                built_modules = extmodules.build_all(
                    image, staging / "kbuild", planned.modules, staging / "extmod"
                )
                durations["external_modules"] = round(time.monotonic() - t0, 2)
                t0 = time.monotonic()
                selftests = kselftest.build_selftests(env, plan.kselftests, staging / "kselftest")
                if selftests:
                    durations["kselftests"] = round(time.monotonic() - t0, 2)
                metadata = BuildMetadata(
                    schema=METADATA_SCHEMA,
                    build_key=key,
                    request_key=request_key,
                    recipe_key=planned.plan.recipe_key(),
                    created=datetime.now(UTC).isoformat(timespec="seconds"),
                    kernel=KernelInfo(
                        requested=src.requested,
                        version=src.version,
                        release=release,
                        tarball=src.tarball.filename,
                        sha256=src.tarball.sha256,
                        fetched_from=src.url,
                        fallbacks=tuple(src.fallback_notes),
                    ),
                    series=plan.series,
                    patches=tuple(patch_digests),
                    fragments=tuple(f.name for f in planned.fragments),
                    external_modules={
                        name: tuple(f"extmod/{name}/{ko.name}" for ko in kos)
                        for name, kos in built_modules.items()
                    },
                    kselftests={
                        target: tuple(f.relative_to(staging).as_posix() for f in files)
                        for target, files in selftests.items()
                    },
                    toolchain=ToolchainInfo(
                        image=image,
                        image_id=toolchain.image_id,
                        fingerprint=toolchain.fingerprint,
                        gcc=toolchain.gcc_version,
                    ),
                    kbuild=env.kbuild_vars() | {"jobs": request.jobs, "steps": steps},
                    durations=durations,
                    ccache=CcacheFigures(**ccache) if ccache else None,
                    inputs=manifest,
                    reproduce=reproduce_command(request, src.version, chosen),
                )
                metadata.write(staging)
                if request.use_cache:
                    entry = store.put(key, staging, manifest, move=True)
                    store.put_alias(request_key, key)
                else:
                    entry = staging
                _link_or_copy_tree(entry, request.output)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(key, request.output, metadata, False, time.monotonic() - started, out_tree.parent)


def _restore(entry: Path, key: str, request: BuildRequest, started: float, why: str) -> BuildResult:
    _link_or_copy_tree(entry, request.output)
    metadata = BuildMetadata.read(request.output)
    console.print(f"[green]build cache hit[/] ({why}): {key[:16]} restored to {request.output}")
    return BuildResult(key, request.output, metadata, True, time.monotonic() - started)


def _check_config(planned: buildplan.PlannedBuild, final_config: str) -> None:
    """Every requested symbol survived olddefconfig, or a clear error; a suite's need the chosen series
    cannot meet is a warning (kernel-ci test skips that suite), not a reason to refuse the build."""
    errors, suite_only = planned.unmet_needs(final_config)
    for item in suite_only:
        warn(f"{item.request.fragment} will be skipped on this kernel: {item.describe()}")
    if errors:
        raise kconfig.KconfigError(
            "requested kconfig options did not survive olddefconfig:\n  "
            + "\n  ".join(item.describe() for item in errors)
        )


class _ObjectTreeLock:
    """An exclusive flock on <object tree>.lock for the length of a configure + build."""

    def __init__(self, out_tree: Path) -> None:
        self.path = out_tree.with_name(out_tree.name + ".lock")

    def __enter__(self) -> None:
        self.handle = self.path.open("w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(
                f"waiting for another build of the same sources and config ({self.path.with_suffix('')})"
            )
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        tree = self.path.with_suffix("")
        if tree.is_dir():
            os.utime(tree)  # "recently used", for pruning

    def __exit__(self, *exc: object) -> None:
        self.handle.close()
        _prune_object_trees(self.path.parent)


def _prune_object_trees(work: Path, keep: int = OBJECT_TREES_KEPT) -> None:
    """Delete all but the `keep` most recently used object trees of a work dir (never one in use)."""
    trees = sorted(
        (p for p in work.glob("out-*") if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for tree in trees[keep:]:
        lock = tree.with_name(tree.name + ".lock")
        with lock.open("w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(tree, ignore_errors=True)
