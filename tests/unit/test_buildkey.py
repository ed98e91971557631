from __future__ import annotations

import re

import pytest

from kernel_ci.build.keys import (
    InputDifference,
    MissExplanation,
    build_key,
    config_entries,
    explain_miss,
    manifest_differences,
)

SHA_A = "3f2a" * 16
SHA_B = "9b1c" * 16

DOT_CONFIG = """\
#
# Automatically generated file; DO NOT EDIT.
# Linux/x86 5.10.223 Kernel Configuration
#
CONFIG_CC_VERSION_TEXT="gcc (Debian 12.2.0-14) 12.2.0"
CONFIG_CC_IS_GCC=y
CONFIG_GCC_VERSION=120200

#
# General setup
#
CONFIG_INIT_ENV_ARG_LIMIT=32
# CONFIG_COMPILE_TEST is not set
CONFIG_LOCALVERSION="-kci"
CONFIG_PHYSICAL_START=0x1000000
CONFIG_EXT4_FS=m
# end of General setup
"""


def manifest(**overrides: str) -> dict[str, str]:
    base = {
        "source": f"linux-5.10.223 sha256:{SHA_A}",
        "toolchain": SHA_A,
        "patch:ci-smoke/0001-proc-add-proc-ci-smoke.patch": SHA_A,
        "config:CONFIG_KASAN": "n",
        "config:CONFIG_PROC_FS": "y",
        "flag:arch": "x86_64",
    }
    base.update(overrides)
    return base


def test_config_entries_reads_every_kind_of_value() -> None:
    entries = config_entries(DOT_CONFIG)
    assert entries == {
        "config:CONFIG_CC_VERSION_TEXT": '"gcc (Debian 12.2.0-14) 12.2.0"',
        "config:CONFIG_CC_IS_GCC": "y",
        "config:CONFIG_GCC_VERSION": "120200",
        "config:CONFIG_INIT_ENV_ARG_LIMIT": "32",
        "config:CONFIG_COMPILE_TEST": "n",
        "config:CONFIG_LOCALVERSION": '"-kci"',
        "config:CONFIG_PHYSICAL_START": "0x1000000",
        "config:CONFIG_EXT4_FS": "m",
    }


def test_config_entries_later_line_wins_and_garbage_is_rejected() -> None:
    assert config_entries("CONFIG_A=y\n# CONFIG_A is not set\n") == {"config:CONFIG_A": "n"}
    with pytest.raises(ValueError, match=r"line 2 .*'this is not kconfig'"):
        config_entries("CONFIG_A=y\nthis is not kconfig\n")


def test_build_key_is_sha256_hex_and_independent_of_insertion_order() -> None:
    one = manifest()
    two = dict(reversed(list(one.items())))
    assert re.fullmatch(r"[0-9a-f]{64}", build_key(one))
    assert build_key(one) == build_key(two)


def test_build_key_changes_with_any_entry() -> None:
    base = build_key(manifest())
    assert build_key(manifest(**{"config:CONFIG_KASAN": "y"})) != base
    assert build_key(manifest(toolchain=SHA_B)) != base
    assert build_key({**manifest(), "patch:ptrace/0002-x.patch": SHA_B}) != base
    # values and names cannot be confused with each other by the encoding
    assert build_key({"a": "b:c"}) != build_key({"a:b": "c"})


def test_build_key_rejects_non_string_values() -> None:
    with pytest.raises(TypeError, match="str -> str"):
        build_key({"flag:jobs": 4})  # type: ignore[dict-item]


def describe(name: str, cached: str | None, wanted: str | None) -> str:
    return InputDifference(name, cached, wanted).describe()


def test_describe_formats_each_kind_of_input() -> None:
    old_source, new_source = f"linux-5.10.223 sha256:{SHA_A}", f"linux-5.10.262 sha256:{SHA_B}"
    retarball = f"linux-5.10.223 sha256:{SHA_B}"
    assert describe("config:CONFIG_KASAN", "n", "y") == "CONFIG_KASAN: n -> y"
    assert describe("config:CONFIG_NEW", None, "y") == "CONFIG_NEW: absent -> y"
    assert describe("patch:ci-smoke/0001-foo.patch", SHA_A, SHA_B) == "patch ci-smoke/0001-foo.patch: changed"
    assert describe("patch:ptrace/0002-x.patch", None, SHA_B) == "patch ptrace/0002-x.patch: added"
    assert describe("patch:ptrace/0002-x.patch", SHA_A, None) == "patch ptrace/0002-x.patch: removed"
    assert describe("toolchain", SHA_A, SHA_B) == "toolchain: 3f2a3f2a.. -> 9b1c9b1c.."
    assert describe("source", old_source, new_source) == "source: linux-5.10.223 -> linux-5.10.262"
    # same version, different tarball: the digests are the only difference, so they are shown
    assert (
        describe("source", old_source, retarball)
        == "source: linux-5.10.223 sha256:3f2a3f2a.. -> linux-5.10.223 sha256:9b1c9b1c.."
    )
    assert describe("flag:arch", "x86_64", "arm64") == "flag arch: x86_64 -> arm64"
    assert describe("flag:make", None, "W=1") == "flag make: added (W=1)"
    assert describe("flag:make", "W=1", None) == "flag make: removed (was W=1)"


