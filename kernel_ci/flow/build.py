"""The build half of the pipeline: source + patches + kconfig fragments -> kernel outputs, cached by key.

It composes the stages (source, patches, kconfig, images, builder, outputs, buildkey, cachestore); none of
them knows about the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

from kernel_ci.build import artifacts as outputs
from kernel_ci.build import extmodules, images, kconfig, kselftest, patches, source
from kernel_ci.build import kbuild as builder
from kernel_ci.build import keys as buildkey
from kernel_ci.build import plan as buildplan
from kernel_ci.build import tree as usertree
from kernel_ci.build.artifacts import KBUILD_EXPORT
from kernel_ci.build.layout import VMLINUX_XZ
from kernel_ci.build.plan import BASE_FRAGMENT, BUILD_TARGETS  # noqa: F401  (their home used to be here)
from kernel_ci.build.records import (
    METADATA_SCHEMA,
    BuildMetadata,
    CcacheFigures,
    KernelInfo,
    RecordError,
    ToolchainInfo,
)
from kernel_ci.cache.store import ENTRY_FILE, BuildStore, LocalStore, copy_entry
from kernel_ci.core import proc
from kernel_ci.core.console import console, step, warn
from kernel_ci.core.files import sync_and_remove_tree, sync_tree, write_text_atomic
from kernel_ci.core.paths import CHECKOUT, REPO_ROOT, SUITE_PATH, Project, cache_dir
from kernel_ci.core.timing import RECORD_DIGITS, Duration, measure_duration
from kernel_ci.guest.suites import SuiteRoots
from kernel_ci.host import setup as hostsetup

OBJECT_TREES_KEPT = 3  # per patched source tree


@dataclass
class BuildRequest:
    kernel: str | None = None  # a version or alias from kernel-sources.lock.toml; None = its default
    series: Sequence[str] | None = None  # None = every series under kernel-patches/
    fragments: Sequence[Path] = ()  # extra kconfig fragments from the user
    # Whose guest suites' needs (kconfig, kselftest targets) the kernel carries: every suite there, whichever
    # of them a run then chooses (None: none). A suite never changes what is built, only what runs.
    suites_dir: SuiteRoots | None = SUITE_PATH  # a folder or a suite path (Project.suite_path)
    # whose kernel-patches/, kernel-modules/, kconfig/ and lock file (core.paths.Project; the CLI's --project)
    project: Project = field(default_factory=lambda: Project(CHECKOUT))
    output: Path = REPO_ROOT / "out" / "build"
    jobs: int = field(default_factory=lambda: os.cpu_count() or 2)
    use_cache: bool = True  # the build cache (never ccache: see use_ccache)
    use_ccache: bool = True
    fresh: bool = False  # start from an empty object tree (no incremental build)
    ccache_dir: Path | None = None  # default: the per-user ccache of kernel-ci
    external_modules: bool = True  # build every kernel-modules/<name> against the kernel (extmod/)
    # CCACHE_REMOTE_STORAGE for the container (core.settings.Settings.ccache_remote); None: local ccache only
    ccache_remote: str | None = field(default=None, repr=False)
    # --tree: the user's kernel tree as the source (read-only; built with make O=); None = the lock file's
    tree: Path | None = None
    # --patches: a series from outside (an mbox, b4's .mbx, a format-patch directory), applied strictly last
    patches: Path | None = None
    # (series, n): that series truncated after its n-th patch (BuildPlan.prefix; flow/attribute.py)
    prefix: tuple[str, int] | None = None

    def to_json(self) -> str:
        """The request as it can be made again elsewhere (`kernel-ci attribute`): paths absolute, and
        without ccache_remote (a setting of whoever builds, which may carry a token)."""

        def path(value: Path | None) -> str | None:
            return None if value is None else str(Path(value).expanduser().resolve())

        def roots(value: SuiteRoots | None) -> str | list[str] | None:
            if value is None or isinstance(value, Path):
                return path(value)
            return [str(path(p)) for p in value]

        document = {
            "schema": REQUEST_SCHEMA,
            "kernel": self.kernel,
            "series": None if self.series is None else list(self.series),
            "fragments": [path(f) for f in self.fragments],
            "suites_dir": roots(self.suites_dir),
            "project": path(self.project.root),
            "output": path(self.output),
            "jobs": self.jobs,
            "use_cache": self.use_cache,
            "use_ccache": self.use_ccache,
            "fresh": self.fresh,
            "ccache_dir": path(self.ccache_dir),
            "external_modules": self.external_modules,
            "tree": path(self.tree),
            "patches": path(self.patches),
            "prefix": None if self.prefix is None else list(self.prefix),
        }
        return json.dumps(document, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "build request") -> BuildRequest:
        """A request written by to_json; a RecordError (exit 2) naming what is wrong otherwise."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise RecordError(f"{where}: not JSON ({exc})") from exc
        if not isinstance(data, dict) or data.get("schema") != REQUEST_SCHEMA:
            raise RecordError(f"{where}: not a build request of schema {REQUEST_SCHEMA}")
        known = {f.name for f in fields(cls)} - {"ccache_remote"} | {"schema"}
        if set(data) != known:
            raise RecordError(f"{where}: fields {sorted(set(data) ^ known)} missing or unknown")

        def text_of(name: str, optional: bool = True) -> str | None:
            value = data[name]
            if (value is None and optional) or isinstance(value, str):
                return value
            raise RecordError(f"{where}: {name} must be a string{' or null' if optional else ''}")

        def path(name: str) -> Path | None:
            value = text_of(name)
            return None if value is None else Path(value)

        def flag(name: str) -> bool:
            if not isinstance(data[name], bool):
                raise RecordError(f"{where}: {name} must be true or false")
            return bool(data[name])

        def strings(name: str) -> list[str]:
            value = data[name]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise RecordError(f"{where}: {name} must be a list of strings")
            return list(value)

        def suite_roots() -> SuiteRoots | None:
            value = data["suites_dir"]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return tuple(Path(v) for v in value)
            return path("suites_dir")

        prefix = data["prefix"]
        if prefix is not None and not (
            isinstance(prefix, list)
            and len(prefix) == 2
            and isinstance(prefix[0], str)
            and isinstance(prefix[1], int)
        ):
            raise RecordError(f"{where}: prefix must be null or [series, count]")
        if not isinstance(data["jobs"], int) or isinstance(data["jobs"], bool) or data["jobs"] < 1:
            raise RecordError(f"{where}: jobs must be a positive integer")
        return cls(
            kernel=text_of("kernel"),
            series=None if data["series"] is None else strings("series"),
            fragments=[Path(f) for f in strings("fragments")],
            suites_dir=suite_roots(),
            project=Project(Path(str(text_of("project", optional=False)))),
            output=Path(str(text_of("output", optional=False))),
            jobs=int(data["jobs"]),
            use_cache=flag("use_cache"),
            use_ccache=flag("use_ccache"),
            fresh=flag("fresh"),
            ccache_dir=path("ccache_dir"),
            external_modules=flag("external_modules"),
            tree=path("tree"),
            patches=path("patches"),
            prefix=None if prefix is None else (prefix[0], prefix[1]),
        )


