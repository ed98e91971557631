"""The Debian 12 guest root filesystem: a cached qcow2 image built from containers/rootfs/ and kci-init.

Built without root by mmdebstrap in its unshare mode (a maintained tool, by a Debian developer, that runs
apt and dpkg in a user namespace mapped to the user's /etc/subuid range): debootstrap needs real root, and
fakeroot/fakechroot break maintainer scripts. mmdebstrap writes a tarball whose owners are right (uid 0,
_apt...) while every file on the host belongs to the user. Its hooks trim the tree, unpack our overlay
(a tarball of the overlay files and /sbin/kci-init, made here with uid 0) and hand back dpkg's status. The
tarball becomes an ext4 image inside the same kind of namespace (`mmdebstrap --unshare-helper`, where the
tar's owners can be restored): `mkfs.ext4 -d` of the unpacked tree into a sparse raw image, `qemu-img
convert` to qcow2, streamed out on stdout into the user's cache. Nothing is mounted, nothing runs as root,
nothing the namespace creates outlives it (its scratch directory is removed on exit). As root the same
commands run without the user namespace.

The image is keyed by the sha256 of its recipe, so a changed package list, overlay file, init script or
build setting makes a new image while an unchanged recipe reuses the cached one. SCHEMA 2 is the
mmdebstrap build: an image debootstrapped by root (SCHEMA 1) has another key and is never used again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import shlex
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel_ci.core import proc
from kernel_ci.core.console import console
from kernel_ci.core.digest import sha256_file
from kernel_ci.core.errors import InfrastructureError
from kernel_ci.core.paths import cache_dir
from kernel_ci.host import aptmirror

# bump when the build steps below change in a way the recipe does not capture (2: mmdebstrap, unshare mode)
SCHEMA = 2
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
        overlay = write_overlay_tar(recipe, work / "overlay.tar")
        root_tar = work / "root.tar"
        (work / "dpkg").mkdir()
        _mmdebstrap(mmdebstrap_command(recipe, root_tar, overlay, work / "dpkg" / "status", mirror))
        packages = installed_packages(work / "dpkg")
        size = image_bytes_of_tar(root_tar)
        tmp_image = work / "image.qcow2"
        _make_image(root_tar, tmp_image, size, key)
        meta: dict[str, Any] = {
            "key": key,
            "recipe": recipe.describe(),
            "packages": packages,
            "raw_bytes": size,
            "qcow2_bytes": tmp_image.stat().st_size,
            "build_seconds": round(time.monotonic() - started, 1),
        }
        tmp_sidecar = work / "image.json"
        tmp_sidecar.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_image, image)
        os.replace(tmp_sidecar, sidecar)  # last: the sidecar marks a complete image
    finally:
        shutil.rmtree(work, ignore_errors=True)
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


def trim_hook() -> str:
    """The customize hook (sh, the tree is $1) that empties the TRIM directories, keeping apt's partial/."""
    dirs = " ".join(shlex.quote(rel) for rel in TRIM)
    return (
        f'for d in {dirs}; do if [ -d "$1/$d" ] && [ ! -L "$1/$d" ]; then '
        'find "$1/$d" -mindepth 1 -delete; fi; done; '
        'mkdir -p "$1/var/lib/apt/lists/partial" "$1/var/cache/apt/archives/partial"'
    )


def mmdebstrap_command(recipe: Recipe, root_tar: Path, overlay: Path, status: Path, mirror: str) -> list[str]:
    """mmdebstrap in unshare mode: the tree as a tarball, trimmed, with our overlay, and dpkg's status out."""
    return [
        "mmdebstrap",
        "--mode=unshare",
        f"--variant={VARIANT}",
        "--components=main",
        f"--include={','.join(recipe.packages)}",
        f"--customize-hook={trim_hook()}",
        f"--customize-hook=tar-in {shlex.quote(str(overlay))} /",
        f"--customize-hook=download /var/lib/dpkg/status {shlex.quote(str(status))}",
        SUITE,
        str(root_tar),
        mirror,
    ]


def check_can_build(recipe: Recipe, mirror: str) -> None:
    """Every tool the build uses is there, and (as a user) a subordinate id range for the namespace."""
    command = shlex.join(
        mmdebstrap_command(recipe, Path("<root.tar>"), Path("<overlay.tar>"), Path("<s>"), mirror)
    )
    tools = [("mmdebstrap", "mmdebstrap"), ("mkfs.ext4", "e2fsprogs"), ("qemu-img", "qemu-utils")]
    if os.geteuid() != 0:
        tools.append(("newuidmap", "uidmap"))
    for tool, package in tools:
        if shutil.which(tool) is None and not any(Path(d, tool).exists() for d in ("/usr/sbin", "/sbin")):
            raise RootfsError(
                f"{tool} is not installed: run `sudo kernel-ci setup-host` "
                f"(or apt-get install -y {package})\n"
                f"(the rootfs build runs: {command})"
            )
    if os.geteuid() != 0 and not has_subordinate_ids(_user_name()):
        raise RootfsError(
            f"user {_user_name()} has no range in /etc/subuid and /etc/subgid, which mmdebstrap's unshare "
            "mode maps the guest's users to: run `sudo kernel-ci setup-host`"
        )


def _user_name() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def has_subordinate_ids(
    user: str, files: tuple[Path, Path] = (Path("/etc/subuid"), Path("/etc/subgid"))
) -> bool:
    """Whether user has a range (of at least 65536 ids: a Debian tree uses up to 65534) in both files."""
    return all(_subordinate_count(path, user) >= 65536 for path in files)


