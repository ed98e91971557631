"""Run kbuild inside the builder container: configure, build, install modules, read ccache statistics.

The container runs with the source tree (read-only), the output tree and the ccache directory mounted at
fixed paths, so paths, user, host and timestamp baked into the kernel never depend on the machine: that, with
KBUILD_BUILD_* pinned, makes the bzImage and modules bit-for-bit reproducible.

The build runs code from patch authors (Makefiles, Kconfig, scripts), so the container is a trust boundary:
an unprivileged uid even when kernel-ci runs as root, no capabilities, no privilege gain (setuid), no network
(a shared ccache is reached through a relayed socket to that one service: kernel_ci.build.ccacherelay),
bounded memory and process count, a fixed name per object tree, and a watchdog that stops it when kernel-ci
dies (see WATCHDOG). Docker itself is driven through kernel_ci.host.docker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kernel_ci.build import ccacherelay
from kernel_ci.core import proc
from kernel_ci.core.console import console
from kernel_ci.core.digest import SourceDigests
from kernel_ci.core.errors import BuildError
from kernel_ci.core.timing import RECORD_DIGITS, measure_duration
from kernel_ci.host import docker

SRC = "/build/src"
OUT = "/build/out"
CCACHE = "/ccache"
ARCH = "x86_64"
KBUILD_USER = "kernel-ci"
KBUILD_HOST = "kernel-ci"
# The uid:gid builds run as when kernel-ci runs as root ("nobody"): never 0, so code from a patch cannot use
# root's powers over the mounted trees or the container. A non-root caller builds as itself.
UNPRIVILEGED_UID = 65534
UNPRIVILEGED_GID = 65534
# Generous for make -j on a laptop or CI runner (the kernel's link steps stay under 2 GiB); a fork or
# allocation bomb in a Makefile hits these instead of the host. Overridable for big -j.
MEMORY_LIMIT = os.environ.get("KERNEL_CI_BUILD_MEMORY", "6g")
PIDS_LIMIT = os.environ.get("KERNEL_CI_BUILD_PIDS", "1024")
# The container must die with kernel-ci, even on SIGKILL (which cannot be caught, so no cleanup handler can
# run). `docker run -i` gets a stdin pipe that kernel-ci holds and never writes (proc.run hold_stdin): when
# kernel-ci dies the kernel closes it, the container's stdin reaches EOF, `cat` returns and the watchdog
# kills every process of the build uid in the container (kill -1 spares only itself and PID 1, docker-init,
# which then exits with its child). This needs no extra process on the host and survives the docker client
# being killed too (dockerd closes the stdin of a `-i` container when its client goes). The build itself
# reads /dev/null, never the watchdog pipe.
# (The shell gives background jobs /dev/null as stdin: the watcher reads the real stdin through fd 3.)
WATCHDOG = (
    'exec 3<&0; "$@" </dev/null & build=$!; { cat <&3 >/dev/null; kill -s KILL -- -1; } & wait "$build"'
)
_KBUILD_STEP = re.compile(r"^\s{2}([A-Z][A-Z0-9_-]{1,9})\s+(\S+)")


@dataclass(frozen=True)
class BuildEnv:
    image: str
    src: Path
    out: Path
    ccache_dir: Path
    jobs: int
    timestamp: str  # KBUILD_BUILD_TIMESTAMP
    use_ccache: bool = True
    extra_mounts: Mapping[Path, str] = field(default_factory=dict)
    # CCACHE_REMOTE_STORAGE (Settings.ccache_remote); it may hold a token: never logged, never in a repr
    ccache_remote: str | None = field(default=None, repr=False)
    # where digests of src's files are remembered: only for a tree that never changes under its name
    source_memo: Path | None = None

    @property
    def source_digests(self) -> SourceDigests:
        return SourceDigests(self.src, self.source_memo)

    def kbuild_vars(self) -> dict[str, str]:
        return {
            "KBUILD_BUILD_TIMESTAMP": self.timestamp,
            "KBUILD_BUILD_USER": KBUILD_USER,
            "KBUILD_BUILD_HOST": KBUILD_HOST,
            "KBUILD_BUILD_VERSION": "1",
            "CCACHE_DIR": CCACHE,
            "CCACHE_BASEDIR": "/build",
            "CCACHE_COMPILERCHECK": "content",
            "CCACHE_NOHASHDIR": "1",
            # Depend mode: on a miss ccache hashes the -MMD dependency file kbuild asks gcc for anyway
            # (-Wp,-MMD,...) instead of running the preprocessor a second time: a miss then costs about
            # what the compile alone costs. The objects are the compiler's either way.
            "CCACHE_DEPEND": "1",
            # ccache 4.7 (Debian 12) leaves its inode cache off: every compile then reads and hashes each of
            # its few hundred headers again to check its manifest (a hit) or its dependency file (a miss).
            # With it, a header's hash is kept by device, inode, size, mtime and ctime in the ccache dir's
            # tmp/ and read once per build: a ccache-warm build's make went from 56.6 to 47.5 s and 81.8
            # to 45.3 s in turn with it (same object tree, alternated, load 4-6).
            "CCACHE_INODECACHE": "1",
            "CCACHE_MAXSIZE": os.environ.get("KERNEL_CI_CCACHE_SIZE", "5G"),
        }

    def make_argv(self, *targets: str, extra: Sequence[str] = ()) -> list[str]:
        argv = ["make", "-C", SRC, f"O={OUT}", f"ARCH={ARCH}", f"-j{self.jobs}"]
        if self.use_ccache:
            argv += ["CC=ccache gcc", "HOSTCC=ccache gcc"]
        return [*argv, *extra, *targets]


def build_user() -> tuple[int, int]:
    """The uid:gid the builder container runs as: the caller, or an unprivileged one when that is root."""
    if os.getuid() == 0:
        return UNPRIVILEGED_UID, UNPRIVILEGED_GID
    return os.getuid(), os.getgid()


def give_to_build_user(path: Path) -> None:
    """Make a tree the container writes (object tree, ccache) owned by the build user; root keeps full access.

    Only root needs this (a non-root caller builds as itself). Every entry is checked, not just the top: a
    file written by root into the tree since (kernel-ci's own configure step, an older kernel-ci that built
    as root) would otherwise fail the next build. An lstat per file: tens of milliseconds for an object tree.
    """
    if os.getuid() != 0:
        return
    uid, gid = build_user()
    path.mkdir(parents=True, exist_ok=True)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            _chown_if_needed(os.path.join(root, name), uid, gid)
    _chown_if_needed(os.fspath(path), uid, gid)


def _chown_if_needed(path: str, uid: int, gid: int) -> None:
    try:
        info = os.lstat(path)
        if (info.st_uid, info.st_gid) != (uid, gid):
            os.lchown(path, uid, gid)
    except FileNotFoundError:  # the ccache dir is shared: another build removed its lock file meanwhile
        pass


def container_name(env: BuildEnv) -> str:
    """One name per object tree: only the holder of its lock builds in it, so the name is never contended;
    a container left by a killed run is found (and removed) by the next build of the same tree."""
    return "kci-build-" + hashlib.sha256(os.fsencode(env.out)).hexdigest()[:16]


def hardening_argv(uid: int, gid: int) -> list[str]:
    """The confinement of every toolchain container: who it runs as and what it may use."""
    return [
        "--user", f"{uid}:{gid}",
        "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges",
        "--memory", MEMORY_LIMIT, "--memory-swap", MEMORY_LIMIT,  # equal: no swap on top of the limit
        "--pids-limit", PIDS_LIMIT,
    ]  # fmt: skip


def remove_stale_container(name: str) -> None:
    """A container of that name left by a run that was killed before the watchdog could act."""
    docker.remove_container(name)


def remote_storage(env: BuildEnv) -> ccacherelay.Storage | None:
    """The shared ccache the build reaches through the relay (env.ccache_remote, from Settings through the
    BuildRequest; read-only unless --trusted-ccache-writes), or None."""
    value = (env.ccache_remote or "").strip()
    if not env.use_ccache or not value:
        return None
    return ccacherelay.parse_storage(value)


def docker_run_argv(
    env: BuildEnv,
    command: Sequence[str],
    *,
    workdir: str = OUT,
    watchdog: bool = False,
    forwarder: ccacherelay.HostForwarder | None = None,
) -> list[str]:
    """The `docker run` of COMMAND in the builder container. With watchdog it must be run with its stdin held
    open (run_container does): a closed stdin stops it at once. Without, the command should be short.

    The container never has a network (`--network none`), also with a shared ccache: then FORWARDER's
    socket is its only way out, and only to the cache service (kernel_ci.build.ccacherelay says why)."""
    options = [
        "--network", "none", "--init",
        *hardening_argv(*build_user()),
        "-v", f"{env.src}:{SRC}:ro",
        "-v", f"{env.out}:{OUT}",
        "-w", workdir,
    ]  # fmt: skip
    if env.use_ccache:  # a missing bind source is an error (host.docker.mount_spec), and nothing reads it
        options += ["-v", f"{env.ccache_dir}:{CCACHE}"]
    for host, guest in env.extra_mounts.items():
        options += ["-v", f"{host}:{guest}"]
    for name, value in env.kbuild_vars().items():
        options += ["-e", f"{name}={value}"]
    command = list(command)
    if forwarder is not None:
        options += ccacherelay.container_options(forwarder)
        command = ccacherelay.wrap(command)
    if watchdog:
        options += ["-i", "--name", container_name(env)]
        command = ["sh", "-c", WATCHDOG, "kci-watchdog", *command]
    return docker.run_argv(env.image, command, options)


def run_container(env: BuildEnv, command: Sequence[str], **run_args: Any) -> proc.Result:
    """COMMAND in the builder container, tied to this process's life (WATCHDOG), writing as the build user,
    reaching the shared ccache (if one is configured) through the relay only."""
    give_to_build_user(env.out)
    if env.use_ccache:
        give_to_build_user(env.ccache_dir)
    remove_stale_container(container_name(env))
    with ccacherelay.forwarding(remote_storage(env)) as forwarder:
        argv = docker_run_argv(env, command, watchdog=True, forwarder=forwarder)
        client_env = ccacherelay.client_env(forwarder) if forwarder else None
        return proc.run(argv, hold_stdin=True, env=client_env, **run_args)


class _KbuildProgress:
    """Shows kbuild's steps (CC, LD, AR...) as a live line with a count, keeps the rest quiet."""

    def __init__(self, title: str) -> None:
        self.steps = 0
        self.title = title
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task(title)

    def __enter__(self) -> _KbuildProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, line: str) -> None:
        match = _KBUILD_STEP.match(line)
        if match:
            self.steps += 1
            what = f"{self.title}: {self.steps} steps, {match.group(1)} {match.group(2)}"
            self.progress.update(self.task, description=what)
            if not console.is_terminal and self.steps % 250 == 0:
                console.print(f"[dim]{what}[/]")
        elif "error" in line.lower() or "warning:" in line.lower():
            console.print(line, highlight=False, markup=False)


