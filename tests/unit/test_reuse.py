"""Reuse of kselftests installs and external modules' .ko files across builds, keyed on content: what is
reused when nothing it depends on changed, and (the part that matters) what is NOT reused when anything
did. The container runs are replaced by fakes that write what the real ones would and count the runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kernel_ci.build import extmodules
from kernel_ci.build import kbuild as builder
from kernel_ci.core import proc
from kernel_ci.core.digest import tree_digest

# --- tree_digest -----------------------------------------------------------------------------------------


def test_the_tree_digest_changes_with_any_content_mode_link_or_entry(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("one")
    (root / "top").write_text("x")
    os.symlink("b/f", root / "a" / "link")
    seen = {tree_digest(root)}
    assert tree_digest(root) in seen  # stable

    def changed() -> None:
        digest = tree_digest(root)
        assert digest not in seen
        seen.add(digest)

    (root / "a" / "b" / "f").write_text("two")
    changed()
    os.chmod(root / "top", 0o755)
    changed()
    os.unlink(root / "a" / "link")
    os.symlink("b/g", root / "a" / "link")
    changed()
    (root / "a" / "b" / "new").write_text("")
    changed()
    (root / "a" / "b" / "new").rename(root / "a" / "b" / "renamed")
    changed()
    (root / "a" / "empty").mkdir()
    changed()
    parts = ("a/b", "top", "absent")
    before = tree_digest(root, parts)
    assert before != tree_digest(root, ("a/b", "top"))
    (root / "absent").write_text("")
    assert tree_digest(root, parts) != before


# --- external modules ------------------------------------------------------------------------------------


def _modules(tmp_path: Path) -> tuple[Path, list[extmodules.ModuleSource]]:
    kbuild = tmp_path / "kbuild"
    (kbuild / "include/generated").mkdir(parents=True)
    (kbuild / "Module.symvers").write_text("0x1\tprintk\tvmlinux\tEXPORT_SYMBOL\t\n")
    (kbuild / "include/generated/utsrelease.h").write_text('#define UTS_RELEASE "5.10.223-kci"\n')
    modules = []
    for name in ("alpha", "beta"):
        folder = tmp_path / "modules" / name
        folder.mkdir(parents=True)
        (folder / "Kbuild").write_text(f"obj-m := {name}.o\n")
        (folder / f"{name}.c").write_text("/* a module */\n")
        modules.append(extmodules.ModuleSource(name, folder))
    return kbuild, modules


@pytest.fixture
def modules_make(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The modules' container, faked: one .ko per module named on its command line."""
    runs: list[list[str]] = []

    def run_in_toolchain(
        image: str, command: list[str], mounts: dict[Path, str], *_: object, **__: object
    ) -> None:
        runs.append(command)
        (root,) = (host for host, guest in mounts.items() if guest == "/mods")
        for name in command[command.index("kci-extmod") + 1 :]:
            (root / name / f"{name}.ko").write_text(f"{image} run {len(runs)}")

    monkeypatch.setattr(builder, "run_in_toolchain", run_in_toolchain)
    return runs


def test_all_modules_build_in_one_container_and_are_reused_unchanged(tmp_path: Path, modules_make) -> None:
    kbuild, modules = _modules(tmp_path)
    reuse = tmp_path / "reuse"
    built = extmodules.build_all("img:1", kbuild, modules, tmp_path / "d1", reuse=reuse)
    assert len(modules_make) == 1 and modules_make[0][-2:] == ["alpha", "beta"]
    assert {name: [p.name for p in kos] for name, kos in built.items()} == {
        "alpha": ["alpha.ko"],
        "beta": ["beta.ko"],
    }
    again = extmodules.build_all("img:1", kbuild, modules, tmp_path / "d2", reuse=reuse)
    assert len(modules_make) == 1
    assert (tmp_path / "d2/beta/beta.ko").read_text() == "img:1 run 1"
    assert [p.name for p in again["alpha"]] == ["alpha.ko"]


@pytest.mark.parametrize("change", ["kbuild file", "new kbuild file", "module source", "image", "extra_make"])
def test_a_changed_module_input_is_not_reused(tmp_path: Path, modules_make, change: str) -> None:
    kbuild, modules = _modules(tmp_path)
    reuse, image, extra = tmp_path / "reuse", "img:1", ()
    extmodules.build_all(image, kbuild, modules, tmp_path / "d1", reuse=reuse)
    if change == "kbuild file":
        (kbuild / "Module.symvers").write_text("0x2\tprintk\tvmlinux\tEXPORT_SYMBOL\t\n")
    elif change == "new kbuild file":
        (kbuild / "include/generated/autoconf.h").write_text("")
    elif change == "module source":
        (modules[1].path / "beta.c").write_text("/* another module */\n")
    elif change == "image":
        image = "img:2"
    else:
        extra = ("W=1",)
    extmodules.build_all(image, kbuild, modules, tmp_path / "d2", reuse=reuse, extra_make=extra)
    assert len(modules_make) == 2
    assert (tmp_path / "d2/alpha/alpha.ko").read_text() == f"{image} run 2"


def test_a_failing_module_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kbuild, modules = _modules(tmp_path)

    def run_in_toolchain(*_: object, **__: object) -> None:
        output = f"beta.c:1: error: expected ';'\n{extmodules.FAILED_MARK}beta\n"
        raise proc.CommandError(["docker", "run"], 2, output)

    monkeypatch.setattr(builder, "run_in_toolchain", run_in_toolchain)
    with pytest.raises(extmodules.ModuleBuildError, match=r"module beta does not build(.|\n)*beta\.c"):
        extmodules.build_all("img", kbuild, modules, tmp_path / "d", reuse=tmp_path / "reuse")
    assert not (tmp_path / "reuse").exists() or not any((tmp_path / "reuse").iterdir())


def test_the_module_script_stops_at_the_first_failing_module_and_names_it(tmp_path: Path) -> None:
    """The real script with a fake make: alpha builds, beta fails, gamma is never tried."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "make"
    fake.write_text('#!/bin/sh\necho "make $*"\ncase "$*" in *M=/mods/beta*) exit 2;; esac\n')
    fake.chmod(0o755)
    script = extmodules.build_script(["W=1"])
    done = subprocess.run(
        ["sh", "-c", script, "kci-extmod", "alpha", "beta", "gamma"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "make -C /kbuild M=/mods/alpha W=1 modules",
        "make -C /kbuild M=/mods/beta W=1 modules",
        f"{extmodules.FAILED_MARK}beta",
    ]
