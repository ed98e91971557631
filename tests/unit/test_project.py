"""The project directory (core/paths.py) and the CLI's conventions: --project, -o after the subcommand,
defaults in every option's help."""

from __future__ import annotations

import argparse
import functools
import shutil
from pathlib import Path

import pytest

from kernel_ci.cli import main as cli
from kernel_ci.cli import options
from kernel_ci.core import paths
from kernel_ci.core.errors import UsageError


def _project(root: Path) -> Path:
    for name in paths.PROJECT_MARKERS:
        (root / name).mkdir(parents=True)
    return root


def test_found_from_a_subdirectory(tmp_path: Path) -> None:
    root = _project(tmp_path / "proj")
    deep = root / "guest-tests" / "x" / "y"
    deep.mkdir(parents=True)
    found = paths.find_project(cwd=deep, environ={})
    assert found is not None and found.root == root.resolve()
    assert found.output == root.resolve() / "out"


def test_one_marker_alone_is_not_a_project(tmp_path: Path) -> None:
    (tmp_path / "guest-tests").mkdir()
    assert paths.find_project(cwd=tmp_path, environ={}) is None


def test_none_found_is_the_current_directory_as_a_bare_project(tmp_path: Path) -> None:
    bare = paths.require_project(cwd=tmp_path, environ={})
    assert bare.root == tmp_path.resolve() and bare.output == tmp_path.resolve() / "out"
    assert bare.suite_path == (tmp_path.resolve() / "guest-tests", paths.DEFAULT_SUITES)
    assert bare.sources_lock == paths.DEFAULT_SOURCES_LOCK and bare.base_config == paths.DEFAULT_BASE_CONFIG


def test_explicit_wins_over_the_environment_and_the_current_directory(tmp_path: Path) -> None:
    given = _project(tmp_path / "given")
    env = _project(tmp_path / "env")
    here = _project(tmp_path / "here")
    environ = {paths.PROJECT_ENV: str(env)}
    assert paths.require_project(given, cwd=here, environ=environ).root == given.resolve()
    assert paths.require_project(cwd=here, environ=environ).root == env.resolve()
    assert paths.require_project(cwd=here, environ={}).root == here.resolve()


def test_an_explicit_directory_may_be_bare_but_must_exist(tmp_path: Path) -> None:
    assert paths.find_project(tmp_path, environ={}) == paths.Project(tmp_path.resolve())
    with pytest.raises(UsageError, match=r"--project .*no such directory"):
        paths.find_project(tmp_path / "missing", environ={})
    with pytest.raises(UsageError, match=paths.PROJECT_ENV):
        paths.find_project(environ={paths.PROJECT_ENV: str(tmp_path / "missing")})


def test_a_project_suite_overrides_the_default_of_its_name(tmp_path: Path) -> None:
    from kernel_ci.guest.suites import load_suites

    project = paths.Project(tmp_path)
    defaults = {s.name: s for s in load_suites(project.suite_path)}  # no guest-tests/: the defaults
    assert set(defaults) == {"smoke-c", "smoke-py"}
    assert defaults["smoke-c"].path == paths.DEFAULT_SUITES / "smoke-c"
    assert defaults["smoke-c"].lib == paths.KTAP_LIB
    own = project.guest_tests / "smoke-py"
    own.mkdir(parents=True)
    (own / "manifest.toml").write_text(
        'name = "smoke-py"\nlanguage = "python"\ntimeout = 5\nsources = ["test_mine.py"]\n'
    )
    (own / "test_mine.py").write_text("def test_mine():\n    pass\n")
    found = {s.name: s for s in load_suites(project.suite_path)}
    assert [*found] == ["smoke-c", "smoke-py"]
    assert found["smoke-py"].path == own and found["smoke-py"].sources == ("test_mine.py",)
    assert found["smoke-c"].path == paths.DEFAULT_SUITES / "smoke-c"  # the other default stays
    lib = project.guest_tests / "lib"
    shutil.copytree(paths.KTAP_LIB, lib)
    (project.guest_tests / "c1").mkdir()
    (project.guest_tests / "c1" / "manifest.toml").write_text(
        'name = "c1"\nlanguage = "c"\ntimeout = 5\nsources = ["c1.c"]\n'
    )
    (project.guest_tests / "c1" / "c1.c").write_text("int main(void) { return 0; }\n")
    found = {s.name: s for s in load_suites(project.suite_path)}
    assert found["c1"].lib == lib  # a project's own lib/ next to its suites wins
    assert found["smoke-c"].lib == paths.KTAP_LIB  # the packaged suite keeps the packaged lib


