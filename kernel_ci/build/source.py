"""Kernel source: resolve a requested version through the lock file, download, verify, unpack once."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from kernel_ci.core import proc
from kernel_ci.core.console import console, warn
from kernel_ci.core.digest import sha256_file
from kernel_ci.core.errors import InfrastructureError, KernelCIError, UsageError
from kernel_ci.core.files import file_identity
from kernel_ci.core.paths import SOURCES_LOCK, cache_dir
from kernel_ci.host import aptmirror

KERNEL_ORG_BASE = "https://cdn.kernel.org/pub/linux/kernel"
CHUNK = 1 << 20


class SourceError(KernelCIError):
    """Base of this module's errors; the subclass says whose fault it is (exit code)."""


class UnknownVersionError(SourceError, UsageError):
    """The requested version is not in the lock file, or the lock file entry cannot be used (exit 2)."""


class SourceUnavailableError(SourceError, InfrastructureError):
    """No mirror delivered the tarball with its pinned digest (exit 7): the network, not the user."""


@dataclass(frozen=True)
class Tarball:
    version: str
    origin: str  # "kernel.org" | "debian"
    path: str
    sha256: str
    top_dir: str
    archive: str = "debian"
    size: int | None = None

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def urls(self, debian_bases: Callable[[str], list[str]] = aptmirror.archive_bases) -> list[str]:
        if self.origin == "kernel.org":
            base = os.environ.get("KERNEL_CI_KERNEL_ORG_MIRROR", KERNEL_ORG_BASE).rstrip("/")
            return [f"{base}/{self.path}"]
        if self.origin == "debian":
            return [f"{base}/{self.path}" for base in debian_bases(self.archive)]
        raise UnknownVersionError(f"tarball {self.version}: unknown origin {self.origin!r}")


@dataclass(frozen=True)
class SourceLock:
    default: str
    aliases: dict[str, list[str]]
    tarballs: dict[str, Tarball]

    def candidates(self, request: str | None) -> list[Tarball]:
        wanted = request or self.default
        names = self.aliases.get(wanted, [wanted])
        unknown = [n for n in names if n not in self.tarballs]
        if unknown:
            known = ", ".join(sorted(set(self.aliases) | set(self.tarballs)))
            raise UnknownVersionError(
                f"kernel version {wanted!r} is not in {SOURCES_LOCK.name}; known: {known}"
            )
        return [self.tarballs[n] for n in names]


def load_lock(path: Path = SOURCES_LOCK) -> SourceLock:
    data = tomllib.loads(path.read_text())
    tarballs = {}
    for version, entry in data.get("tarballs", {}).items():
        tarballs[version] = Tarball(
            version=version,
            origin=entry["origin"],
            path=entry["path"],
            sha256=entry.get("sha256", ""),
            top_dir=entry["top_dir"],
            archive=entry.get("archive", "debian"),
            size=entry.get("size"),
        )
    aliases = {name: list(versions) for name, versions in data.get("aliases", {}).items()}
    return SourceLock(default=data.get("default", next(iter(tarballs))), aliases=aliases, tarballs=tarballs)


@dataclass(frozen=True)
class KernelSource:
    requested: str
    tarball: Tarball
    tree: Path  # the pristine unpacked tree: never modified
    url: str
    fallback_notes: tuple[str, ...] = field(default=())

    @property
    def version(self) -> str:
        return self.tarball.version


def _download(url: str, dest: Path, expected_size: int | None) -> None:
    tmp = dest.with_name(dest.name + f".part.{os.getpid()}")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            total = int(response.headers.get("Content-Length") or expected_size or 0) or None
            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
            with Progress(*columns, console=console, transient=True) as progress, tmp.open("wb") as out:
                task = progress.add_task(f"download {dest.name}", total=total)
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    progress.advance(task, len(chunk))
        tmp.rename(dest)
        size = dest.stat().st_size
        console.print(
            f"downloaded {dest.name}: {size / 2**20:.1f} MiB in {time.monotonic() - started:.1f} s from {url}"
        )
    finally:
        tmp.unlink(missing_ok=True)


