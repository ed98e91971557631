"""The rootfs recipe: its cache key, the package list, the mirror lookup and how files land in the image."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
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


def test_mmdebstrap_command_is_unshare_mode_with_our_hooks(tmp_path: Path) -> None:
    recipe = rootfs.load_recipe(RECIPE, INIT)
    argv = rootfs.mmdebstrap_command(
        recipe, Path("/x/root.tar"), Path("/x/my overlay.tar"), Path("/x/status"), "http://apt.test/debian"
    )
    assert argv[:2] == ["mmdebstrap", "--mode=unshare"]
    assert "--variant=minbase" in argv
    assert f"--include={','.join(recipe.packages)}" in argv
    assert "--customize-hook=tar-in '/x/my overlay.tar' /" in argv  # mmdebstrap splits hooks like a shell
    assert "--customize-hook=download /var/lib/dpkg/status /x/status" in argv
    assert argv[-3:] == ["bookworm", "/x/root.tar", "http://apt.test/debian"]


def test_trim_hook_empties_the_trimmed_directories(tmp_path: Path) -> None:
    (tmp_path / "usr/share/doc/bash").mkdir(parents=True)
    (tmp_path / "usr/share/doc/bash/copyright").write_text("x")
    (tmp_path / "var/log").mkdir(parents=True)
    (tmp_path / "var/log/dpkg.log").write_text("x")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/keep").write_text("x")
    subprocess.run(["sh", "-c", rootfs.trim_hook(), "hook", str(tmp_path)], check=True)
    assert list((tmp_path / "usr/share/doc").iterdir()) == []
    assert list((tmp_path / "var/log").iterdir()) == []
    assert (tmp_path / "etc/keep").exists()
    assert (tmp_path / "var/lib/apt/lists/partial").is_dir()


def test_the_overlay_tar_is_root_owned_with_modes(tmp_path: Path) -> None:
    recipe = rootfs.load_recipe(RECIPE, INIT)
    with tarfile.open(rootfs.write_overlay_tar(recipe, tmp_path / "overlay.tar")) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    init = members["./sbin/kci-init"]
    assert init.isreg() and init.mode == 0o755 and init.size == INIT.stat().st_size
    assert members["./etc/fstab"].mode == 0o644
    assert members["./kci"].isdir() and members["./kci-results"].isdir()
    assert not any(m.isdir() for name, m in members.items() if name not in ("./kci", "./kci-results"))


def test_missing_tools_say_setup_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing installed there
    recipe = rootfs.load_recipe(RECIPE, INIT)
    if shutil.which("mmdebstrap", path="/usr/sbin:/sbin"):
        pytest.skip("mmdebstrap found in sbin")
    with pytest.raises(rootfs.RootfsError) as info:
        rootfs.check_can_build(recipe, "http://apt.test/debian")
    message = str(info.value)
    assert "mmdebstrap is not installed: run `sudo kernel-ci setup-host`" in message
    assert "mmdebstrap --mode=unshare" in message and "http://apt.test/debian" in message


def test_subordinate_ids_need_a_full_range_in_both_files(tmp_path: Path) -> None:
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("alice:100000:65536\nbob:165536:1000\n")
    subgid.write_text("alice:100000:65536\n")
    assert rootfs.has_subordinate_ids("alice", (subuid, subgid))
    assert not rootfs.has_subordinate_ids("bob", (subuid, subgid))  # too small, and no gid range
    assert not rootfs.has_subordinate_ids("carol", (subuid, subgid))
    assert not rootfs.has_subordinate_ids("alice", (subuid, tmp_path / "missing"))


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


def test_image_bytes_cover_the_tarball_plus_headroom(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * (3 * 2**20 + 1))
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        tar.add(tmp_path / "big", "./big")
    size = rootfs.image_bytes_of_tar(tmp_path / "t.tar")
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


def test_progress_shows_phases_and_warnings_only(capsys: pytest.CaptureFixture[str]) -> None:
    progress = rootfs.MmdebstrapProgress()
    for line in ["I: downloading packages with apt...", "Get:1 http://x libc6", "W: something odd"]:
        progress(line)
    err = capsys.readouterr().err
    assert "downloading packages with apt..." in err
    assert "W: something odd" in err
    assert "libc6" not in err