def test_a_bare_project_has_the_packaged_base_config(tmp_path: Path) -> None:
    from kernel_ci.build.plan import make_plan

    bare = paths.Project(tmp_path)
    planned = make_plan(
        suites_dir=bare.suite_path, patches_root=bare.kernel_patches, modules_root=bare.module_path,
        kconfig_dir=bare.kconfig,
    )  # fmt: skip
    assert planned.plan.series == ()
    # the default suites' module ships in the package: every build carries it
    assert [(m.name, m.path) for m in planned.modules] == [("kci-smoke", paths.DEFAULT_MODULES / "kci-smoke")]
    assert {name.split("/")[0] for name, _ in planned.plan.modules} == {"kci-smoke"}
    assert [f.name for f in planned.fragments][:1] == ["kconfig/base.config"]
    (tmp_path / "kconfig").mkdir()
    (tmp_path / "kconfig" / "base.config").write_text("CONFIG_PRINTK=y\n")
    assert bare.base_config == tmp_path / "kconfig" / "base.config"


def test_a_project_module_overrides_the_default_of_its_name(tmp_path: Path) -> None:
    from kernel_ci.build import extmodules
    from kernel_ci.build.plan import make_plan

    project = paths.Project(tmp_path)
    own = project.kernel_modules / "kci-smoke"
    shutil.copytree(paths.DEFAULT_MODULES / "kci-smoke", own)
    (own / "kci_smoke.c").write_text((own / "kci_smoke.c").read_text().replace('"smoke"', '"mine"'))
    (project.kernel_modules / "extra").mkdir()
    (project.kernel_modules / "extra" / "Kbuild").write_text("obj-m := extra.o\n")
    (project.kernel_modules / "notes").mkdir()  # no Kbuild: not a module
    found = extmodules.discover(project.module_path)
    assert [(m.name, m.path) for m in found] == [
        ("extra", project.kernel_modules / "extra"),
        ("kci-smoke", own),
    ]
    assert extmodules.discover(project.module_path, ["kci-smoke"])[0].path == own
    with pytest.raises(
        extmodules.ModuleBuildError, match=r"unknown module folder\(s\) nope .*kernel-modules"
    ):
        extmodules.discover(project.module_path, ["nope"])
    default = make_plan(suites_dir=None, modules_root=paths.Project(tmp_path / "bare").module_path)
    mine = make_plan(suites_dir=None, modules_root=project.module_path)
    assert default.plan.recipe_key() != mine.plan.recipe_key()  # the module's source is in the key


def test_the_checkout_builds_its_own_modules_and_the_packaged_default() -> None:
    """kci-smoke moved from this checkout's kernel-modules/ into the package: the checkout's plan names the
    same modules with the same files (its recipe and build keys did not change with the move)."""
    from kernel_ci.build import extmodules

    found = extmodules.discover(paths.Project(paths.CHECKOUT).module_path)
    assert [m.name for m in found] == ["kci-panic", "kci-smoke", "tracer", "tracer-workload"]
    assert next(m for m in found if m.name == "kci-smoke").path == paths.DEFAULT_MODULES / "kci-smoke"
    assert not (paths.KERNEL_MODULES / "kci-smoke").exists()


def test_a_project_lock_overrides_the_packaged_one(tmp_path: Path) -> None:
    project = paths.Project(_project(tmp_path))
    assert project.sources_lock == paths.DEFAULT_SOURCES_LOCK
    shutil.copy(paths.DEFAULT_SOURCES_LOCK, tmp_path / paths.LOCK_NAME)
    assert project.sources_lock == tmp_path / paths.LOCK_NAME


def test_the_tool_data_is_in_the_package() -> None:
    for path in (paths.GUEST_INIT, paths.GUEST_RUNNER, paths.PROTOCOL_DOC, paths.DEFAULT_SOURCES_LOCK):
        assert path.is_file() and path.is_relative_to(paths.PACKAGE_DATA)
    assert (paths.CONTAINERS / "builder" / "Dockerfile").is_file()


def test_the_build_request_uses_the_given_project(tmp_path: Path) -> None:
    root = _project(tmp_path / "p")
    args = cli.parser().parse_args(["--project", str(root), "build"])
    request = options.build_request(args)
    assert request.project.root == root.resolve()
    assert request.suites_dir == (root.resolve() / "guest-tests", paths.DEFAULT_SUITES)
    assert request.output == root.resolve() / "out" / "build"


def test_output_after_the_subcommand(tmp_path: Path) -> None:
    after = cli.parser().parse_args(["test", "-o", str(tmp_path / "a")])
    before = cli.parser().parse_args(["-o", str(tmp_path / "b"), "test"])
    assert options.output(after) == tmp_path / "a"
    assert options.output(before) == tmp_path / "b"  # not overwritten by the subcommand's own -o
    assert options.build_request(after).output == tmp_path / "a" / "build"


