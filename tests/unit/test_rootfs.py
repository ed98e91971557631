"""The rootfs recipe: its cache key, the package list, the mirror lookup and how files land in the image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kernel_ci.core.paths import CONTAINERS, GUEST_INIT
from kernel_ci.guest import rootfs

RECIPE = CONTAINERS / "rootfs"
INIT = GUEST_INIT


@pytest.fixture
def recipe_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the real recipe and init script, free to edit."""
    recipe = tmp_path / "recipe"
    shutil.copytree(RECIPE, recipe)
    init = tmp_path / "kci-init"
    shutil.copy2(INIT, init)
    return recipe, init


def key_of(recipe: Path, init: Path) -> str:
    return rootfs.load_recipe(recipe, init).key()


def test_real_recipe_loads() -> None:
    recipe = rootfs.load_recipe(RECIPE, INIT)
    assert {"python3", "python3-pytest", "kmod", "mount"} <= set(recipe.packages)
    assert recipe.files[rootfs.INIT_PATH] == (INIT, 0o755)
    assert {"etc/fstab", "etc/hostname"} <= set(recipe.files)
    assert len(recipe.key()) == 64


def test_key_is_stable_and_independent_of_location(recipe_copy: tuple[Path, Path]) -> None:
    assert key_of(*recipe_copy) == key_of(RECIPE, INIT) == key_of(RECIPE, INIT)


def test_key_ignores_order_comments_and_duplicates(recipe_copy: tuple[Path, Path]) -> None:
    recipe, init = recipe_copy
    before = key_of(recipe, init)
    names = rootfs.parse_packages((recipe / "packages.txt").read_text())
    shuffled = "# reordered\n" + "\n".join(reversed(names)) + f"\n\n{names[0]}  # again\n"
    (recipe / "packages.txt").write_text(shuffled)
    assert key_of(recipe, init) == before


def test_key_changes_with_packages(recipe_copy: tuple[Path, Path]) -> None:
    recipe, init = recipe_copy
    before = key_of(recipe, init)
    with (recipe / "packages.txt").open("a") as handle:
        handle.write("strace\n")
    assert key_of(recipe, init) != before


def test_key_changes_with_init_script(recipe_copy: tuple[Path, Path]) -> None:
    recipe, init = recipe_copy
    before = key_of(recipe, init)
    init.write_text(init.read_text() + "# changed\n")
    assert key_of(recipe, init) != before


def test_key_changes_with_overlay_content_mode_and_new_files(recipe_copy: tuple[Path, Path]) -> None:
    recipe, init = recipe_copy
    keys = {key_of(recipe, init)}
    hostname = recipe / "overlay" / "etc" / "hostname"
    hostname.write_text("other\n")
    keys.add(key_of(recipe, init))
    hostname.chmod(0o755)
    keys.add(key_of(recipe, init))
    (recipe / "overlay" / "etc" / "motd").write_text("hello\n")
    keys.add(key_of(recipe, init))
    assert len(keys) == 4


