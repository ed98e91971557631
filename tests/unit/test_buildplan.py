"""The build plan: one derivation for the recipe, request and build keys; suites never change the build."""

from __future__ import annotations

import argparse
import shutil
import typing
from dataclasses import fields, replace
from pathlib import Path

import pytest

from kernel_ci.build import kconfig, source
from kernel_ci.build import recipe as recipekey
from kernel_ci.build.plan import BuildPlan, PlanError, SourcePin, make_plan, suite_needs
from kernel_ci.cli import main as cli
from kernel_ci.core.paths import DEFAULT_SUITES, GUEST_TESTS, KCONFIG_DIR, KERNEL_PATCHES, SUITE_PATH, Project
from kernel_ci.flow import build as buildpipeline
from kernel_ci.flow.build import HOW_NOT_WHAT, BuildRequest, plan_request

FINGERPRINT = "7d13f7fb1ee4cd046c9c404e7bf7ebe4"  # a toolchain fingerprint (a digest of package versions)
FINAL_CONFIG = "CONFIG_64BIT=y\nCONFIG_PROC_FS=y\n# CONFIG_KASAN is not set\n"


@pytest.fixture(scope="module")
def plan() -> BuildPlan:
    """The plan of the default build, from the repository's files."""
    return make_plan().plan


def keys(plan: BuildPlan) -> tuple[str, str, str]:
    return plan.recipe_key(), plan.request_key(FINGERPRINT), plan.build_key(FINAL_CONFIG, FINGERPRINT)


def _changed(kind: object, value: object, name: str) -> list[object]:
    """Other values of a plan field, from its declared type. A field of a type not handled here fails the
    test, so a new field must come with a way to change it (and so with proof that it reaches the keys)."""
    if kind is str:
        return [f"{value}-changed"]
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        assert isinstance(value, tuple)
        if item is str:
            return [(*value, "zz-added"), value[1:]] if value else [("zz-added",)]
        if item is SourcePin:
            first = value[0]
            return [
                (replace(first, sha256="0" * 64), *value[1:]),
                (replace(first, version="9.9.9"), *value[1:]),
            ]
        if item == tuple[str, str]:
            renamed = [((value[0][0], "0" * 64), *value[1:])] if value else []
            return [*renamed, (*value, ("zz/added", "1" * 64))]
    pytest.fail(f"BuildPlan.{name}: no test mutation for type {kind!r}; add one to _changed()")


def test_every_field_of_the_plan_changes_all_three_keys(plan: BuildPlan) -> None:
    hints = typing.get_type_hints(BuildPlan)
    before = keys(plan)
    assert len(set(before)) == 3
    for field in fields(BuildPlan):
        for other in _changed(hints[field.name], getattr(plan, field.name), field.name):
            after = keys(replace(plan, **{field.name: other}))
            unchanged = [
                kind
                for kind, a, b in zip(("recipe", "request", "build"), before, after, strict=True)
                if a == b
            ]
            assert not unchanged, (
                f"BuildPlan.{field.name} = {other!r} leaves the {unchanged} key(s) unchanged"
            )


def test_the_three_keys_carry_the_same_plan_entries(plan: BuildPlan) -> None:
    recipe = plan.recipe_inputs()
    request = plan.request_inputs(FINGERPRINT)
    build = plan.build_inputs(FINAL_CONFIG, FINGERPRINT)
    entries = plan.entries()
    assert {k: v for k, v in recipe.items() if k != "schema"} == entries
    assert {k: v for k, v in request.items() if k != "toolchain"} == entries
    assert {k: build[k] for k in request} == request  # the build key: the request's inputs and the .config
    assert set(build) - set(request) == {
        "config:CONFIG_64BIT",
        "config:CONFIG_PROC_FS",
        "config:CONFIG_KASAN",
    }


def test_kselftest_targets_change_the_recipe_key(plan: BuildPlan) -> None:
    """The drift of issue 13: the recipe key left the kselftest targets out, so a suite whose targets changed
    kept its recipe key (and its CI cache entry) while the build key changed."""
    assert plan.kselftests == ("ptrace",)  # guest-tests/kselftest-ptrace
    for targets in [(), ("ptrace", "timers")]:
        other = replace(plan, kselftests=targets)
        assert other.recipe_key() != plan.recipe_key()
        assert other.build_key(FINAL_CONFIG, FINGERPRINT) != plan.build_key(FINAL_CONFIG, FINGERPRINT)