def test_describe_caps_very_long_values() -> None:
    text = describe("flag:make", "-j2 " * 100 + "V=1", "-j2 " * 100 + "W=1")
    assert len(text) < 150
    assert "..." in text
    assert "V=1 -> " in text
    assert text.endswith("W=1")
    # long numbers in config values are values, not digests: kept (up to the cap)
    assert describe("config:CONFIG_BIG", "1234567890123456789", "0") == "CONFIG_BIG: 1234567890123456789 -> 0"


def test_differences_are_grouped_source_toolchain_patches_flags_then_config() -> None:
    cached = manifest()
    wanted = manifest(
        **{
            "config:CONFIG_KASAN": "y",
            "source": f"linux-5.10.262 sha256:{SHA_B}",
            "flag:arch": "arm64",
            "toolchain": SHA_B,
            "patch:ci-smoke/0001-proc-add-proc-ci-smoke.patch": SHA_B,
        }
    )
    names = [d.name for d in manifest_differences(cached, wanted)]
    assert names == [
        "source",
        "toolchain",
        "patch:ci-smoke/0001-proc-add-proc-ci-smoke.patch",
        "flag:arch",
        "config:CONFIG_KASAN",
    ]


def test_explain_miss_with_an_empty_cache_says_so() -> None:
    explanation = explain_miss(manifest(), [])
    assert explanation.nearest_key is None
    assert explanation.differences == []
    assert "nothing is cached" in explanation.render()


def test_explain_miss_picks_the_entry_with_fewest_differences() -> None:
    wanted = manifest(**{"config:CONFIG_KASAN": "y"})
    far = manifest(**{"config:CONFIG_KASAN": "y", "toolchain": SHA_B, "flag:arch": "arm64"})
    near = manifest()
    explanation = explain_miss(wanted, [("far" + "0" * 61, far), ("near" + "0" * 60, near)])
    assert explanation.nearest_key == "near" + "0" * 60
    assert explanation.differences == [InputDifference("config:CONFIG_KASAN", "n", "y")]
    assert explanation.candidates == 2
    text = explanation.render()
    assert "CONFIG_KASAN: n -> y" in text
    assert "1 input differ" in text


def test_explain_miss_ties_prefer_same_source_then_most_recent() -> None:
    wanted = manifest(toolchain=SHA_B)
    other_source = manifest(source=f"linux-5.10.262 sha256:{SHA_B}")
    same_source_old = manifest()
    same_source_new = manifest()
    # one difference each; other_source is given first (newest) but has a different source
    explanation = explain_miss(
        wanted, [("a" * 64, other_source), ("b" * 64, same_source_new), ("c" * 64, same_source_old)]
    )
    assert explanation.nearest_key == "b" * 64


def test_render_caps_long_lists_and_counts_the_rest_per_group() -> None:
    cached = manifest()
    wanted = manifest(toolchain=SHA_B)
    for index in range(40):
        wanted[f"config:CONFIG_SYM_{index:02d}"] = "y"
    explanation = explain_miss(wanted, [("f" * 64, cached)])
    text = explanation.render(limit=12)
    lines = text.splitlines()
    assert lines[1] == "  - toolchain: 3f2a3f2a.. -> 9b1c9b1c.."
    assert len(lines) == 1 + 12 + 1
    assert lines[-1] == "  ... and 29 more config symbols"
    assert "41 inputs differ" in lines[0]


def test_render_names_every_group_left_out() -> None:
    explanation = MissExplanation(
        nearest_key="e" * 64,
        differences=[
            InputDifference("source", "linux-5.10.223", "linux-5.10.262"),
            InputDifference("patch:s/0001-a.patch", None, SHA_A),
            InputDifference("patch:s/0002-b.patch", None, SHA_A),
            InputDifference("config:CONFIG_A", "n", "y"),
        ],
        candidates=3,
    )
    assert explanation.render(limit=1).splitlines()[-1] == "  ... and 2 more patches, 1 more config symbol"