REQUEST_SCHEMA = 1
REQUEST_FILE_SUFFIX = ".request.json"


def request_path(output: Path) -> Path:
    """Where the request that made a build output dir is kept: beside it (out/build.request.json), never in
    it (the dir is a build cache entry's copy, compared file by file on the next restore)."""
    return output.with_name(output.name + REQUEST_FILE_SUFFIX)


def read_request(output: Path) -> BuildRequest | None:
    """The request that made the build output dir `output`; None when none was kept (an older kernel-ci,
    a build output copied from elsewhere)."""
    path = request_path(output)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return BuildRequest.from_json(text, str(path))


# The fields of a BuildRequest that say how to build, not what: they never reach a key. Every other field
# must reach the plan (plan_request); tests/unit/test_buildplan.py holds the two lists together.
HOW_NOT_WHAT = frozenset(
    {"output", "jobs", "use_cache", "use_ccache", "fresh", "ccache_dir", "ccache_remote"}
)


def plan_request(request: BuildRequest, tree: usertree.TreeState | None = None) -> buildplan.PlannedBuild:
    """The plan of what a request builds (files only: no network, no Docker); tree: request.tree's state
    when the caller has already read it (read here otherwise)."""
    if tree is None and request.tree is not None:
        tree = usertree.tree_state(request.tree)
    planned = buildplan.make_plan(
        request.kernel,
        request.series,
        request.fragments,
        suites_dir=request.suites_dir,
        external_modules=request.external_modules,
        tree=tree,
        external=request.patches,
        patches_root=request.project.kernel_patches,
        modules_root=request.project.module_path,
        kconfig_dir=request.project.kconfig,
        lock=source.load_lock(request.project.sources_lock),
    )
    return planned.prefix(*request.prefix) if request.prefix is not None else planned


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
    if request.tree is not None:
        argv = ["kernel-ci", "build", "--tree", str(request.tree)]
    series = [s for s in series if s.name != patches.EXTERNAL_SERIES]
    if request.patches is not None:
        argv += ["--patches", str(request.patches)]
    argv += [arg for s in series for arg in ("--series", s.name)] or ["--series", "none"]
    argv += [arg for f in request.fragments for arg in ("--fragment", str(f))]
    if not request.use_ccache:
        argv.append("--no-ccache")
    return shlex.join(argv)


