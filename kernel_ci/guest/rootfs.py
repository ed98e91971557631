"""The Debian 12 guest root filesystem: a cached qcow2 image built from containers/rootfs/ and kci-init.

debootstrap (minbase) into a temporary directory, trim, add the overlay files and /sbin/kci-init,
`mkfs.ext4 -d` into a sparse raw image, `qemu-img convert` to qcow2. No mounting. The image is keyed by
the sha256 of its recipe, so a changed package list, overlay file, init script or build setting makes a
new image while an unchanged recipe reuses the cached one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel_ci.core import proc
from kernel_ci.core.console import console, warn
from kernel_ci.core.digest import sha256_file
from kernel_ci.core.errors import InfrastructureError
from kernel_ci.core.paths import cache_dir
from kernel_ci.host import aptmirror

SCHEMA = 1  # bump when the build steps below change in a way the recipe does not capture
SUITE = "bookworm"
VARIANT = "minbase"
INIT_PATH = "sbin/kci-init"
MOUNT_POINTS = ("kci", "kci-results")
HEADROOM_MIB = 512  # free space for what the tests write (the qcow2 stays sparse)
# An explicit ext4 feature set, so the host's mke2fs.conf cannot add features an older guest kernel
# (5.10) cannot mount read-write (e.g. orphan_file). No journal: every run gets a fresh overlay.
# lazy init off: otherwise the guest's ext4lazyinit thread would zero inode tables during the tests.
MKFS_FEATURES = (
    "none,ext_attr,resize_inode,dir_index,filetype,extent,flex_bg,sparse_super,large_file,"
    "huge_file,dir_nlink,extra_isize,64bit,metadata_csum"
)
MKFS_EXTENDED = "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0"
TRIM = (
    "var/lib/apt/lists",
    "var/cache/apt",
    "var/cache/debconf/templates.dat-old",
    "var/log",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bash-completion",
)


class RootfsError(InfrastructureError):
    """The image cannot be built here (not root, tool missing, no mirror) or its recipe is broken."""


@dataclass(frozen=True)
class RootfsImage:
    path: Path
    key: str
    packages: dict[str, str]  # installed package -> version (dpkg-query inside the image)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the image's content; its canonical JSON hashes to the cache key."""

    packages: tuple[str, ...]
    files: dict[str, tuple[Path, int]]  # path inside the image -> (source file, mode)

    def describe(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "suite": SUITE,
            "variant": VARIANT,
            "packages": list(self.packages),
            "files": {
                dest: {"sha256": sha256_file(src), "mode": f"{mode:04o}"}
                for dest, (src, mode) in sorted(self.files.items())
            },
            "mkfs": {"features": MKFS_FEATURES, "extended": MKFS_EXTENDED, "headroom_mib": HEADROOM_MIB},
            "trim": list(TRIM),
        }

    def key(self) -> str:
        canonical = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def load_recipe(recipe_dir: Path, init_script: Path) -> Recipe:
    """packages.txt (one name a line, # comments) + every file under overlay/ + the init script."""
    packages_file = recipe_dir / "packages.txt"
    if not packages_file.is_file():
        raise RootfsError(f"{packages_file} is missing")
    if not init_script.is_file():
        raise RootfsError(f"init script {init_script} is missing")
    packages = parse_packages(packages_file.read_text())
    return Recipe(packages=packages, files=_recipe_files(recipe_dir, init_script))


def parse_packages(text: str) -> tuple[str, ...]:
    names: set[str] = set()
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if any(c.isspace() for c in line) or "," in line:
            raise RootfsError(f"packages.txt: one package name per line, got {raw!r}")
        names.add(line)
    if not names:
        raise RootfsError("packages.txt lists no package")
    return tuple(sorted(names))


def _recipe_files(recipe_dir: Path, init_script: Path) -> dict[str, tuple[Path, int]]:
    files: dict[str, tuple[Path, int]] = {}
    overlay = recipe_dir / "overlay"
    if overlay.is_dir():
        for src in sorted(p for p in overlay.rglob("*") if p.is_file() or p.is_symlink()):
            if src.is_symlink() or not src.is_file():
                raise RootfsError(f"overlay file {src} must be a regular file")
            mode = 0o755 if os.access(src, os.X_OK) else 0o644
            files[src.relative_to(overlay).as_posix()] = (src, mode)
    files[INIT_PATH] = (init_script, 0o755)
    return files


