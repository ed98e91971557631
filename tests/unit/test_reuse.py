"""Reuse of kselftests installs and external modules' .ko files across builds, keyed on content: what is
reused when nothing it depends on changed, and (the part that matters) what is NOT reused when anything
did. The container runs are replaced by fakes that write what the real ones would and count the runs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kernel_ci.build import extmodules, kselftest
from kernel_ci.build import kbuild as builder
from kernel_ci.core import proc
from kernel_ci.core.digest import tree_digest
from kernel_ci.core.files import is_kept

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


# --- kselftests ------------------------------------------------------------------------------------------


def _tree(tmp_path: Path) -> builder.BuildEnv:
    src, out = tmp_path / "src", tmp_path / "out"
    for name, text in {
        "tools/testing/selftests/ptrace/Makefile": "all:\n",
        "tools/testing/selftests/ptrace/vmaccess.c": "int main(void) { return 0; }\n",
        "tools/include/linux/types.h": "/* */\n",
        "include/uapi/linux/ptrace.h": "#define PTRACE_X 1\n",
        "arch/x86/entry/syscalls/syscall_64.tbl": "0 common read sys_read\n",
        "scripts/headers_install.sh": "#!/bin/sh\n",
        "kernel/ptrace.c": "int x;\n",
        "Makefile": "VERSION = 5\n",
    }.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    out.mkdir()
    (out / ".config").write_text("CONFIG_X=y\n")
    return builder.BuildEnv("img:1", src, out, tmp_path / "cc", 2, "t")


@pytest.fixture
def selftests_make(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The selftests container, faked: installs the runner and one (non-ELF) test per target."""
    runs: list[list[str]] = []

    def run_container(env: builder.BuildEnv, command: list[str], **_: object) -> None:
        runs.append(command)
        install = env.out / kselftest.INSTALL_DIR
        targets = next(a for a in command if a.startswith("TARGETS=")).split("=", 1)[1].split()
        for target in targets:
            (install / target).mkdir(parents=True)
            (install / target / "test").write_text(f"#!/bin/sh\n# run {len(runs)}\n")
        (install / "kselftest").mkdir()
        (install / "run_kselftest.sh").write_text("#!/bin/sh\n")
        (install / "kselftest-list.txt").write_text("")

    monkeypatch.setattr(builder, "run_container", run_container)
    return runs


def test_an_unchanged_selftests_build_is_reused_and_checked(tmp_path: Path, selftests_make) -> None:
    env, reuse = _tree(tmp_path), tmp_path / "reuse"
    first = kselftest.build_selftests(env, ["ptrace"], tmp_path / "d1", reuse=reuse)
    (env.src / "kernel/ptrace.c").write_text("int y;\n")  # the kernel's own code: not a selftests input
    second = kselftest.build_selftests(env, ["ptrace"], tmp_path / "d2", reuse=reuse)
    assert len(selftests_make) == 1
    assert [p.relative_to(tmp_path / "d1") for p in first["ptrace"]] == [
        p.relative_to(tmp_path / "d2") for p in second["ptrace"]
    ]
    assert (tmp_path / "d2/ptrace/test").read_text() == "#!/bin/sh\n# run 1\n"
    assert (tmp_path / "d2/run_kselftest.sh").is_file()
    kselftest.build_selftests(env, ["ptrace"], tmp_path / "d3")  # without reuse: always made
    assert len(selftests_make) == 2


@pytest.mark.parametrize(
    "change",
    [
        "tools/testing/selftests/ptrace/vmaccess.c",
        "tools/include/linux/types.h",
        "include/uapi/linux/ptrace.h",
        "arch/x86/entry/syscalls/syscall_64.tbl",
        "scripts/headers_install.sh",
        "Makefile",
        "tools/testing/selftests/ptrace/new.h",  # a new file
        ".config",
        "image",
        "targets",
        "ccache",
    ],
)
def test_a_changed_selftests_input_is_not_reused(tmp_path: Path, selftests_make, change: str) -> None:
    env, reuse = _tree(tmp_path), tmp_path / "reuse"
    targets = ["ptrace"]
    kselftest.build_selftests(env, targets, tmp_path / "d1", reuse=reuse)
    if change == ".config":
        (env.out / ".config").write_text("CONFIG_X=n\n")
    elif change == "image":
        env = builder.BuildEnv("img:2", env.src, env.out, env.ccache_dir, env.jobs, env.timestamp)
    elif change == "targets":
        (env.src / "tools/testing/selftests/timers").mkdir()
        (env.src / "tools/testing/selftests/timers/Makefile").write_text("all:\n")
        targets = ["ptrace", "timers"]
    elif change == "ccache":
        env = builder.BuildEnv(env.image, env.src, env.out, env.ccache_dir, env.jobs, env.timestamp, False)
    else:
        with (env.src / change).open("a") as handle:
            handle.write("/* one more line */\n")
    built = kselftest.build_selftests(env, targets, tmp_path / "d2", reuse=reuse)
    assert len(selftests_make) == 2
    assert (tmp_path / "d2/ptrace/test").read_text() == "#!/bin/sh\n# run 2\n"
    assert set(built) == set(targets)