def test_a_suite_manifest_change_reaches_the_recipe_key_from_the_files(tmp_path: Path) -> None:
    """The same, through the files `kernel-ci key` reads: a suite's manifest gains a kselftest target."""
    suites_dir = tmp_path / "guest-tests"
    shutil.copytree(GUEST_TESTS, suites_dir)
    before = recipekey.recipe_manifest(suites_dir=(suites_dir, DEFAULT_SUITES))
    assert before == recipekey.recipe_manifest()  # a copy of guest-tests/ is the same plan
    manifest = suites_dir / "kselftest-ptrace" / "manifest.toml"
    manifest.write_text(
        manifest.read_text().replace('targets = ["ptrace"]', 'targets = ["ptrace", "timers"]')
    )
    after = recipekey.recipe_manifest(suites_dir=(suites_dir, DEFAULT_SUITES))
    assert after["flag:kselftest"] == "ptrace timers"
    assert recipekey.recipe_key(after) != recipekey.recipe_key(before)


def _request(*argv: str) -> BuildRequest:
    args = cli.parser().parse_args(["-o", "/tmp/kci-out", *argv])
    return cli._build_request(args)


@pytest.mark.parametrize(
    "narrowed",
    [
        ["test", "--suite", "smoke-c"],
        ["test", "--suite", "kselftest-ptrace", "--suite", "tracer"],
        ["build", "--suite", "smoke-py"],
    ],
)
def test_suite_only_filters_what_runs_never_what_is_built(narrowed: list[str]) -> None:
    full = plan_request(_request("test")).plan
    assert full.kselftests == ("ptrace",) and "CONFIG_DEBUG_KMEMLEAK=y" in full.kconfig  # every suite's needs
    plan = plan_request(_request(*narrowed)).plan
    assert plan == full
    assert plan.request_key(FINGERPRINT) == full.request_key(FINGERPRINT)
    assert plan.recipe_key() == full.recipe_key()