def _prepare_tree(
    src: source.KernelSource, series: Sequence[patches.Series], tree_id: str, *, private_copy: bool = False
) -> Path:
    """A patched copy of the pristine tree (hard links; patched files get their own copies), made once.

    Under the work dir's lock: a second build of the same sources waits for the first one's tree instead of
    deleting it (it was being built from) and making its own.
    """
    work = cache_dir("work", tree_id)
    with source.locked(work.with_name(work.name + ".lock"), "another build preparing the same patched tree"):
        return _prepare_tree_locked(src, series, work, private_copy)


def _prepare_tree_locked(
    src: source.KernelSource, series: Sequence[patches.Series], work: Path, private_copy: bool = False
) -> Path:
    tree = work / "src"
    marker = work / "src.applied.json"
    if marker.exists() and tree.is_dir():
        return tree
    if tree.exists():
        shutil.rmtree(tree)
    staging = work / f"src.tmp.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if private_copy:
            # a user's tree (--tree --series): a real copy, without .git. Hard links would share inodes with
            # files the user may later edit in place, changing this copy under its content key.
            shutil.copytree(src.tree, staging, symlinks=True, ignore=shutil.ignore_patterns(".git"))
        else:
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
    must not change the cache); a build's own staging dir (no cache) is copied, writing only the files
    that differ from the output dir's (core.files.sync_tree: an incremental build rewrote ~100 MB)."""
    if (entry / ENTRY_FILE).is_file():
        copy_entry(entry, dest)
        return
    sync_tree(entry, dest)


@dataclass
class _Job:
    """What the plan step settled: the plan against the resolved source, the toolchain, the request key."""

    request: BuildRequest
    planned: buildplan.PlannedBuild
    src: source.KernelSource
    plan: buildplan.BuildPlan
    image: str
    toolchain: images.Toolchain
    request_key: str
    tree: usertree.TreeState | None = None  # --tree: what the user's tree held when it was keyed
    clock: Duration = field(default_factory=Duration)  # the whole build, from its first step
    durations: dict[str, float] = field(default_factory=dict)  # per step, into metadata.json

    @property
    def patch_digests(self) -> dict[str, str]:
        return dict(self.plan.patches)

    def restored(self, entry: Path, key: str, why: str) -> BuildResult:
        return _restore(entry, key, self.request, self.clock, why)