def test_a_reused_install_is_checked_like_a_fresh_one(tmp_path: Path, selftests_make) -> None:
    env, reuse = _tree(tmp_path), tmp_path / "reuse"
    kselftest.build_selftests(env, ["ptrace"], tmp_path / "d1", reuse=reuse)
    (kept,) = (p for p in reuse.iterdir() if is_kept(p))
    (kept / "install/run_kselftest.sh").unlink()
    with pytest.raises(kselftest.KselftestError, match=r"run_kselftest\.sh"):
        kselftest.build_selftests(env, ["ptrace"], tmp_path / "d2", reuse=reuse)


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


# --- configure -------------------------------------------------------------------------------------------


def _kernel_tree(tmp_path: Path) -> builder.BuildEnv:
    src = tmp_path / "src"
    for name, text in {
        "Kconfig": 'source "arch/x86/Kconfig"\n',
        "arch/x86/Kconfig": "config X86\n\tdef_bool y\n",
        "init/Kconfig.debug": "config DEBUG\n\tbool\n",
        "scripts/Kconfig.include": "cc-option = $(success,true)\n",
        "scripts/gcc-version.sh": "echo 120200\n",
        "Makefile": "VERSION = 5\n",
        "kernel/ptrace.c": "int x;\n",
    }.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    return builder.BuildEnv("img:1", src, tmp_path / "out", tmp_path / "cc", 2, "t")


@pytest.fixture
def config_make(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """The configure container, faked: the final .config is the fragment plus a run counter."""
    runs: list[tuple[str, ...]] = []

    def run_make(env: builder.BuildEnv, *targets: str, **_: object) -> tuple[float, int]:
        runs.append(targets)
        fragment = (env.out / "kci-fragment.config").read_text()
        (env.out / ".config").write_text(f"{fragment}# {env.image}\n")
        return 0.0, 0

    monkeypatch.setattr(builder, "run_make", run_make)
    return runs


def test_an_unchanged_configure_is_reused(tmp_path: Path, config_make) -> None:
    env, reuse = _kernel_tree(tmp_path), tmp_path / "reuse"
    first = builder.configure(env, "CONFIG_X=y\n", reuse=reuse)
    (env.src / "kernel/ptrace.c").write_text("int y;\n")  # not a kconfig input
    assert builder.configure(env, "CONFIG_X=y\n", reuse=reuse) == first == "CONFIG_X=y\n# img:1\n"
    assert len(config_make) == 1
    builder.configure(env, "CONFIG_X=y\n")  # without reuse: always made
    assert len(config_make) == 2


def test_an_empty_object_tree_gets_the_kept_config_without_a_make(tmp_path: Path, config_make) -> None:
    """A fresh object tree (--fresh, a new --tree, a cold build): the kept final .config is written there
    and kbuild's syncconfig does the rest in the build; no configure container."""
    env, reuse = _kernel_tree(tmp_path), tmp_path / "reuse"
    first = builder.configure(env, "CONFIG_X=y\n", reuse=reuse)
    shutil.rmtree(env.out)
    assert builder.configure(env, "CONFIG_X=y\n", reuse=reuse) == first
    assert (env.out / ".config").read_text() == first and len(config_make) == 1
    assert [p.name for p in env.out.iterdir()] == [".config"]  # no temporary left


@pytest.mark.parametrize(
    "change",
    [
        "arch/x86/Kconfig",
        "init/Kconfig.debug",
        "drivers/new/Kconfig",
        "scripts/Kconfig.include",
        "scripts/gcc-version.sh",
        "Makefile",
        "fragment",
        "image",
        "ccache",
        "object tree .config",
    ],
)
def test_a_changed_configure_input_is_not_reused(tmp_path: Path, config_make, change: str) -> None:
    env, reuse, fragment = _kernel_tree(tmp_path), tmp_path / "reuse", "CONFIG_X=y\n"
    builder.configure(env, fragment, reuse=reuse)
    if change == "fragment":
        fragment = "CONFIG_X=n\n"
    elif change == "image":
        env = builder.BuildEnv("img:2", env.src, env.out, env.ccache_dir, env.jobs, env.timestamp)
    elif change == "ccache":
        env = builder.BuildEnv(env.image, env.src, env.out, env.ccache_dir, env.jobs, env.timestamp, False)
    elif change == "object tree .config":
        (env.out / ".config").write_text("CONFIG_X=y\n# edited\n")
    else:
        (env.src / change).parent.mkdir(parents=True, exist_ok=True)
        with (env.src / change).open("a") as handle:
            handle.write("# one more line\n")
    final = builder.configure(env, fragment, reuse=reuse)
    assert len(config_make) == 2
    assert final == (env.out / ".config").read_text() == f"{fragment}# {env.image}\n"
