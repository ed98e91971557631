"""modules_install is skipped only when nothing it reads has changed (build.kbuild.modules_install_step).

The step runs exactly as in a kernel build: in the real builder image, through builder.run_steps, with the
build's own make command line. The scratch "source tree" is a Makefile whose modules_install copies the
modules modules.order names, as kbuild's does, and counts its runs; each test changes one input and wants a
new install (each fails if the stamp stops covering that input).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from kernel_ci.build import images
from kernel_ci.build import kbuild as builder

pytestmark = pytest.mark.slow

MAKEFILE = textwrap.dedent(
    """\
    modules_install:
    \t@mkdir -p $(INSTALL_MOD_PATH)/lib/modules/test
    \t@for m in $$(cat $(O)/modules.order); do cp $(O)/$$m $(INSTALL_MOD_PATH)/lib/modules/test/; done
    \t@echo run >> $(O)/installs
    """
)


@pytest.fixture(scope="module")
def image() -> str:
    return images.ensure_builder_image()


@pytest.fixture
def env(tmp_path: Path, image: str) -> builder.BuildEnv:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "Makefile").write_text(MAKEFILE)
    (out / "drivers").mkdir(parents=True)
    (out / "include/config").mkdir(parents=True)
    (out / ".config").write_text("CONFIG_MODULES=y\n")
    (out / "modules.order").write_text("drivers/a.ko\ndrivers/b.ko\n")
    (out / "modules.builtin").write_text("")
    (out / "modules.builtin.modinfo").write_text("")
    (out / "include/config/kernel.release").write_text("5.10.223-kci\n")
    (out / "drivers/a.ko").write_bytes(b"module a")
    (out / "drivers/b.ko").write_bytes(b"module b")
    return builder.BuildEnv(
        image=image,
        src=src,
        out=out,
        ccache_dir=tmp_path / "ccache",
        jobs=1,
        timestamp="Thu Jan  1 00:00:00 UTC 2024",
        use_ccache=False,
    )


def _install(env: builder.BuildEnv) -> int:
    """Run the step; how many installs have run so far."""
    builder.give_to_build_user(env.out)
    builder.run_steps(env, [builder.modules_install_step(env)], title="modules_install")
    return len((env.out / "installs").read_text().splitlines())


def _installed(env: builder.BuildEnv, name: str) -> bytes:
    return (env.out / builder.MODULES_STAGING / "lib/modules/test" / name).read_bytes()


def test_unchanged_inputs_skip_the_install_and_keep_its_tree(env: builder.BuildEnv) -> None:
    assert _install(env) == 1
    assert _install(env) == 1
    assert _installed(env, "a.ko") == b"module a"


def test_a_relinked_module_of_the_same_size_is_installed_again(env: builder.BuildEnv) -> None:
    assert _install(env) == 1
    module = env.out / "drivers/a.ko"
    before = module.stat()
    module.write_bytes(b"module A")  # same size; the mtime put back: only the ctime (and bytes) tell
    os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert _install(env) == 2
    assert _installed(env, "a.ko") == b"module A"


@pytest.mark.parametrize("name", [".config", "modules.builtin.modinfo", "include/config/kernel.release"])
def test_a_changed_input_file_installs_again(env: builder.BuildEnv, name: str) -> None:
    assert _install(env) == 1
    with (env.out / name).open("a") as changed:
        changed.write("changed\n")
    assert _install(env) == 2


def test_a_module_added_to_the_order_is_installed(env: builder.BuildEnv) -> None:
    assert _install(env) == 1
    (env.out / "drivers/c.ko").write_bytes(b"module c")
    with (env.out / "modules.order").open("a") as order:
        order.write("drivers/c.ko\n")
    assert _install(env) == 2
    assert _installed(env, "c.ko") == b"module c"


def test_a_removed_install_tree_or_stamp_installs_again(env: builder.BuildEnv) -> None:
    assert _install(env) == 1
    (env.out / builder.MODULES_INSTALL_STAMP).unlink()  # as an interrupted install or build leaves it
    assert _install(env) == 2
    for item in sorted((env.out / builder.MODULES_STAGING).rglob("*"), reverse=True):
        item.unlink() if not item.is_dir() else item.rmdir()
    (env.out / builder.MODULES_STAGING).rmdir()
    assert _install(env) == 3


def test_a_failed_install_leaves_no_stamp(env: builder.BuildEnv) -> None:
    (env.out / "modules.order").write_text("drivers/missing.ko\n")
    with pytest.raises(builder.CompileError):
        _install(env)
    assert not (env.out / builder.MODULES_INSTALL_STAMP).exists()
