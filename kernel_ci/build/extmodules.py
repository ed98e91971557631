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
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kernel_ci.build import kbuild as builder
from kernel_ci.core import proc
from kernel_ci.core.digest import tree_digest
from kernel_ci.core.errors import BuildError
from kernel_ci.core.files import is_kept, keep_folder

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
    return build_all(image, kbuild, [module], dest, extra_make=extra_make)[module.name]


FAILED_MARK = "kci-extmod failed: "


def build_script(extra_make: Sequence[str]) -> str:
    """Every module's make in one container, stopping at the first that fails and naming it last (the
    error's output tail then holds that module's compiler errors and this line). Module names are the
    script's arguments, never spliced into it."""
    make = f'make -C /kbuild M="/mods/$name" {shlex.join(extra_make)} modules'
    return f'for name in "$@"; do {make} || {{ echo "{FAILED_MARK}$name"; exit 1; }}; done'


REUSE_SCHEMA = "1"
REUSE_KEPT = 8


def build_all(
    image: str,
    kbuild: Path,
    modules: Sequence[ModuleSource],
    dest: Path,
    *,
    extra_make: Sequence[str] = (),
    reuse: Path | None = None,
    kbuild_digest: Callable[[], str] | None = None,
) -> dict[str, list[Path]]:
    """Build the modules against the kbuild export in ONE builder container (a container start costs
    0.5-2 s here; one per module made this the slowest step of an incremental build), each in a scratch
    copy (the repo stays clean); their .ko files land in dest/<name>/. A module that does not build is
    named in the ModuleBuildError (the first one: the rest are not tried).

    reuse: a folder of earlier results keyed by reuse_key (the builder image, every file of the kbuild
    export, every source file of every module, the make arguments): on a match the .ko files are copied
    from there and no container runs. The key is content, never a time stamp: the .ko files are a function
    of exactly these inputs (the kernel's build is reproducible: fixed paths, user, host and timestamp),
    so the copy is what the build would make. An incremental kernel build that leaves the export unchanged
    (an edit inside a function: same headers, same Module.symvers) then skips the modules entirely.
    kbuild_digest: gives the export's digest where the caller knows a cheaper one that changes with every file
    (artifacts.kbuild_export_digest); by default every file of kbuild is read.
    """
    if not modules:
        return {}
    if reuse is None:
        stored = None
    else:
        digest = kbuild_digest() if kbuild_digest is not None else tree_digest(kbuild)
        stored = reuse / reuse_key(image, digest, modules, extra_make)
    if stored is not None and is_kept(stored):
        try:
            os.utime(stored)  # recently used, for pruning
            return _copy_kos(stored, modules, dest)
        except (OSError, ModuleBuildError):  # pruned by a concurrent build meanwhile: build after all
            for module in modules:
                shutil.rmtree(dest / module.name, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="extmod-") as scratch:
        root = Path(scratch) / "mods"
        root.mkdir()
        for module in modules:
            ignore = shutil.ignore_patterns(*(f"*{s}" for s in BUILD_LEFTOVERS))
            shutil.copytree(module.path, root / module.name, ignore=ignore)
        builder.give_to_build_user(root)  # the modules' Makefiles are patch-author code: build unprivileged
        names = [m.name for m in modules]
        try:
            builder.run_in_toolchain(
                image,
                ["sh", "-c", build_script(extra_make), "kci-extmod", *names],
                {kbuild.resolve(): "/kbuild:ro", root: "/mods"},
                "/mods",
                quiet=True,
                as_build_user=True,
            )
        except proc.CommandError as exc:
            if not builder.make_failed(exc):
                raise  # Docker's own failure: infrastructure
            failed = [
                line[len(FAILED_MARK) :] for line in exc.output.splitlines() if line.startswith(FAILED_MARK)
            ]
            name = failed[-1] if failed and failed[-1] in names else "/".join(names)
            raise ModuleBuildError(f"module {name} does not build: {exc}") from exc
        built = _copy_kos(root, modules, dest)
        if stored is not None:
            _store(root, modules, stored)
    return built


def _copy_kos(root: Path, modules: Sequence[ModuleSource], dest: Path) -> dict[str, list[Path]]:
    """root/<name>/*.ko -> dest/<name>/; a module without a .ko is an error."""
    built: dict[str, list[Path]] = {}
    for module in modules:
        kos = sorted((root / module.name).glob("*.ko"))
        if not kos:
            raise ModuleBuildError(f"module {module.name}: the build made no .ko file")
        target = dest / module.name
        target.mkdir(parents=True, exist_ok=True)
        built[module.name] = [Path(shutil.copy2(ko, target / ko.name)) for ko in kos]
    return built


def reuse_key(
    image: str, kbuild_digest: str, modules: Sequence[ModuleSource], extra_make: Sequence[str]
) -> str:
    """What the modules' .ko files are a function of: the image, the whole kbuild export (a digest of
    every file, not of those make reads: a file we did not think of still changes the key), each module's
    name and source files, the make arguments."""
    document = {
        "schema": REUSE_SCHEMA,
        "image": image,
        "kbuild": kbuild_digest,
        "modules": [[m.name, digests([m])] for m in modules],
        "extra_make": list(extra_make),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _store(root: Path, modules: Sequence[ModuleSource], stored: Path) -> None:
    """Keep the .ko files under the reuse key (written whole, then marked complete; the oldest pruned)."""
    keep_folder(stored, lambda staging: _copy_kos(root, modules, staging), REUSE_KEPT)