def image_path(key: str, cache: Path | None = None) -> Path:
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    return (cache or cache_dir("rootfs")) / f"{SUITE}-{key[:16]}.qcow2"


def ensure_rootfs(
    recipe_dir: Path, init_script: Path, *, rebuild: bool = False, cache: Path | None = None
) -> RootfsImage:
    """The cached image for this recipe, built first when missing (or when rebuild is set); cache: the
    image directory (default: the user's cache, rootfs/)."""
    recipe = load_recipe(recipe_dir, init_script)
    key = recipe.key()
    image = image_path(key, cache)
    sidecar = image.with_suffix(".json")
    with _lock(image.with_suffix(".lock")):
        if not rebuild and image.is_file() and sidecar.is_file():
            meta = json.loads(sidecar.read_text())
            console.log(f"rootfs: cached {image}")
            return RootfsImage(image, key, dict(meta["packages"]))
        packages = _build(recipe, key, image, sidecar)
    return RootfsImage(image, key, packages)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One builder per image: a second caller waits, then finds the finished image."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(recipe: Recipe, key: str, image: Path, sidecar: Path) -> dict[str, str]:
    mirror = debian_mirror()
    check_can_build(recipe, mirror)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".build-{key[:16]}-", dir=image.parent))
    try:
        root = work / "root"
        _debootstrap(recipe, root, mirror)
        packages = installed_packages(root)
        _trim(root)
        install_files(recipe, root)
        raw = work / "root.img"
        _make_ext4(root, raw, key)
        tmp_image = work / "image.qcow2"
        proc.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, tmp_image])
        meta: dict[str, Any] = {
            "key": key,
            "recipe": recipe.describe(),
            "packages": packages,
            "raw_bytes": raw.stat().st_size,
            "qcow2_bytes": tmp_image.stat().st_size,
            "build_seconds": round(time.monotonic() - started, 1),
        }
        tmp_sidecar = work / "image.json"
        tmp_sidecar.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_image, image)
        os.replace(tmp_sidecar, sidecar)  # last: the sidecar marks a complete image
    finally:
        _remove_tree(work)
    console.log(
        f"rootfs: built {image} ({meta['qcow2_bytes'] / 2**20:.0f} MiB qcow2, "
        f"{len(packages)} packages) in {meta['build_seconds']:.0f} s"
    )
    return packages


def debian_mirror() -> str:
    """The Debian archive URI the host's apt is configured with (never a hard-coded host)."""
    bases = aptmirror.archive_bases("debian")
    if not bases:
        raise RootfsError("no Debian mirror in /etc/apt/sources.list or /etc/apt/sources.list.d/")
    return bases[0]


def debootstrap_command(recipe: Recipe, root: Path, mirror: str) -> list[str]:
    return [
        "debootstrap",
        f"--variant={VARIANT}",
        "--components=main",
        f"--include={','.join(recipe.packages)}",
        SUITE,
        str(root),
        mirror,
    ]


def check_can_build(recipe: Recipe, mirror: str) -> None:
    command = shlex.join(debootstrap_command(recipe, Path("<dir>"), mirror))
    if os.geteuid() != 0:
        raise RootfsError(
            f"building the guest rootfs needs root (debootstrap), as root it runs:\n  {command}"
        )
    tools = (("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs"), ("qemu-img", "qemu-utils"))
    for tool, package in tools:
        if shutil.which(tool) is None:
            raise RootfsError(
                f"{tool} is not installed: apt-get install -y {package}\n(the rootfs build runs: {command})"
            )


def _debootstrap(recipe: Recipe, root: Path, mirror: str) -> None:
    console.log(f"rootfs: debootstrap {SUITE} ({VARIANT}) + {len(recipe.packages)} packages")
    proc.run(debootstrap_command(recipe, root, mirror), on_line=DebootstrapProgress(), keep_output=False)