def run_make(env: BuildEnv, *targets: str, title: str, extra: Sequence[str] = ()) -> tuple[float, int]:
    """make TARGETS in the container; returns (seconds, kbuild steps). Errors carry the output tail."""
    with measure_duration() as took, _KbuildProgress(title) as progress:
        try:
            run_container(env, env.make_argv(*targets, extra=extra), on_line=progress, keep_output=False)
        except proc.CommandError as exc:
            if not make_failed(exc):
                raise  # Docker itself failed (daemon down, image missing, OOM kill): infrastructure
            raise CompileError(f"{title} failed: {exc}") from exc
    return took.seconds, progress.steps


# A line the step script prints as each step starts: the host times the steps of one container run by when
# these lines reach it (the container shares the host's clock, but the host's monotonic clock needs no
# parsing and also measures the container's start).
STEP_MARK = "kci-step "
CONTAINER_START = "container_start"


@dataclass(frozen=True)
class ScriptStep:
    """One named step of a step script: a shell command line (built with shlex: no caller text is ever
    spliced into it unquoted)."""

    name: str
    command: str


def step_script(steps: Sequence[ScriptStep]) -> list[str]:
    """`sh -c` running STEPS in order in one container, stopping at the first failure, each announced by a
    STEP_MARK line. One container instead of one per step: each `docker run` costs 0.5-2 s here."""
    lines = ["set -e"]
    for item in steps:
        lines += [f"echo {shlex.quote(STEP_MARK + item.name)}", item.command]
    lines.append(f"echo {shlex.quote(STEP_MARK + 'end')}")
    return ["sh", "-c", "\n".join(lines)]


