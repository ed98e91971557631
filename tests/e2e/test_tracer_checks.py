"""End to end: the kernel-style checks of the tracer modules (issue 6), run by the pipeline's
kernel_ci.build.kcheck.

checkpatch.pl (--no-tree --terse -f --strict) over every source and header, sparse (`make C=2`) and
cppcheck over each module, against the kbuild tree of the CI kernel (built, or restored from the build
cache). Each check must report nothing; a seeded copy of the tracer proves that each of them does find things.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kernel_ci.build import images, kcheck, source
from kernel_ci.flow.build import BuildRequest, build

pytestmark = pytest.mark.slow

MODULES = Path(__file__).resolve().parents[2] / "kernel-modules"
TRACER_MODULES = ["tracer", "tracer-workload"]


def _sources(module: str) -> list[Path]:
    folder = MODULES / module
    return sorted([*folder.glob("*.c"), *folder.glob("*.h")])


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory):
    """(builder image, kbuild tree, kernel source tree) of the CI kernel the tracer suite runs on."""
    out = tmp_path_factory.mktemp("tracer-checks") / "build"
    result = build(BuildRequest(output=out))  # every build carries every suite's needs: the CI kernel
    tree = source.resolve(result.metadata.kernel.version).tree
    return images.ensure_builder_image(), result.output / "kbuild", tree


def _assert_clean(results: list[kcheck.CheckResult]) -> None:
    dirty = [r for r in results if not r.ok]
    assert not dirty, "\n".join(r.describe() + "\n--- output:\n" + r.output for r in dirty)


@pytest.mark.parametrize("module", TRACER_MODULES)
def test_checkpatch_clean(kernel, module: str) -> None:
    image, _kbuild, tree = kernel
    files = _sources(module)
    assert any(f.suffix == ".c" for f in files)
    _assert_clean(kcheck.checkpatch(image, tree, files, files=True, strict=True))


@pytest.mark.parametrize("module", TRACER_MODULES)
def test_sparse_clean(kernel, module: str) -> None:
    image, kbuild, _tree = kernel
    result = kcheck.sparse(image, kbuild, MODULES / module)
    assert "CHECK" in result.output, f"sparse did not run:\n{result.output}"
    _assert_clean([result])


@pytest.mark.parametrize("module", TRACER_MODULES)
def test_cppcheck_clean(kernel, module: str) -> None:
    image, kbuild, _tree = kernel
    _assert_clean([kcheck.cppcheck(image, kbuild, sorted((MODULES / module).glob("*.c")))])


SEEDED_GLOBAL = "int tracer_seeded_global;\n"  # sparse: not declared, should it be static?
SEEDED_FUNCTION = """
static void tracer_seeded(void)
{
	int a[2];

	a[2] = 1 ;
	pr_info("%d\\n", a[0]);
}
"""  # checkpatch: space before ';'; cppcheck: index out of bounds


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tracer with one defect for each tool."""
    folder = tmp_path_factory.mktemp("seeded") / "tracer"
    shutil.copytree(MODULES / "tracer", folder)
    c = folder / "tracer.c"
    text = c.read_text()
    marker = "static int __init tracer_init(void)"
    text = text.replace(marker, f"{SEEDED_GLOBAL}{SEEDED_FUNCTION}\n{marker}")
    text = text.replace('\tpr_info("loaded\\n");', '\ttracer_seeded();\n\tpr_info("loaded\\n");')
    c.write_text(text)
    assert "tracer_seeded();" in text
    return folder


def test_checkpatch_finds_a_seeded_defect(kernel, seeded: Path) -> None:
    image, _kbuild, tree = kernel
    (result,) = kcheck.checkpatch(image, tree, [seeded / "tracer.c"], files=True)
    assert any("SPACING" in f for f in result.findings), result.describe() + "\n" + result.output


def test_sparse_finds_a_seeded_defect(kernel, seeded: Path) -> None:
    image, kbuild, _tree = kernel
    result = kcheck.sparse(image, kbuild, seeded)
    assert any("tracer_seeded_global" in f for f in result.findings), result.describe() + "\n" + result.output


def test_cppcheck_finds_a_seeded_defect(kernel, seeded: Path) -> None:
    image, kbuild, _tree = kernel
    result = kcheck.cppcheck(image, kbuild, [seeded / "tracer.c"])
    found = any("arrayIndexOutOfBounds" in f for f in result.findings)
    assert found, result.describe() + "\n" + result.output
