"""Container images: the Debian 12 base (debootstrap + docker import) and the builder (BuildKit).

Each image is tagged by the hash of its recipe, so an unchanged recipe is never rebuilt. The toolchain
fingerprint (hash of every package version in the builder) is what build keys use: unlike an image id it
is the same on every machine that builds the same toolchain.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from kernel_ci.core import proc
from kernel_ci.core.console import console
from kernel_ci.core.errors import InfrastructureError
from kernel_ci.core.paths import CONTAINERS, cache_dir
from kernel_ci.host import aptmirror, docker
from kernel_ci.host import setup as hostsetup

BASE_RECIPE = CONTAINERS / "base" / "recipe.toml"
BUILDER_DIR = CONTAINERS / "builder"
IMAGE_SCHEMA = "1"


class ImageError(InfrastructureError):
    pass


@dataclass(frozen=True)
class Toolchain:
    image: str  # tag
    image_id: str
    fingerprint: str
    gcc_version: str
    packages: tuple[str, ...]


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256(IMAGE_SCHEMA.encode())
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def base_image_tag(recipe_path: Path = BASE_RECIPE) -> str:
    return f"kernel-ci/base:bookworm-{_digest(recipe_path.read_bytes())[:16]}"


def ensure_base_image(recipe_path: Path = BASE_RECIPE) -> str:
    """The tag of the Debian 12 base image, debootstrapped and imported if not present."""
    tag = base_image_tag(recipe_path)
    if docker.image_exists(tag):
        return tag
    recipe = tomllib.loads(recipe_path.read_text())
    if os.environ.get("KERNEL_CI_BASE_FROM_REGISTRY") == "1":
        console.print(f"pulling base image {recipe['image']}")
        docker.pull(recipe["image"], tag)
        return tag
    mirrors = aptmirror.archive_bases("debian")
    if not mirrors:
        raise ImageError("no Debian mirror in /etc/apt to debootstrap the base image from")
    if shutil.which("debootstrap") is None and not Path("/usr/sbin/debootstrap").exists():
        raise ImageError("debootstrap is missing: sudo apt-get install -y debootstrap")
    if os.geteuid() != 0:
        raise ImageError(f"making the base image {tag} needs root (debootstrap): run once with sudo")
    root = Path(tempfile.mkdtemp(prefix="base-", dir=cache_dir("tmp")))
    try:
        console.print(f"making base image {tag} with debootstrap ({recipe['suite']}, {recipe['variant']})")
        include = ",".join(recipe.get("include", []))
        argv = ["debootstrap", f"--variant={recipe['variant']}"]
        if include:
            argv.append(f"--include={include}")
        proc.run([*argv, recipe["suite"], root / "rootfs", mirrors[0]], on_line=_debootstrap_progress)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (root / "rootfs" / junk).glob("*"):
                if item.is_file():
                    item.unlink()
        tarball = root / "rootfs.tar"
        proc.run(["tar", "-C", root / "rootfs", "-cf", tarball, "."], quiet=True)
        console.print(f"imported {tag}: {docker.import_tarball(tarball, tag)[:19]}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return tag


def _debootstrap_progress(line: str) -> None:
    if line.startswith(("I: Retrieving", "I: Validating", "I: Extracting", "I: Unpacking", "I: Configuring")):
        if "Retrieving Release" in line or "Configuring" in line or "Extracting" in line:
            console.print(f"[dim]{line}[/]")
    elif line.startswith(("E:", "W:")):
        console.print(line)


def builder_image_tag(base_tag: str) -> str:
    parts = [base_tag.encode()]
    for path in sorted(BUILDER_DIR.iterdir()):
        if path.is_file():
            parts += [path.name.encode(), path.read_bytes()]
    return f"kernel-ci/builder:{_digest(*parts)[:16]}"


def ensure_builder_image() -> str:
    """The tag of the builder image, built with BuildKit through python-on-whales when missing."""
    tag = builder_image_tag(base_image_tag())
    if docker.image_exists(tag):
        return tag  # its tag digests the base's recipe too: the base image itself is not needed
    hostsetup.ensure_buildx()  # BuildKit, which python-on-whales drives
    base = ensure_base_image()
    console.print(f"building the builder image {tag} with BuildKit")
    try:
        docker.build_image(BUILDER_DIR, BUILDER_DIR / "Dockerfile", tag, {"BASE": base})
    except docker.DockerError as exc:
        raise ImageError(str(exc)) from exc
    return tag


def toolchain(tag: str) -> Toolchain:
    """The toolchain in an image: its id, package versions and fingerprint (recorded once per image id)."""
    image_id = docker.image_id(tag)
    record = cache_dir("toolchains") / f"{image_id.replace(':', '-')}.json"
    if record.exists():
        data = json.loads(record.read_text())
    else:
        listing = docker.run_capture(
            tag,
            ["sh", "-c", "cat /etc/kernel-ci/installed.txt; echo ---; gcc --version | head -1"],
            ["--network", "none"],
        )
        packages_text, _, gcc = listing.partition("---\n")
        packages = sorted(line for line in packages_text.splitlines() if line.strip())
        data = {
            "image_id": image_id,
            "packages": packages,
            "gcc_version": gcc.strip(),
            "fingerprint": _digest("\n".join(packages).encode())[:32],
        }
        record.write_text(json.dumps(data, indent=1))
    return Toolchain(
        image=tag,
        image_id=image_id,
        fingerprint=data["fingerprint"],
        gcc_version=data["gcc_version"],
        packages=tuple(data["packages"]),
    )
