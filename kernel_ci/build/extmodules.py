"""Out-of-tree modules (kernel-modules/<name>/): discovered, hashed, built against a kernel's kbuild tree.

They are found along a module path (core.paths.Project.module_path): the project's kernel-modules/, then
the defaults shipped in the package (kernel_ci/data/modules/: kci-smoke, which the default suites load); a
name found earlier hides the same name later.

A module folder holds its sources, a Kbuild (and a Makefile for `make -C <tree> M=$PWD`) and a README.
The pipeline builds every one of them against the kernel it just built, in the builder container, and the
.ko files become part of that build's outputs and cache entry (`extmod/<name>/*.ko`).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kernel_ci.build import kbuild as builder
from kernel_ci.core import proc
from kernel_ci.core.errors import BuildError

BUILD_LEFTOVERS = (".o", ".ko", ".mod", ".mod.c", ".cmd", ".order", ".symvers")


class ModuleBuildError(BuildError):
    pass


@dataclass(frozen=True)
class ModuleSource:
    name: str
    path: Path

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.rglob("*") if p.is_file() and not p.name.endswith(BUILD_LEFTOVERS))


ModuleRoots = Path | Sequence[Path]  # one folder of modules, or a module path (the first holding a name wins)


def discover(roots: ModuleRoots, names: Sequence[str] | None = None) -> list[ModuleSource]:
    """The module folders (those with a Kbuild) along roots, sorted by name, or the named ones in order.
    A folder that does not exist holds none (a project without kernel-modules/)."""
    found: dict[str, ModuleSource] = {}
    for root in (roots,) if isinstance(roots, Path) else roots:
        folders = sorted(root.iterdir()) if root.is_dir() else []
        for p in folders:
            if (p / "Kbuild").is_file():
                found.setdefault(p.name, ModuleSource(p.name, p))
    found = dict(sorted(found.items()))
    if names is None:
        return list(found.values())
    unknown = [n for n in names if n not in found]
    if unknown:
        where = ", ".join(str(r) for r in ((roots,) if isinstance(roots, Path) else roots))
        raise ModuleBuildError(
            f"unknown module folder(s) {', '.join(unknown)} (looked in {where}); known: {', '.join(found)}"
        )
    return [found[n] for n in names]


def digests(modules: Sequence[ModuleSource]) -> dict[str, str]:
    """ "module:<name>/<file>" -> sha256 of every source file: these go into the build key."""
    return {
        f"module:{m.name}/{f.relative_to(m.path).as_posix()}": hashlib.sha256(f.read_bytes()).hexdigest()
        for m in modules
        for f in m.files()
    }


def build(
    image: str, kbuild: Path, module: ModuleSource, dest: Path, *, extra_make: Sequence[str] = ()
) -> list[Path]:
    """Build one module in a scratch copy (the repo stays clean); its .ko files land in dest/<name>/."""
    with tempfile.TemporaryDirectory(prefix=f"extmod-{module.name}-") as scratch:
        tree = Path(scratch) / module.name
        shutil.copytree(module.path, tree, ignore=shutil.ignore_patterns(*(f"*{s}" for s in BUILD_LEFTOVERS)))
        builder.give_to_build_user(tree)  # the module's Makefile is patch-author code: build unprivileged
        try:
            builder.run_in_toolchain(
                image,
                ["make", "-C", "/kbuild", "M=/mod", *extra_make, "modules"],
                {kbuild.resolve(): "/kbuild:ro", tree: "/mod"},
                "/mod",
                quiet=True,
                as_build_user=True,
            )
        except proc.CommandError as exc:
            if not builder.make_failed(exc):
                raise  # Docker's own failure: infrastructure
            raise ModuleBuildError(f"module {module.name} does not build: {exc}") from exc
        kos = sorted(tree.glob("*.ko"))
        if not kos:
            raise ModuleBuildError(f"module {module.name}: the build made no .ko file")
        target = dest / module.name
        target.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy2(ko, target / ko.name)) for ko in kos]


def build_all(image: str, kbuild: Path, modules: Sequence[ModuleSource], dest: Path) -> dict[str, list[Path]]:
    return {m.name: build(image, kbuild, m, dest) for m in modules}