class _StepClock:
    """Times the steps of a step script from its STEP_MARK lines; passes every other line on."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self.on_line = on_line
        self.durations: dict[str, float] = {}
        self.current = CONTAINER_START
        self.since = time.monotonic()

    def __call__(self, line: str) -> None:
        if not line.startswith(STEP_MARK):
            self.on_line(line)
            return
        now = time.monotonic()
        self.durations[self.current] = self.durations.get(self.current, 0.0) + now - self.since
        self.current, self.since = line[len(STEP_MARK) :].strip(), now

    def rounded(self) -> dict[str, float]:
        return {name: round(seconds, RECORD_DIGITS) for name, seconds in self.durations.items()}


def run_steps(
    env: BuildEnv,
    steps: Sequence[ScriptStep],
    *,
    title: str,
    on_line: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], int, str]:
    """STEPS in one builder container; returns (seconds per step, kbuild steps, the step that was running
    last). A failing step raises CompileError naming it; Docker's own failure stays a CommandError.
    on_line sees every line of the output too (the flow starts vmlinux.xz from one)."""
    with _KbuildProgress(title) as progress:
        clock = _StepClock(progress if on_line is None else _both(progress, on_line))
        try:
            run_container(env, step_script(steps), on_line=clock, keep_output=False)
        except proc.CommandError as exc:
            if not make_failed(exc):
                raise  # Docker itself failed (daemon down, image missing, OOM kill): infrastructure
            raise CompileError(f"{title} failed in its step {clock.current}: {exc}") from exc
    return clock.rounded(), progress.steps, clock.current


def _both(first: Callable[[str], None], second: Callable[[str], None]) -> Callable[[str], None]:
    def each(line: str) -> None:
        first(line)
        second(line)

    return each


class CompileError(BuildError):
    """make exited non-zero inside the builder container: the kernel does not build (exit 10)."""


# `docker run` exits 125 when the daemon or the container set-up failed, 126/127 when the command could not
# be run, 137 when the container was SIGKILLed (OOM, docker stop): none of these is the kernel's fault.
DOCKER_OWN_STATUSES = frozenset({125, 126, 127, 137})


def make_failed(exc: proc.CommandError) -> bool:
    """Whether the command that failed is make (a compile error), not Docker around it."""
    return (
        not exc.timed_out
        and exc.returncode is not None
        and exc.returncode > 0
        and (exc.returncode not in DOCKER_OWN_STATUSES)
    )


def configure(env: BuildEnv, merged_fragment: str, *, reuse: Path | None = None) -> str:
    """allnoconfig + the merged fragment (KCONFIG_ALLCONFIG), then olddefconfig; returns the final .config.

    One make for both: kbuild runs several config targets one by one (its "mixed build"), and
    olddefconfig ignores KCONFIG_ALLCONFIG; one container start instead of two.

    reuse: a folder of final configs kept by configure_key. allnoconfig starts from nothing (the object
    tree's old .config is not read), so the final .config is a function of the key's inputs alone; when the
    kept one for this key is byte for byte the object tree's .config, or the object tree has none yet (it
    is written there), that is the result and no container runs (configure cost 2.5-3.5 s of container
    start and make here, on an incremental build and on every build into an empty object tree). An
    object tree whose .config differs (edited, damaged) is configured again."""
    env.out.mkdir(parents=True, exist_ok=True)
    kept = reuse / configure_key(env, merged_fragment) if reuse is not None else None
    config = env.out / ".config"
    if kept is not None and kept.is_file():
        final = kept.read_bytes()
        if not config.exists() and not config.is_symlink():
            # an empty object tree (--fresh, a new tree, a bench's cold build): the kept final .config is
            # what this make would write; kbuild's own syncconfig makes the rest from it in the build, as
            # after `cp config O/.config`
            tmp = config.with_name(f".config.kci-{os.getpid()}")
            tmp.write_bytes(final)
            os.replace(tmp, config)
        if config.read_bytes() == final:
            os.utime(kept)  # recently used, for pruning
            return final.decode()
    fragment = env.out / "kci-fragment.config"
    fragment.write_text(merged_fragment)
    run_make(env, *CONFIGURE_TARGETS, title="kconfig allnoconfig + fragments, olddefconfig",
             extra=configure_extra())  # fmt: skip
    final_text = config.read_text()
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        staging = kept.with_name(f"{kept.name}.tmp.{os.getpid()}")
        staging.write_text(final_text)
        os.replace(staging, kept)
        done = sorted(
            (p for p in kept.parent.iterdir() if ".tmp." not in p.name), key=lambda p: p.stat().st_mtime
        )
        for old in done[:-CONFIGS_KEPT]:
            old.unlink(missing_ok=True)
    return final_text


CONFIGURE_TARGETS = ("allnoconfig", "olddefconfig")
CONFIGS_KEPT = 16
CONFIGURE_SCHEMA = "1"
# Besides every Kconfig* file of the tree: what kconfig runs or reads to evaluate them. The top Makefile
# and the arch Makefiles (CC, LD, flags, SRCARCH), all of scripts/ (Kconfig.include, the compiler, as and
# ld version probes, cc-can-link.sh, the kconfig program's own sources), Kbuild.
CONFIGURE_INPUTS = ("Makefile", "Kbuild", "scripts", "arch/x86/Makefile", "arch/x86/Makefile_32.cpu")


def configure_extra() -> list[str]:
    return [f"KCONFIG_ALLCONFIG={OUT}/kci-fragment.config"]


def configure_key(env: BuildEnv, merged_fragment: str) -> str:
    """What the final .config is a function of: the builder image (the compiler kconfig probes), the make
    command line (less -j), the fragment, the host's kernel release (`uname -r` in a Kconfig default), and
    the content of every Kconfig* file of the source tree and of CONFIGURE_INPUTS (more than kconfig reads:
    a file we did not think of still changes the key). Content only, never a time stamp."""

    def parts() -> list[str]:
        kconfigs = []
        for root, dirs, files in os.walk(env.src):
            dirs[:] = sorted(d for d in dirs if d != ".git")
            kconfigs += [
                os.path.relpath(os.path.join(root, f), env.src) for f in files if f.startswith("Kconfig")
            ]
        return [*sorted(kconfigs), *CONFIGURE_INPUTS]

    document = {
        "schema": CONFIGURE_SCHEMA,
        "image": env.image,
        "make": [
            a for a in env.make_argv(*CONFIGURE_TARGETS, extra=configure_extra()) if not a.startswith("-j")
        ],
        "fragment": merged_fragment,
        "host_release": platform.release(),
        "source": env.source_digests.digest(f"configure {CONFIGURE_SCHEMA}", parts),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


RUNNING_MARK = ".kci-build-running"  # under the object tree: there while a build writes into it


def discard_interrupted(out: Path) -> int:
    """Remove what a build that never ended wrote into the object tree out; returns how many files.

    A build killed mid-write (SIGKILL, a lost machine) leaves cut files behind: kbuild 5.10's fixdep writes
    each .o.cmd in place (a cut one stops every later make with "unterminated variable reference"), and
    gcc its objects (a cut .o newer than its source passes for up to date). RUNNING_MARK, made before the
    build's first container and removed when it ends (see running), says the last build did not end;
    every file written since it was made is removed, and make builds those again (ccache has them)."""
    mark = out / RUNNING_MARK
    try:
        since = mark.stat().st_mtime_ns
    except FileNotFoundError:
        return 0
    removed = 0
    for root, _dirs, files in os.walk(out):
        for name in files:
            path = os.path.join(root, name)
            if path == os.fspath(mark):
                continue
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(path).st_mtime_ns >= since:
                    os.unlink(path)
                    removed += 1
    mark.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def running(out: Path) -> Iterator[None]:
    """RUNNING_MARK in out for the block. It stays when the block is cut short by anything but a build
    failure (make's own error exit leaves a consistent tree: kbuild deletes a failed target), so that the
    next build discards what this one wrote (discard_interrupted); SIGKILL runs no code at all."""
    out.mkdir(parents=True, exist_ok=True)
    mark = out / RUNNING_MARK
    mark.touch()
    try:
        yield
    except BuildError:
        mark.unlink(missing_ok=True)
        raise
    mark.unlink(missing_ok=True)


MODULES_STAGING = ".kci-modules"  # under the object tree: modules_install's output
CCACHE_STATS = (".kci-ccache-before", ".kci-ccache-after")  # under the object tree: --print-stats


@dataclass(frozen=True)
class KbuildRun:
    """What one kernel build reports: seconds per step (container start, make, modules_install, ccache
    statistics), kbuild steps, and ccache's hits and misses of this build ({} without ccache)."""

    durations: dict[str, float]
    steps: int
    ccache: dict[str, float | int]


def build_steps(env: BuildEnv) -> list[ScriptStep]:
    """The kernel image, modules and gdb scripts, then modules_install into out/.kci-modules (emptied
    first), with ccache's counters read before and after: one container for all of it. (vmlinux is
    compressed on the host from its link on: build.artifacts.compressing_vmlinux.)"""
    steps = [
        ScriptStep("make", shlex.join(env.make_argv("bzImage", "modules", "scripts_gdb"))),
        modules_install_step(env),
    ]
    if not env.use_ccache:
        return steps
    before, after = (shlex.quote(f"{OUT}/{name}") for name in CCACHE_STATS)
    return [
        ScriptStep("ccache_stats", f"ccache --print-stats > {before}"),
        *steps,
        ScriptStep("ccache_stats", f"ccache --print-stats > {after}"),
    ]


# What `make modules_install` reads (besides the .ko files modules.order names): the config (signing,
# compression, stripping), the module lists, the built-in modules' info, the release, the signing key,
# and the builder image's package list (depmod's version). Relative to the object tree.
MODULES_INSTALL_INPUTS = (
    ".config",
    "modules.order",
    "modules.builtin",
    "modules.builtin.modinfo",
    "include/config/kernel.release",
    "certs/signing_key.pem",
    "certs/signing_key.x509",
    "/etc/kernel-ci/installed.txt",
)
MODULES_INSTALL_STAMP = ".kci-modules.stamp"  # under the object tree: the inputs of the last install
MODULES_INSTALL_SKIPPED = "kci: modules_install: its inputs are those of the last install, kept"


def modules_install_step(env: BuildEnv) -> ScriptStep:
    """`make modules_install` into out/.kci-modules (emptied first), unless its inputs are those of the
    install that made the tree there.

    kbuild's modules_install is a phony target: it copies every module and runs depmod each time, and
    the make that does it parses the whole top Makefile again (its compiler probes too): ~0.6 s of every
    incremental build, where the modules are almost never relinked. The stamp is the digest of the
    inputs' bytes (MODULES_INSTALL_INPUTS, a missing one as missing), of each module's name, size, inode,
    mtime and ctime (a relinked module has new ones), and of the make command line. It is removed before
    an install and written after one succeeds, so an interrupted install is never taken for a finished
    one; a build interrupted before discards what it wrote since (discard_interrupted), the stamp too."""
    staging = shlex.quote(f"{OUT}/{MODULES_STAGING}")
    stamp_file = shlex.quote(f"{OUT}/{MODULES_INSTALL_STAMP}")
    target = f"INSTALL_MOD_PATH={OUT}/{MODULES_STAGING}"
    install = shlex.join(env.make_argv("modules_install", extra=[target]))
    inputs = shlex.join(MODULES_INSTALL_INPUTS)
    stamp = (
        # `|| true`: a missing input is part of the stamp, not an error (the step script runs under set -e,
        # which dash applies inside the group too)
        f"stamp=$(cd {shlex.quote(OUT)} && {{ echo {shlex.quote(install)}; sha256sum {inputs} 2>&1 || true;"
        " sed 's/[.]o$/.ko/' modules.order | xargs -r -d '\\n' stat -c '%n %s %i %y %z' 2>&1 || true; }"
        " | sha256sum)"
    )
    return ScriptStep(
        "modules_install",
        f"{stamp}\n"
        f'if [ -d {staging} ] && [ "$(cat {stamp_file} 2>/dev/null)" = "$stamp" ]; then'
        f" echo {shlex.quote(MODULES_INSTALL_SKIPPED)};"
        f' else rm -f {stamp_file}; rm -rf {staging}; {install}; echo "$stamp" > {stamp_file}; fi',
    )


def build(env: BuildEnv, on_line: Callable[[str], None] | None = None) -> KbuildRun:
    """Build the kernel (build_steps) in one container; its timings, kbuild steps and ccache figures.
    on_line: every line of its output as it comes."""
    for name in CCACHE_STATS:
        (env.out / name).unlink(missing_ok=True)  # a stale file must not pass for this build's
    durations, steps, _last = run_steps(env, build_steps(env), title="kbuild", on_line=on_line)
    ccache: dict[str, float | int] = {}
    if env.use_ccache:
        before, after = (parse_ccache_stats((env.out / name).read_text()) for name in CCACHE_STATS)
        ccache = ccache_delta(before, after)
    durations.pop("end", None)
    return KbuildRun(durations, steps, ccache)


def kernel_release(env: BuildEnv) -> str:
    return (env.out / "include/config/kernel.release").read_text().strip()


def ccache_counters(env: BuildEnv) -> dict[str, int]:
    """ccache's machine-readable counters (`--print-stats`) for the mounted cache dir."""
    if not env.use_ccache:
        return {}
    give_to_build_user(env.ccache_dir)
    text = proc.capture(docker_run_argv(env, ["ccache", "--print-stats"]))  # local counters: no relay
    return parse_ccache_stats(text)


def parse_ccache_stats(text: str) -> dict[str, int]:
    """`ccache --print-stats` output: one "name<TAB>value" line per counter."""
    counters: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition("\t")
        if value.strip().isdigit():
            counters[name.strip()] = int(value)
    return counters


def ccache_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, float | int]:
    """Hits, misses and hit rate of one build, from counters read before and after it."""

    def grew(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    hits = grew("direct_cache_hit") + grew("preprocessed_cache_hit")
    misses = grew("cache_miss")
    total = hits + misses
    return {"hits": hits, "misses": misses, "hit_rate": round(hits / total, 4) if total else 0.0}


def run_in_toolchain(
    image: str,
    command: Sequence[str],
    mounts: Mapping[Path, str],
    workdir: str,
    *,
    quiet: bool = False,
    check: bool = True,
    as_build_user: bool = False,
    timeout: float | None = None,
) -> proc.Result:
    """Any command in the builder image (C test binaries, out-of-tree modules), confined like a build and
    tied to this process's life. As the invoking user unless as_build_user (then every writable mount must
    already belong to the build user: see give_to_build_user)."""
    uid, gid = build_user() if as_build_user else (os.getuid(), os.getgid())
    options = ["-i", "--init", "--network", "none", *hardening_argv(uid, gid), "-w", workdir]
    for host, guest in mounts.items():
        options += ["-v", f"{host}:{guest}"]
    watched = ["sh", "-c", WATCHDOG, "kci-watchdog", *command]
    return docker.run(image, watched, options, quiet=quiet, check=check, hold_stdin=True, timeout=timeout)