def fetch_tarball(tarball: Tarball, urls: Sequence[str] | None = None) -> tuple[Path, str]:
    """The verified tarball in the download cache, downloading it if needed; returns (path, url used)."""
    if not tarball.sha256:
        raise UnknownVersionError(f"{tarball.filename} has no sha256 pinned in {SOURCES_LOCK.name}")
    dest = cache_dir("downloads") / tarball.filename
    if dest.exists():
        if _matches_pin(dest, tarball.sha256):
            return dest, f"cache:{dest}"
        warn(f"{dest} does not match its pinned sha256: downloading it again")
        dest.unlink()
    failures: list[str] = []
    for url in urls if urls is not None else tarball.urls():
        try:
            _download(url, dest, tarball.size)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            failures.append(f"{url}: {exc}")
            if len(failures) == 1:
                warn(f"could not download from the primary source {url} ({exc}); trying the next mirror")
            continue
        actual = sha256_file(dest)
        if actual != tarball.sha256:
            dest.unlink()
            failures.append(f"{url}: sha256 {actual} does not match the pinned {tarball.sha256}")
            continue
        return dest, url
    if not failures:
        failures.append("no mirror configured for this origin (see /etc/apt/sources.list.d/)")
    raise SourceUnavailableError(f"could not get {tarball.filename}:\n  " + "\n  ".join(failures))


def _matches_pin(path: Path, sha256: str) -> bool:
    """Whether the cached download at path has the pinned sha256. A match is remembered in path.verified,
    keyed on the file's inode, size, mtime and ctime (an edit, a replacement or a utime changes one of
    them; ctime cannot be set back): every build re-hashed the tarball (~120 MB, 80 ms of a 0.4 s hit)."""
    stamp = path.with_name(path.name + ".verified")
    seen = " ".join([sha256, *map(str, file_identity(path))])
    with contextlib.suppress(OSError):
        if stamp.read_text() == seen:
            return True
    if sha256_file(path) != sha256:
        stamp.unlink(missing_ok=True)
        return False
    with contextlib.suppress(OSError):  # only an optimisation: without it the next run hashes again
        tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}")
        tmp.write_text(seen)
        tmp.replace(stamp)
    return True


@contextlib.contextmanager
def locked(path: Path, waiting: str) -> Iterator[None]:
    """An exclusive flock on path (created if needed) for the block; says what it waits for if it must."""
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"waiting for {waiting} ({path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock, also when the process dies


def unpack(tarball: Tarball, archive_path: Path) -> Path:
    """Unpack once into the source cache (atomically) and return the pristine tree.

    Under a lock: a second process unpacking the same tarball waits for the first and reuses its tree (without
    it, it unpacked again and replaced the tree the first one was already building from).
    """
    root = cache_dir("sources", tarball.sha256[:16])
    with locked(root.with_name(root.name + ".lock"), f"another process unpacking {archive_path.name}"):
        return _unpack_locked(tarball, archive_path, root)


def _unpack_locked(tarball: Tarball, archive_path: Path, root: Path) -> Path:
    tree = root / tarball.top_dir
    if (root / ".complete").exists() and tree.is_dir():
        return tree
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
    try:
        console.print(f"unpacking {archive_path.name} (once; cached in {root})")
        proc.run(["tar", "-xf", archive_path, "-C", staging], quiet=True)
        if tree.exists():
            shutil.rmtree(tree)
        (staging / tarball.top_dir).rename(tree)
        (root / ".complete").write_text(tarball.sha256 + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tree


def resolve(request: str | None = None, lock: SourceLock | None = None) -> KernelSource:
    """The first candidate for the request that can be fetched and verified, with a warning per fallback."""
    lock = lock or load_lock()
    candidates = lock.candidates(request)
    notes: list[str] = []
    for index, tarball in enumerate(candidates):
        try:
            path, url = fetch_tarball(tarball)
        except SourceError as exc:
            if index + 1 == len(candidates):
                # the same kind (the last candidate's reason decides the exit code), with the fallbacks tried
                raise type(exc)("\n".join([*notes, str(exc)])) from exc
            fallback = candidates[index + 1].version
            note = f"Linux {tarball.version} is not available ({exc}); falling back to {fallback}"
            warn(note)
            notes.append(note)
            continue
        return KernelSource(
            requested=request or lock.default,
            tarball=tarball,
            tree=unpack(tarball, path),
            url=url,
            fallback_notes=tuple(notes),
        )
    raise UnknownVersionError(f"no candidates for {request!r}")