def _subordinate_count(path: Path, user: str) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] == user and fields[2].isdigit():
            return int(fields[2])
    return 0


def _mmdebstrap(argv: list[str]) -> None:
    console.log(f"rootfs: mmdebstrap {SUITE} ({VARIANT}, unshare mode)")
    proc.run(argv, on_line=MmdebstrapProgress(), keep_output=False)


class MmdebstrapProgress:
    """mmdebstrap's phases ("I: ..." lines) with the time since start; apt's chatter in between dropped."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, line: str) -> None:
        if line.startswith(("W:", "E:")):
            console.print(f"[yellow]mmdebstrap {_escape(line)}[/]", highlight=False)
            return
        if not line.startswith("I: "):
            return
        text = line[3:].strip()
        console.log(f"  mmdebstrap: {_escape(text)}  [dim]{time.monotonic() - self.started:.0f} s[/]")


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def installed_packages(admindir: Path) -> dict[str, str]:
    """package -> version from a dpkg database directory (its status file is enough for dpkg-query)."""
    out = proc.capture(["dpkg-query", f"--admindir={admindir}", "-W", "-f", "${Package}\t${Version}\n"])
    pairs = (line.split("\t", 1) for line in out.splitlines() if "\t" in line)
    return dict(sorted((name, version) for name, version in pairs))


def write_overlay_tar(recipe: Recipe, path: Path) -> Path:
    """The overlay files and the mount points as a tarball owned by uid 0, for mmdebstrap's tar-in hook.

    File entries only (no entries for their parent directories): tar creates missing parents and follows
    existing symlinked ones, so sbin/kci-init lands in usr/sbin of a merged-/usr tree."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for dest, (src, mode) in sorted(recipe.files.items()):
            info = _root_owned(tarfile.TarInfo(f"./{dest}"), mode)
            info.size = src.stat().st_size
            with src.open("rb") as handle:
                tar.addfile(info, handle)
        for name in MOUNT_POINTS:
            info = _root_owned(tarfile.TarInfo(f"./{name}"), 0o755)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
    return path


def _root_owned(info: tarfile.TarInfo, mode: int) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = mode
    info.mtime = 0
    return info


def install_files(recipe: Recipe, root: Path) -> None:
    """The overlay files and mount points into an unpacked tree (used for trees not built here)."""
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


def image_bytes_of_tar(tarball: Path) -> int:
    """Size for the ext4 image of the tarball's tree: its blocks and inodes, ext4 overhead, HEADROOM_MIB."""
    data = inodes = 0
    with tarfile.open(tarball) as tar:
        for member in tar:
            inodes += 1
            data += _blocks(member.size if member.isreg() else len(member.linkname))
    return _with_overhead(data, inodes)


def _blocks(size: int, block: int = 4096) -> int:
    return -(-size // block) * block


def _with_overhead(data: int, inodes: int) -> int:
    overhead = data // 10 + inodes * 256 + 64 * 2**20
    total = data + overhead + HEADROOM_MIB * 2**20
    return -(-total // 2**20) * 2**20


# Runs inside the user namespace (`mmdebstrap --unshare-helper`), where the tar's owners can be restored:
# the tree in a private scratch directory that is removed on exit, the image streamed out on stdout (the
# namespace's root is a subordinate uid that may not write into the user's cache). The tar's device nodes
# are left out: a user namespace cannot make them, and the guest kernel mounts devtmpfs on /dev.
IMAGE_SCRIPT = r"""
set -eu
PATH="$PATH:/usr/sbin:/sbin"  # mkfs.ext4 is in sbin, which a user's PATH lacks on Debian
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
trap 'exit 143' TERM INT
mkdir "$scratch/root"
tar -C "$scratch/root" --numeric-owner -xpf - --exclude='./dev/*'
truncate -s "$1" "$scratch/root.img"
shift
mkfs.ext4 "$@" -d "$scratch/root" "$scratch/root.img"
qemu-img convert -q -f raw -O qcow2 "$scratch/root.img" "$scratch/image.qcow2"
cat "$scratch/image.qcow2"
"""


def mkfs_options(key: str) -> list[str]:
    fs_uuid = str(uuid.UUID(key[:32]))
    return [
        "-q", "-F", "-L", "kci-root", "-U", fs_uuid, "-m", "0", "-b", "4096",
        "-O", MKFS_FEATURES, "-E", f"{MKFS_EXTENDED},hash_seed={fs_uuid}",
    ]  # fmt: skip


SCRIPT_ENV = "KCI_IMAGE_SCRIPT"  # IMAGE_SCRIPT travels in the environment: the logged command stays short


def image_command(root_tar: Path, image: Path, size: int, key: str) -> list[str]:
    """The tarball (stdin) to a qcow2 (stdout) in the namespace; both files are opened by the outer shell,
    as the user. Run with SCRIPT_ENV=IMAGE_SCRIPT in the environment."""
    inner = ["mmdebstrap", "--unshare-helper", "sh", "-c", f'eval "${SCRIPT_ENV}"', "kci-image", str(size)]
    redirect = f"<{shlex.quote(str(root_tar))} >{shlex.quote(str(image))}"
    return ["sh", "-c", f"exec {shlex.join([*inner, *mkfs_options(key)])} {redirect}"]


def _make_image(root_tar: Path, image: Path, size: int, key: str) -> None:
    console.log(f"rootfs: ext4 ({size // 2**20} MiB, sparse) -> qcow2")
    proc.run(image_command(root_tar, image, size, key), env={SCRIPT_ENV: IMAGE_SCRIPT}, keep_output=False)