def test_key_changes_with_schema(recipe_copy: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    before = key_of(*recipe_copy)
    monkeypatch.setattr(rootfs, "SCHEMA", rootfs.SCHEMA + 1)
    assert key_of(*recipe_copy) != before


@pytest.mark.parametrize("bad", ["", "# only a comment\n", "python3 kmod\n", "python3,kmod\n"])
def test_bad_package_lists_are_rejected(bad: str) -> None:
    with pytest.raises(rootfs.RootfsError):
        rootfs.parse_packages(bad)


def test_missing_recipe_parts_are_reported(tmp_path: Path) -> None:
    with pytest.raises(rootfs.RootfsError, match=r"packages\.txt"):
        rootfs.load_recipe(tmp_path, INIT)
    (tmp_path / "packages.txt").write_text("python3\n")
    with pytest.raises(rootfs.RootfsError, match="init script"):
        rootfs.load_recipe(tmp_path, tmp_path / "nope")


def test_the_host_mirror_is_found() -> None:
    assert rootfs.debian_mirror().startswith(("http://", "https://", "file:/"))


def test_debootstrap_command() -> None:
    recipe = rootfs.load_recipe(RECIPE, INIT)
    argv = rootfs.debootstrap_command(recipe, Path("/x/root"), "http://apt.test/debian")
    assert argv[0] == "debootstrap"
    assert "--variant=minbase" in argv
    assert f"--include={','.join(recipe.packages)}" in argv
    assert argv[-3:] == ["bookworm", "/x/root", "http://apt.test/debian"]


def test_missing_tools_give_the_exact_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing installed there
    recipe = rootfs.load_recipe(RECIPE, INIT)
    with pytest.raises(rootfs.RootfsError) as info:
        rootfs.check_can_build(recipe, "http://apt.test/debian")
    message = str(info.value)
    assert "debootstrap --variant=minbase" in message
    assert "http://apt.test/debian" in message
    if os.geteuid() == 0:
        assert "apt-get install -y debootstrap" in message


def test_install_files_follows_merged_usr_and_sets_modes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr" / "sbin").mkdir(parents=True)
    (root / "sbin").symlink_to("usr/sbin")
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("debootstrap-host\n")
    recipe = rootfs.load_recipe(RECIPE, INIT)
    rootfs.install_files(recipe, root)
    init = root / "usr" / "sbin" / "kci-init"
    assert init.read_bytes() == INIT.read_bytes()
    assert init.stat().st_mode & 0o777 == 0o755
    assert (root / "sbin").is_symlink()
    assert (root / "etc" / "hostname").read_text() == "kci-guest\n"
    assert (root / "etc" / "fstab").stat().st_mode & 0o777 == 0o644
    assert (root / "kci").is_dir() and (root / "kci-results").is_dir()


def test_path_in_root_resolves_absolute_links_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "usr" / "sbin").mkdir(parents=True)
    (tmp_path / "sbin").symlink_to("/usr/sbin")
    assert rootfs.path_in_root(tmp_path, "sbin/kci-init") == tmp_path / "usr" / "sbin" / "kci-init"
    (tmp_path / "up").symlink_to("../..")
    with pytest.raises(rootfs.RootfsError):
        rootfs.path_in_root(tmp_path, "up/etc/passwd")


def test_image_bytes_covers_the_tree_plus_headroom(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * (3 * 2**20 + 1))
    size = rootfs.image_bytes(tmp_path)
    assert size % 2**20 == 0
    assert size >= 3 * 2**20 + rootfs.HEADROOM_MIB * 2**20


def test_cached_image_is_returned_without_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNEL_CI_CACHE", str(tmp_path / "cache"))
    key = rootfs.load_recipe(RECIPE, INIT).key()
    image = rootfs.image_path(key)
    assert image.parent == tmp_path / "cache" / "rootfs"
    assert image.name == f"bookworm-{key[:16]}.qcow2"
    image.write_bytes(b"qcow2 stand-in")
    image.with_suffix(".json").write_text(json.dumps({"key": key, "packages": {"python3": "3.11.2-1+b1"}}))
    got = rootfs.ensure_rootfs(RECIPE, INIT)
    assert got == rootfs.RootfsImage(image, key, {"python3": "3.11.2-1+b1"})


def test_kci_init_is_posix_sh() -> None:
    if shutil.which("dash") is None:
        pytest.skip("dash is not installed")
    assert INIT.stat().st_mode & 0o111
    assert INIT.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["dash", "-n", str(INIT)], check=True)


def test_progress_folds_per_package_lines(capsys: pytest.CaptureFixture[str]) -> None:
    progress = rootfs.DebootstrapProgress()
    lines = ["I: Retrieving libc6 2.36-9", "I: Validating libc6 2.36-9"] * 50
    lines += ["I: Installing core packages...", "junk", "W: something odd", "I: Extracting libc6..."]
    lines += ["I: Unpacking the base system...", "I: Configuring apt...", "I: Configuring dpkg..."]
    lines += ["I: Base system installed successfully."]
    for line in lines:
        progress(line)
    err = capsys.readouterr().err
    assert "retrieving 50, validating 50" in err
    assert "(extracting 1)" in err
    assert "(configuring 2)" in err
    assert "Installing core packages..." in err
    assert "Unpacking the base system..." in err
    assert "libc6" not in err and "apt" not in err
    assert "W: something odd" in err