def test_project_after_the_subcommand(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    after = cli.parser().parse_args(["test", "--project", str(tmp_path / "a")])
    before = cli.parser().parse_args(["--project", str(tmp_path / "b"), "test"])
    assert options.project(after).root == (tmp_path / "a").resolve()
    assert options.project(before).root == (tmp_path / "b").resolve()  # not overwritten by the subcommand's


def test_output_defaults_to_the_project_out_else_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(paths.PROJECT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert options.output(cli.parser().parse_args(["repro", "run"])) == Path("out")
    root = _project(tmp_path / "p")
    monkeypatch.chdir(root / "guest-tests")
    assert options.output(cli.parser().parse_args(["build"])) == root.resolve() / "out"


def _options_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]


def test_every_option_with_a_default_shows_it_in_its_help() -> None:
    top = cli.parser()
    missing = []
    for parser in cli._every_parser(top):
        text = parser.format_help()
        for action in _options_of(parser):
            if action.default in cli._NO_DEFAULT:
                continue
            line = next(i for i, item in enumerate(parser._actions) if item is action)
            help_text = parser._get_formatter()._expand_help(action) if action.help else ""
            if "default" not in help_text:
                missing.append(f"{parser.prog} {action.option_strings[0]} (#{line})")
        assert "usage:" in text
    assert not missing, missing


def test_cli_works_in_a_bare_directory_and_exits_2_on_a_missing_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(paths.PROJECT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["key"]) == 0  # the current directory, bare: the packaged suites, lock, base config
    assert cli.main(["--project", str(tmp_path), "key"]) == 0
    assert cli.main(["--project", str(tmp_path / "missing"), "key"]) == 2


@functools.cache
def _noxfile() -> dict[str, object]:
    """Loaded once, and nox's session registry put back after: nox warns (and will refuse) when a session is
    registered twice, as test_workflow loads the noxfile too."""
    import runpy

    import nox.registry

    saved = dict(nox.registry._REGISTRY)
    try:
        return runpy.run_path(str(paths.CHECKOUT / "noxfile.py"))
    finally:
        nox.registry._REGISTRY.clear()
        nox.registry._REGISTRY.update(saved)


def test_nox_test_only_options_are_the_test_parsers() -> None:
    """The kernel session drops exactly the options `test` has and `build` lacks (nox cannot import us)."""
    nox_globals = _noxfile()
    top = cli.parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    build = set(sub.choices["build"]._option_string_actions)
    test = sub.choices["test"]._option_string_actions
    expected = {name: action.nargs != 0 for name, action in test.items() if name not in build}
    expected["--suite"] = True  # build takes it only to warn that it is ignored
    test_only = nox_globals["TEST_ONLY"]
    assert isinstance(test_only, dict)
    assert test_only == {k: v for k, v in expected.items() if k.startswith("--")}


def test_nox_kernel_session_gets_only_build_options() -> None:
    build_args = _noxfile()["build_args"]
    assert callable(build_args)
    given = [
        "--suite",
        "smoke-c",
        "--kernel",
        "6.1",
        "--memory=2G",
        "--keep-overlay",
        "--cpus",
        "1",
        "-j",
        "2",
    ]
    assert build_args(given) == ["--kernel", "6.1", "-j", "2"]
    args = cli.parser().parse_args(["build", *build_args(given)])  # what build accepts, no exit 2
    assert args.kernel == "6.1"


def test_nox_fails_when_its_python_is_missing() -> None:
    nox_globals = _noxfile()
    nox = nox_globals["nox"]
    assert nox.options.error_on_missing_interpreters is True  # type: ignore[attr-defined]


def test_json_result_round_trips() -> None:
    from kernel_ci.cli.result import CommandResult, SuiteCounts

    result = CommandResult(
        "test", "KERNEL_PANIC", 4, build_key="ab" * 32, paths={"junit": "out/junit.xml"},
        suites=[SuiteCounts("smoke-c", 3, 1, 0, 2)],
    )  # fmt: skip
    assert CommandResult.from_json(result.to_json()) == result
    with pytest.raises(ValueError, match="schema"):
        CommandResult.from_json('{"command": "test"}')


@pytest.mark.parametrize("command", ["build", "test"])
def test_json_result_is_written_when_the_command_fails(command: str, tmp_path: Path) -> None:
    from kernel_ci.cli.result import CommandResult

    target = tmp_path / "deep" / "result.json"
    argv = ["--project", str(paths.CHECKOUT), command, "--json", str(target), "--kernel", "no-such-kernel"]
    assert cli.main(argv) == 2
    result = CommandResult.from_json(target.read_text())
    assert (result.command, result.outcome, result.exit_code) == (command, "USAGE", 2)
    assert "no-such-kernel" in result.error


def test_a_kernel_without_modules_builds_no_external_module(capsys: pytest.CaptureFixture[str]) -> None:
    """Every plan carries the packaged kci-smoke; a fragment turning CONFIG_MODULES off must not make the
    build fail on it (the suites loading it ask for CONFIG_MODULES=y and are skipped on that kernel)."""
    from kernel_ci.build import extmodules
    from kernel_ci.flow.build import buildable_modules

    modules = extmodules.discover(paths.Project(paths.CHECKOUT).module_path)
    assert buildable_modules(modules, "CONFIG_64BIT=y\nCONFIG_MODULES=y\n") == tuple(modules)
    assert buildable_modules(modules, "CONFIG_64BIT=y\n# CONFIG_MODULES is not set\n") == ()
    said = " ".join(capsys.readouterr().err.split())
    assert "CONFIG_MODULES is not set" in said and "kci-smoke" in said