def test_build_and_key_warn_that_suite_is_ignored(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.parser().parse_args(["key", "--suite", "smoke-c"])
    assert args.func(args) == 0
    with_suite = capsys.readouterr()
    args = cli.parser().parse_args(["key"])
    assert args.func(args) == 0
    without = capsys.readouterr()
    assert with_suite.out == without.out  # the same key on stdout (CI reads it)
    assert "--suite no longer changes the kernel" in with_suite.err
    assert "no longer" not in without.err


# Other values of each BuildRequest field that says what is built (the fields not in HOW_NOT_WHAT).
def _what_changes(tmp_path: Path) -> dict[str, list[object]]:
    fragment = tmp_path / "extra.config"
    fragment.write_text("CONFIG_KASAN=y\n")
    other = tmp_path / "project"  # the checkout's kconfig/, but no patch series
    for name in ("kernel-patches", "guest-tests"):
        (other / name).mkdir(parents=True)
    (other / "kconfig").symlink_to(KCONFIG_DIR)
    return {
        "project": [Project(other)],
        "kernel": ["5.10.223", "6.1"],
        "series": [["ci-smoke"], []],
        "fragments": [[fragment]],
        "suites_dir": [None],
        "external_modules": [False],
        "tree": [_kernel_tree(tmp_path / "linux")],
        "patches": [KERNEL_PATCHES / "ci-smoke"],
        "prefix": [("ci-smoke", 0)],
    }


def _kernel_tree(root: Path) -> Path:
    """A directory that --tree accepts as a kernel source (a top Makefile with a version, a Kconfig)."""
    root.mkdir()
    (root / "Makefile").write_text("VERSION = 5\nPATCHLEVEL = 10\nSUBLEVEL = 223\n")
    (root / "Kconfig").write_text("")
    return root


def test_every_request_field_reaches_the_plan_or_is_declared_how_not_what(tmp_path: Path) -> None:
    """A new BuildRequest field must change the plan (and so the keys) or be listed in HOW_NOT_WHAT."""
    base = BuildRequest(output=tmp_path / "out")
    plan = plan_request(base).plan
    changes = _what_changes(tmp_path)
    names = {f.name for f in fields(BuildRequest)}
    assert names >= HOW_NOT_WHAT
    assert set(changes) == names - HOW_NOT_WHAT, "a BuildRequest field is neither in the plan nor declared"
    for name, values in changes.items():
        for value in values:
            assert plan_request(replace(base, **{name: value})).plan != plan, f"BuildRequest.{name}={value!r}"
    how = {
        "jobs": 1,
        "use_cache": False,
        "use_ccache": False,
        "fresh": True,
        "ccache_dir": tmp_path,
        "ccache_remote": "http://127.0.0.1:1/ccache/",
    }
    assert set(how) | {"output"} == HOW_NOT_WHAT
    assert plan_request(replace(base, output=tmp_path / "elsewhere", **how)).plan == plan


def test_a_fallback_builds_the_same_plan_as_asking_for_the_version() -> None:
    lock = source.load_lock()
    alias = make_plan("5.10").plan
    direct = make_plan("5.10.223").plan
    assert len(alias.source) == 2 and alias.recipe_key() != direct.recipe_key()  # CI keys per request
    fetched = lock.tarballs["5.10.223"]
    assert alias.resolved(fetched) == direct.resolved(fetched)
    assert alias.resolved(fetched).request_key(FINGERPRINT) == direct.resolved(fetched).request_key(
        FINGERPRINT
    )
    with pytest.raises(PlanError, match=r"linux-6\.1\.176 .* is not a candidate"):
        alias.resolved(lock.tarballs["6.1.176"])


def test_a_suite_need_the_series_cannot_meet_skips_the_suite_but_a_requirement_fails() -> None:
    planned = make_plan(series=["ci-smoke"])  # no self-ptrace series: CONFIG_SELF_PTRACE does not exist
    lost_suite_need = "\n".join(
        f"{symbol}={r.value}" if r.value != kconfig.NOT_SET else f"# {symbol} is not set"
        for symbol, r in planned.merged.requests.items()
        if symbol != "CONFIG_SELF_PTRACE"
    )
    errors, suite_only = planned.unmet_needs(lost_suite_need)
    assert errors == []
    assert [(i.request.symbol, i.request.fragment) for i in suite_only] == [
        ("CONFIG_SELF_PTRACE", "suite self-ptrace")
    ]
    # CONFIG_PROC_FS: asked by the base fragment and by suites alike; losing it is a build error.
    without_proc = "\n".join(
        line for line in lost_suite_need.splitlines() if not line.startswith("CONFIG_PROC_FS=")
    )
    errors, _ = planned.unmet_needs(without_proc)
    assert [i.request.symbol for i in errors] == ["CONFIG_PROC_FS"]


def test_suite_needs_of_a_folder_and_of_none(tmp_path: Path) -> None:
    needs = suite_needs(GUEST_TESTS)
    assert needs.kselftests == ("ptrace",)
    assert "suite self-ptrace" in [f.name for f in needs.fragments]
    assert suite_needs(None).fragments == () and suite_needs(None).kselftests == ()
    assert make_plan(suites_dir=None).plan.kselftests == ()


def test_recipekey_no_longer_derives_the_plan_itself() -> None:
    """recipekey.py used to copy the pipeline's derivation (and import it for BUILD_TARGETS)."""
    text = Path(recipekey.__file__).read_text()
    assert "buildpipeline" not in text and "kconfig.merge" not in text
    assert buildpipeline.BUILD_TARGETS == "bzImage modules scripts_gdb modules_install vmlinux.xz"


def test_cli_request_has_no_suite_fields() -> None:
    args = argparse.Namespace(
        kernel=None, series=["none"], fragment=[], output=Path("/tmp/x"), jobs=1, no_cache=False,
        no_ccache=False, fresh=False,
    )  # fmt: skip
    request = cli._build_request(args)
    assert request.series == [] and request.suites_dir == SUITE_PATH