@dataclass
class _Configured:
    """The configure step's outcome: the container set-up, the final config's inputs and the build key."""

    env: builder.BuildEnv
    manifest: dict[str, str]
    key: str


@dataclass
class _Compiled:
    steps: int  # kbuild steps (CC, LD...) of the kernel build
    ccache: dict[str, float | int]  # hits, misses, hit rate of this build ({} without ccache)
    release: str


def build(request: BuildRequest, store: BuildStore | None = None) -> BuildResult:
    """Plan, look up, configure, compile, collect, publish: each step below, in that order; the request is
    kept beside the output dir (request_path), for whoever rebuilds its variants (flow/attribute.py)."""
    result = _build(request, store)
    write_text_atomic(request_path(Path(request.output)), request.to_json())
    return result


def _build(request: BuildRequest, store: BuildStore | None) -> BuildResult:
    job = plan_build(request)
    job.durations["plan"] = round(job.clock.elapsed(), RECORD_DIGITS)  # source, host, toolchain image
    store = store or LocalStore()
    if request.use_cache:
        hit = look_up_request(store, job)
        if hit:
            return hit
    step("configure")
    with _object_tree(job, fresh=request.fresh) as env:
        configured = configure(job, env)
        if request.use_cache:
            hit = look_up_build(store, job, configured)
            if hit:
                return hit
        with store.lock(configured.key):
            entry = store.get(configured.key) if request.use_cache else None
            if entry:  # another process built it while we waited for the lock
                return job.restored(entry, configured.key, "built concurrently")
            return _compile_and_publish(job, configured, store)


@dataclass(frozen=True)
class DryRun:
    """What `kernel-ci build --dry-run` found: the build key, whether the build cache holds it, and why
    (how it was found, or the miss explanation: the nearest cached build and the inputs that differ)."""

    key: str
    cached: bool
    why: str


def dry_run(request: BuildRequest, store: BuildStore | None = None) -> DryRun:
    """Plan, look up and configure as build() does, then stop before compiling: would this build be
    restored or compiled, and why? The object tree gets the final .config (configure writes it there, as
    a build's first step does); nothing else is written, the output dir included."""
    job = plan_build(request)
    store = store or LocalStore()
    found = aliased_entry(store, job)
    if found:
        return DryRun(found[0], True, "inputs unchanged")
    step("configure")
    with _object_tree(job, fresh=False) as env:  # --fresh would throw away objects for nothing
        configured = configure(job, env)
    if store.get(configured.key):
        return DryRun(configured.key, True, "same final config")
    return DryRun(configured.key, False, miss_explanation(store, configured))


@contextlib.contextmanager
def _object_tree(job: _Job, *, fresh: bool) -> Iterator[builder.BuildEnv]:
    """The build's object tree for the block: locked (one build at a time per object tree), emptied first
    on --fresh (under the lock), rid of what an interrupted build wrote, and marked running until compile
    and kselftests have written their last object."""
    env = prepare_build_env(job)
    with _ObjectTreeLock(env.out):
        if fresh and env.out.exists():
            shutil.rmtree(env.out)
        discarded = builder.discard_interrupted(env.out)
        if discarded:
            warn(f"the last build in {env.out} did not end: {discarded} file(s) it wrote are built again")
        with builder.running(env.out):
            yield env


