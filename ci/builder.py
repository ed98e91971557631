"""Run kbuild inside the builder container: configure, build, install modules, read ccache statistics.

The container runs as the invoking user with the source tree (read-only), the output tree and the ccache
directory mounted at fixed paths, so paths, user, host and timestamp baked into the kernel never depend on
the machine: that, with KBUILD_BUILD_* pinned, makes the bzImage and modules bit-for-bit reproducible.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ci import proc
from ci.ui import console

SRC = "/build/src"
OUT = "/build/out"
CCACHE = "/ccache"
ARCH = "x86_64"
KBUILD_USER = "kernel-ci"
KBUILD_HOST = "kernel-ci"
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
            "CCACHE_MAXSIZE": os.environ.get("KERNEL_CI_CCACHE_SIZE", "5G"),
        }

    def make_argv(self, *targets: str, extra: Sequence[str] = ()) -> list[str]:
        argv = ["make", "-C", SRC, f"O={OUT}", f"ARCH={ARCH}", f"-j{self.jobs}"]
        if self.use_ccache:
            argv += ["CC=ccache gcc", "HOSTCC=ccache gcc"]
        return [*argv, *extra, *targets]


def docker_run_argv(env: BuildEnv, command: Sequence[str], *, workdir: str = OUT) -> list[str]:
    # With a shared ccache configured (CCACHE_REMOTE_STORAGE, set by ci.remotestore), the container needs
    # the network to reach it: host networking, so that a service on the host's loopback is reachable as
    # in the URL. The value (it may hold a token) is inherited from this process's environment by
    # `docker run -e NAME`, never written on the (logged) command line.
    remote_ccache = env.use_ccache and bool(os.environ.get("CCACHE_REMOTE_STORAGE"))
    argv = [
        "docker", "run", "--rm", "--network", "host" if remote_ccache else "none", "--init",
        "--user", f"{os.getuid()}:{os.getgid()}",
        "-v", f"{env.src}:{SRC}:ro",
        "-v", f"{env.out}:{OUT}",
        "-v", f"{env.ccache_dir}:{CCACHE}",
        "-w", workdir,
    ]  # fmt: skip
    for host, guest in env.extra_mounts.items():
        argv += ["-v", f"{host}:{guest}"]
    for name, value in env.kbuild_vars().items():
        argv += ["-e", f"{name}={value}"]
    if remote_ccache:
        argv += ["-e", "CCACHE_REMOTE_STORAGE"]
    return [*argv, env.image, *command]


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
    start = time.monotonic()
    with _KbuildProgress(title) as progress:
        proc.run(
            docker_run_argv(env, env.make_argv(*targets, extra=extra)), on_line=progress, keep_output=False
        )
    return time.monotonic() - start, progress.steps


def configure(env: BuildEnv, merged_fragment: str) -> str:
    """allnoconfig + the merged fragment (KCONFIG_ALLCONFIG), then olddefconfig; returns the final .config."""
    env.out.mkdir(parents=True, exist_ok=True)
    fragment = env.out / "kci-fragment.config"
    fragment.write_text(merged_fragment)
    allconfig = f"KCONFIG_ALLCONFIG={OUT}/kci-fragment.config"
    run_make(env, "allnoconfig", title="kconfig allnoconfig + fragments", extra=[allconfig])
    run_make(env, "olddefconfig", title="kconfig olddefconfig")
    return (env.out / ".config").read_text()


def build(env: BuildEnv) -> tuple[float, int]:
    """The kernel image and modules, then modules_install into out/.kci-modules."""
    seconds, steps = run_make(env, "bzImage", "modules", title="kbuild")
    staging = env.out / ".kci-modules"
    if staging.exists():
        proc.run(["rm", "-rf", staging], quiet=True)
    run_make(env, "modules_install", title="modules_install", extra=[f"INSTALL_MOD_PATH={OUT}/.kci-modules"])
    return seconds, steps


def kernel_release(env: BuildEnv) -> str:
    return (env.out / "include/config/kernel.release").read_text().strip()


def ccache_counters(env: BuildEnv) -> dict[str, int]:
    """ccache's machine-readable counters (`--print-stats`) for the mounted cache dir."""
    if not env.use_ccache:
        return {}
    text = proc.capture(docker_run_argv(env, ["ccache", "--print-stats"]))
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
) -> proc.Result:
    """Any command in the builder image as the invoking user (C test binaries, out-of-tree modules)."""
    argv = [
        "docker",
        "run",
        "--rm",
        "--network",
        "none",
        "--user",
        f"{os.getuid()}:{os.getgid()}",
        "-w",
        workdir,
    ]
    for host, guest in mounts.items():
        argv += ["-v", f"{host}:{guest}"]
    return proc.run([*argv, image, *command], quiet=quiet, check=check)
