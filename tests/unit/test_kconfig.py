from __future__ import annotations

import pytest

from kernel_ci.build import kconfig
from kernel_ci.build.kconfig import Fragment


def test_parse_reads_set_unset_and_strings() -> None:
    values = kconfig.parse(
        'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\nCONFIG_D=0x10\nCONFIG_E=n\n# note\n'
    )
    assert values == {
        "CONFIG_A": "y",
        "CONFIG_B": "n",
        "CONFIG_C": '"x y"',
        "CONFIG_D": "0x10",
        "CONFIG_E": "n",
    }


def test_parse_rejects_garbage_with_location() -> None:
    with pytest.raises(kconfig.KconfigError, match=r"frag:2: not a kconfig line"):
        kconfig.parse("CONFIG_A=y\nA=y\n", "frag")


def test_later_fragment_overrides_and_is_reported() -> None:
    merged = kconfig.merge(
        [Fragment("base", "CONFIG_A=y\nCONFIG_B=y\n"), Fragment("series x", "# CONFIG_A is not set\n")]
    )
    assert merged.requests["CONFIG_A"].value == "n"
    assert merged.requests["CONFIG_A"].fragment == "series x"
    assert [r.describe() for r in merged.redefinitions] == ["CONFIG_A redefined by series x: y (base) -> n"]
    assert merged.render() == "# CONFIG_A is not set\nCONFIG_B=y\n"


def test_same_value_twice_is_not_a_redefinition() -> None:
    merged = kconfig.merge([Fragment("a", "CONFIG_A=y\n"), Fragment("b", "CONFIG_A=y\n")])
    assert merged.redefinitions == []


def test_verify_names_the_lost_symbol_and_its_fragment() -> None:
    merged = kconfig.merge([Fragment("series ptrace", "CONFIG_KASAN=y\nCONFIG_A=y\n# CONFIG_B is not set\n")])
    final = "CONFIG_A=y\n# CONFIG_KASAN is not set\n"
    lost = kconfig.verify(final, merged.requests)
    assert [item.request.symbol for item in lost] == ["CONFIG_KASAN"]
    assert "CONFIG_KASAN=y (asked by series ptrace) ended up not set" in lost[0].describe()


def test_verify_treats_absent_as_not_set() -> None:
    merged = kconfig.merge([Fragment("f", "# CONFIG_GONE is not set\nCONFIG_NEW=m\n")])
    lost = kconfig.verify("CONFIG_OTHER=y\n", merged.requests)
    assert [(item.request.symbol, item.actual) for item in lost] == [("CONFIG_NEW", "n")]


def test_base_fragment_parses() -> None:
    from kernel_ci.flow.build import BASE_FRAGMENT

    values = kconfig.parse(BASE_FRAGMENT.read_text(), str(BASE_FRAGMENT))
    for needed in ("CONFIG_VIRTIO_BLK", "CONFIG_9P_FS", "CONFIG_EXT4_FS", "CONFIG_SERIAL_8250_CONSOLE",
                   "CONFIG_DEVTMPFS", "CONFIG_KPROBES", "CONFIG_MODULES"):  # fmt: skip
        assert values[needed] == "y"


# kbuild's bzImage compressor for each CONFIG_KERNEL_<method>, and the Debian package that has it
_COMPRESSORS = {"GZIP": "gzip", "BZIP2": "bzip2", "LZMA": "xz-utils", "XZ": "xz-utils", "LZO": "lzop",
                "LZ4": "lz4", "ZSTD": "zstd"}  # fmt: skip


def test_base_fragment_compressor_is_in_the_builder_image() -> None:
    """The base fragment picks the bzImage's compression; kbuild runs that method's tool in the builder
    container, so the builder's package list must have it (gzip is in every Debian image)."""
    from kernel_ci.build.images import BUILDER_DIR
    from kernel_ci.flow.build import BASE_FRAGMENT

    values = kconfig.parse(BASE_FRAGMENT.read_text(), str(BASE_FRAGMENT))
    chosen = [method for method in _COMPRESSORS if values.get(f"CONFIG_KERNEL_{method}") == "y"]
    assert chosen == ["LZ4"]  # see base.config: kbuild's compression time and the TCG boot
    lock = (BUILDER_DIR / "packages.lock").read_text().splitlines()
    packages = {line.split("=", 1)[0].strip() for line in lock if line.strip() and not line.startswith("#")}
    assert _COMPRESSORS[chosen[0]] in packages | {"gzip"}