def _compile_and_publish(job: _Job, configured: _Configured, store: BuildStore) -> BuildResult:
    """Compile, collect, publish (under the object tree's and the key's locks). vmlinux.xz is compressed
    from the moment kbuild has linked vmlinux (build.artifacts.Compression), beside the rest of make and
    the collecting."""
    staging = Path(tempfile.mkdtemp(prefix="outputs-", dir=cache_dir("tmp")))
    try:
        env = configured.env
        vmlinux = env.out / "vmlinux"
        own = _own_tree(env.src)
        kept = kept_export(env.out) if own and not job.request.use_cache else None
        with (
            outputs.exporting_sources(env.src, staging / KBUILD_EXPORT, link=own, kept=kept) as sources,
            outputs.compressing_vmlinux(vmlinux, staging / VMLINUX_XZ, early=True) as compression,
        ):
            compiled = compile_kernel(job, configured, on_line=compression.on_line)
            compression.start()  # make linked nothing (it had nothing to do): vmlinux is the last one
            gathered = gather(job, configured, staging, sources)
        job.durations |= {"vmlinux_xz": compression.seconds, "vmlinux_xz.wait": compression.waited}
        if compression.recompressed:
            console.print("[dim]vmlinux changed after kbuild said it was linked: vmlinux.xz made again[/]")
        metadata = describe(job, configured, compiled, gathered, staging)
        with measure_duration() as took:
            publish(store, job, configured, staging, kept)
        job.durations["publish"] = took.rounded  # after metadata.json was written: in the result only
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    out_parent = configured.env.out.parent
    return BuildResult(configured.key, job.request.output, metadata, False, job.clock.elapsed(), out_parent)


def plan_build(request: BuildRequest) -> _Job:
    """Plan: the request's plan resolved against the kernel source, and the toolchain it is built with."""
    clock = Duration()
    step("kernel source")
    hostsetup.prepare_build_host()
    tree = usertree.tree_state(request.tree) if request.tree is not None else None
    planned = plan_request(request, tree)
    if tree is not None:
        src = _tree_source(tree)
        plan = planned.plan  # its one source is the tree already
        console.print(f"source: {tree.kind} tree {tree.path} (Linux {tree.version}), {_tree_summary(tree)}")
    else:
        src = source.resolve(request.kernel, source.load_lock(request.project.sources_lock))
        plan = planned.plan.resolved(src.tarball)

    step("toolchain")
    image = images.ensure_builder_image()
    if image != plan.toolchain_recipe:  # both are digests of the same recipe files: a bug if they differ
        raise buildplan.PlanError(f"the builder image is {image}, the plan expected {plan.toolchain_recipe}")
    toolchain = images.toolchain(image)
    console.print(f"toolchain {toolchain.gcc_version}, image {image} ({toolchain.image_id[7:19]})")
    for redefinition in planned.merged.redefinitions:
        warn(redefinition.describe())
    request_key = plan.request_key(toolchain.fingerprint)
    return _Job(request, planned, src, plan, image, toolchain, request_key, tree, clock=clock)


def _tree_source(tree: usertree.TreeState) -> source.KernelSource:
    """A user's tree in the shape of a resolved source (its "tarball" names the tree and its content)."""
    pin = buildplan.SourcePin.of_tree(tree)
    tarball = source.Tarball(pin.version, "tree", str(tree.path), tree.digest(), tree.path.name)
    return source.KernelSource(f"tree {tree.path}", tarball, tree.path, f"{tree.kind}:{tree.path}")


def _tree_summary(tree: usertree.TreeState) -> str:
    if tree.kind != "git":
        return f"content sha256 {tree.base[:12]}"
    changed = f"{len(tree.changes)} uncommitted file(s)" if tree.changes else "no uncommitted change"
    return f"git tree {tree.base[:12]}, {changed}"


def aliased_entry(store: BuildStore, job: _Job) -> tuple[str, Path] | None:
    """The build key and entry the request key is an alias of (a build made from the same inputs)."""
    known = store.get_alias(job.request_key)
    entry = store.get(known) if known else None
    return (known, entry) if known and entry else None


def look_up_request(store: BuildStore, job: _Job) -> BuildResult | None:
    """Look up by request key (inputs before configuring): the alias of a build made from the same inputs."""
    found = aliased_entry(store, job)
    return job.restored(found[1], found[0], "inputs unchanged") if found else None