class DebootstrapProgress:
    """Turns debootstrap's one-line-per-package chatter into one line per phase, with package counts."""

    PER_PACKAGE = ("Retrieving", "Validating", "Extracting", "Unpacking", "Configuring")
    PHASE_WORDS = ("required", "the", "base", "core")  # "Unpacking the base system..." is a phase

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.started = time.monotonic()

    def __call__(self, line: str) -> None:
        if line.startswith(("W:", "E:")):
            console.print(f"[yellow]debootstrap {_escape(line)}[/]", highlight=False)
            return
        if not line.startswith("I: "):
            return
        text = line[3:].strip()
        verb, _, rest = text.partition(" ")
        if verb in self.PER_PACKAGE and rest.split(" ", 1)[0] not in self.PHASE_WORDS:
            self.counts[verb] = self.counts.get(verb, 0) + 1
            return
        if self.counts:
            done = ", ".join(f"{verb.lower()} {n}" for verb, n in self.counts.items())
            console.log(f"  debootstrap: ({done})")
            self.counts = {}
        console.log(f"  debootstrap: {_escape(text)}  [dim]{time.monotonic() - self.started:.0f} s[/]")


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def installed_packages(root: Path) -> dict[str, str]:
    out = proc.capture(
        ["dpkg-query", f"--admindir={root / 'var/lib/dpkg'}", "-W", "-f", "${Package}\t${Version}\n"]
    )
    pairs = (line.split("\t", 1) for line in out.splitlines() if "\t" in line)
    return dict(sorted((name, version) for name, version in pairs))


def _trim(root: Path) -> None:
    for rel in TRIM:
        target = root / rel
        if target.is_dir() and not target.is_symlink():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)


def install_files(recipe: Recipe, root: Path) -> None:
    for dest, (src, mode) in recipe.files.items():
        target = path_in_root(root, dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        shutil.copyfile(src, target)
        target.chmod(mode)
    for name in MOUNT_POINTS:
        (root / name).mkdir(mode=0o755, exist_ok=True)


def path_in_root(root: Path, rel: str) -> Path:
    """root/rel with symlinked parent directories (merged /usr: sbin -> usr/sbin) resolved inside root."""
    current = root
    parts = Path(rel).parts
    for i, part in enumerate(parts):
        candidate = current / part
        hops = 0
        while i < len(parts) - 1 and candidate.is_symlink():
            hops += 1
            if hops > 20:
                raise RootfsError(f"symlink loop at {candidate}")
            link = os.readlink(candidate)
            candidate = (root / link.lstrip("/")) if link.startswith("/") else (candidate.parent / link)
        current = candidate
    resolved = Path(os.path.normpath(current))
    if not resolved.is_relative_to(root):
        raise RootfsError(f"{rel} resolves outside the image root")
    return resolved


def image_bytes(root: Path) -> int:
    """Size for the ext4 image: the tree's blocks and inodes, ext4 overhead, plus HEADROOM_MIB."""
    block = 4096
    data = 0
    inodes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
                data += -(-st.st_size // block) * block
    overhead = data // 10 + inodes * 256 + 64 * 2**20
    total = data + overhead + HEADROOM_MIB * 2**20
    return -(-total // 2**20) * 2**20


def _make_ext4(root: Path, raw: Path, key: str) -> None:
    size = image_bytes(root)
    with raw.open("wb") as handle:
        handle.truncate(size)
    fs_uuid = str(uuid.UUID(key[:32]))
    proc.run(
        [
            "mkfs.ext4", "-q", "-F", "-L", "kci-root", "-U", fs_uuid, "-m", "0", "-b", "4096",
            "-O", MKFS_FEATURES, "-E", f"{MKFS_EXTENDED},hash_seed={fs_uuid}", "-d", root, raw,
        ]
    )  # fmt: skip


def _remove_tree(path: Path) -> None:
    """Delete a build directory, first unmounting anything debootstrap left mounted inside it."""
    inner = _mounts_under(path)
    for mount in sorted(inner, key=len, reverse=True):
        proc.run(["umount", "-l", mount], check=False, quiet=True)
    left = _mounts_under(path)
    if left:
        warn(f"not deleting {path}: still mounted inside: {', '.join(left)}")
        return
    shutil.rmtree(path, ignore_errors=True)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            mount_point = line.split()[4].replace("\\040", " ")
            if mount_point.startswith(prefix):
                found.append(mount_point)
    return found