def miss_explanation(store: BuildStore, configured: _Configured) -> str:
    """Why configured's key is not in the store: the nearest cached build and the inputs that differ."""
    return buildkey.explain_miss(configured.manifest, store.manifests()).render()


def look_up_build(store: BuildStore, job: _Job, configured: _Configured) -> BuildResult | None:
    """Look up by build key (after configuring: the final config); on a miss, say what differs."""
    entry = store.get(configured.key)
    if entry:
        store.put_alias(job.request_key, configured.key)
        return job.restored(entry, configured.key, "same final config")
    console.print(miss_explanation(store, configured))
    return None


def prepare_build_env(job: _Job) -> builder.BuildEnv:
    """The patched source tree and the object tree of this config, as the builder container mounts them."""
    source_memo = None  # the user's tree can change under its name: its digests are never remembered
    if job.tree is not None and not job.planned.series:
        # the user's tree itself, mounted read-only; one object tree per (tree path, config, toolchain) that
        # outlives edits and commits, so an edit (or a bisect step) rebuilds incrementally
        src_tree = job.tree.path
        config_id = _digest_text(job.plan.kconfig + job.image)[:12]
        out_tree = cache_dir("trees", usertree.object_dir_name(job.tree)) / f"out-{config_id}"
    else:
        source_id = job.plan.source[0].render()
        if job.tree is not None:  # (a tarball's work dir name must not change: its objects are warm)
            source_id += " " + job.tree.digest()
        tree_id = _digest_text(source_id + json.dumps(job.patch_digests, sort_keys=True))[:16]
        # a user's tree with --series is copied and patched there: its own files are never written
        src_tree = _prepare_tree(job.src, job.planned.series, tree_id, private_copy=job.tree is not None)
        source_memo = src_tree.with_name("src.digests.json")  # named by tree_id: its content never changes
        # One object tree per (patched source, requested config): builds of different configs never undo
        # each other's objects, and a rebuild of the same config stays incremental.
        out_tree = cache_dir("work", tree_id) / f"out-{_digest_text(job.plan.kconfig)[:12]}"
    return builder.BuildEnv(
        image=job.image,
        src=src_tree,
        out=out_tree,
        ccache_dir=(job.request.ccache_dir or cache_dir("ccache")).absolute(),  # a bind mount's source
        jobs=job.request.jobs,
        timestamp=kbuild_timestamp(job.src.tree),
        use_ccache=job.request.use_ccache,
        ccache_remote=job.request.ccache_remote,
        source_memo=source_memo,
    )


def configure(job: _Job, env: builder.BuildEnv) -> _Configured:
    """Configure (under the object tree's lock): the final .config, checked, and the build key it gives."""
    with measure_duration(job.durations, "configure"):
        final_config = builder.configure(env, job.plan.kconfig, reuse=cache_dir("reuse", "kconfig"))
    _check_config(job.planned, final_config)
    manifest = job.plan.build_inputs(final_config, job.toolchain.fingerprint)
    return _Configured(env, manifest, buildkey.build_key(manifest))


def compile_kernel(
    job: _Job, configured: _Configured, on_line: Callable[[str], None] | None = None
) -> _Compiled:
    """Compile: the kernel and its modules, with ccache's figures for this build (on_line: kbuild's
    output, line by line)."""
    env = configured.env
    step(f"build {job.src.version} ({len(job.patch_digests)} patches) key {configured.key[:16]}")
    with measure_duration(job.durations, "build"):
        run = builder.build(env, on_line)
    # where the build's time went inside its container (container start, make, modules_install, ccache
    # statistics), beside the flow's own steps: the breakdown `kernel-ci build` and the bench print
    job.durations.update({f"build.{name}": seconds for name, seconds in run.durations.items()})
    return _Compiled(run.steps, run.ccache, builder.kernel_release(env))


@dataclass
class _Gathered:
    """What gather built beside the kernel's own outputs."""

    modules: dict[str, list[Path]]  # external module name -> its .ko files in staging
    selftests: dict[str, list[Path]]  # kselftest target -> its files in staging


def _own_tree(src: Path) -> bool:
    """Whether src is kernel-ci's own patched tree, which is never written in place: the kbuild export can
    hard-link its files."""
    return src.resolve().is_relative_to(cache_dir("work").resolve())


def gather(job: _Job, configured: _Configured, staging: Path, sources: outputs.SourceExport) -> _Gathered:
    """Collect into staging: kernel outputs (over the kbuild export's source pass, made beside make), the
    series as patches, then external modules and kselftests side by side.

    The two read disjoint inputs (the modules the export in staging, the selftests the source and object
    trees) and write disjoint places, and each is one container whose make runs mostly on one core: on a
    first build they took 9.1 and 10.2 s one after the other. The export's digest (the modules' reuse key)
    is taken before the selftests start, since their headers_install adds files to the object tree the
    digest lists. Leaving by any way joins the selftests' thread first, so staging outlives neither (an
    interrupt waits for that one container's end: seconds)."""
    env = configured.env
    with measure_duration(job.durations, "collect"):
        with measure_duration(job.durations, "collect.sources_wait"):
            sources.wait()
        job.durations["collect.sources"] = sources.seconds  # in its thread, from make's start
        outputs.collect(env.src, env.out, staging, link_sources=sources.link, sources=sources)
        for s in job.planned.series:
            patches.export_series(s, staging / "patches")
    kbuild = staging / KBUILD_EXPORT
    modules = buildable_modules(job.planned.modules, (staging / "config").read_text())
    digest = outputs.kbuild_export_digest(kbuild, env.out, env.source_digests) if modules else ""
    with ThreadPoolExecutor(1, thread_name_prefix="kci-kselftests") as beside:
        selftests_run = beside.submit(_build_selftests, job, env, staging)
        with measure_duration(job.durations, "external_modules"):
            built_modules = extmodules.build_all(
                job.image,
                kbuild,
                modules,
                staging / "extmod",
                reuse=cache_dir("reuse", "extmod"),
                kbuild_digest=lambda: digest,
            )
        selftests, seconds = selftests_run.result()
    if selftests:
        job.durations["kselftests"] = seconds
    return _Gathered(built_modules, selftests)


def _build_selftests(job: _Job, env: builder.BuildEnv, staging: Path) -> tuple[dict[str, list[Path]], float]:
    """The plan's kselftests into staging, and how long that took (gather's thread: the caller records it)."""
    with measure_duration() as took:
        selftests = kselftest.build_selftests(
            env, job.plan.kselftests, staging / "kselftest", reuse=cache_dir("reuse", "kselftest")
        )
    return selftests, took.rounded


def describe(
    job: _Job, configured: _Configured, compiled: _Compiled, gathered: _Gathered, staging: Path
) -> BuildMetadata:
    """The metadata of what staging holds, written into it (last: it carries every step's duration)."""
    metadata = _metadata(job, configured, compiled, gathered.modules, gathered.selftests, staging)
    metadata.write(staging)
    return metadata


def buildable_modules(
    modules: Sequence[extmodules.ModuleSource], final_config: str
) -> tuple[extmodules.ModuleSource, ...]:
    """The external modules to build: all of the plan's, unless the kernel cannot load modules at all (a
    fragment turned CONFIG_MODULES off): then none, with a warning (the packaged kci-smoke is in every plan;
    the suites that load a module ask for CONFIG_MODULES=y and are skipped on such a kernel)."""
    if modules and kconfig.parse(final_config, "the final .config").get("CONFIG_MODULES") != "y":
        names = ", ".join(m.name for m in modules)
        warn(f"CONFIG_MODULES is not set: the out-of-tree module(s) {names} are not built")
        return ()
    return tuple(modules)


def _metadata(
    job: _Job,
    configured: _Configured,
    compiled: _Compiled,
    built_modules: dict[str, list[Path]],
    selftests: dict[str, list[Path]],
    staging: Path,
) -> BuildMetadata:
    src, request = job.src, job.request
    return BuildMetadata(
        schema=METADATA_SCHEMA,
        build_key=configured.key,
        request_key=job.request_key,
        recipe_key=job.planned.plan.recipe_key(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        kernel=KernelInfo(
            requested=src.requested,
            version=src.version,
            release=compiled.release,
            tarball=src.tarball.filename,
            sha256=src.tarball.sha256,
            fetched_from=src.url,
            fallbacks=tuple(src.fallback_notes),
        ),
        series=job.plan.series,
        patches=tuple(job.patch_digests),
        fragments=tuple(f.name for f in job.planned.fragments),
        external_modules={
            name: tuple(f"extmod/{name}/{ko.name}" for ko in kos) for name, kos in built_modules.items()
        },
        kselftests={
            target: tuple(f.relative_to(staging).as_posix() for f in files)
            for target, files in selftests.items()
        },
        toolchain=ToolchainInfo(
            image=job.image,
            image_id=job.toolchain.image_id,
            fingerprint=job.toolchain.fingerprint,
            gcc=job.toolchain.gcc_version,
        ),
        kbuild=configured.env.kbuild_vars() | {"jobs": request.jobs, "steps": compiled.steps},
        durations=job.durations,
        ccache=CcacheFigures(
            hits=int(compiled.ccache["hits"]),
            misses=int(compiled.ccache["misses"]),
            hit_rate=float(compiled.ccache["hit_rate"]),
        )
        if compiled.ccache
        else None,
        inputs=configured.manifest,
        reproduce=reproduce_command(request, src.version, job.planned.series),
    )


def publish(
    store: BuildStore, job: _Job, configured: _Configured, staging: Path, kept: Path | None = None
) -> None:
    """Publish: into the build cache (entry and request alias), then to the output directory. Without a
    cache, the kbuild export is kept at kept (if given) for the next build of this object tree to update
    (artifacts.exporting_sources), and the rest of staging is removed as it is synced."""
    if job.request.use_cache:
        entry = store.put(configured.key, staging, configured.manifest, move=True)
        store.put_alias(job.request_key, configured.key)
        _link_or_copy_tree(entry, job.request.output)
    elif kept is not None:
        sync_tree(staging, job.request.output)
        shutil.rmtree(kept, ignore_errors=True)
        os.rename(staging / KBUILD_EXPORT, kept)
    else:
        sync_and_remove_tree(staging, job.request.output)


def kept_export(out_tree: Path) -> Path:
    """Where the kbuild export of a no-cache build of this object tree is kept: beside the object tree
    (outside it: the object tree is mounted into the builder container, which runs patch code), pruned
    with it."""
    return out_tree.with_name("export-" + out_tree.name.removeprefix("out-"))


def _restore(entry: Path, key: str, request: BuildRequest, clock: Duration, why: str) -> BuildResult:
    _link_or_copy_tree(entry, request.output)
    metadata = BuildMetadata.read(request.output)
    console.print(f"[green]build cache hit[/] ({why}): {key[:16]} restored to {request.output}")
    return BuildResult(key, request.output, metadata, True, clock.elapsed())


def _check_config(planned: buildplan.PlannedBuild, final_config: str) -> None:
    """Every requested symbol survived olddefconfig, or a clear error; a suite's need the chosen series
    cannot meet is a warning (kernel-ci test skips that suite), not a reason to refuse the build."""
    errors, suite_only = planned.unmet_needs(final_config)
    for item in suite_only:
        if item.request.fragment in planned.tolerated:  # a series cut short by attribution's prefixes
            warn(f"not yet met by this prefix of the series: {item.describe()}")
        else:
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
            shutil.rmtree(kept_export(tree), ignore_errors=True)
