"""`kernel-ci patches`: every series as mail-ready files, checked by the kernel's checkpatch.pl.

Layout of the output folder (default out/patches/), replaced as a whole on each run:

    <series>/NNNN-*.patch   the series' git format-patch files, byte for byte as they are in the repository
    <series>.mbox           the series' patches concatenated in order (git am <series>.mbox)
    all-series.mbox         every series, in series-name order (git am applies it to a vanilla tree)
    checkpatch.txt          checkpatch.pl's output for every patch
    index.json              what is where, with each patch's sha256

checkpatch.pl comes from the pinned kernel tree (kernel_ci.build.source.resolve) and runs in the builder
container
(kernel_ci.build.kcheck.checkpatch); any finding but the MAINTAINERS new-file notice fails the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kernel_ci.build import patches
from kernel_ci.build.kcheck import CheckResult
from kernel_ci.core.errors import BuildError
from kernel_ci.core.paths import KERNEL_PATCHES, REPO_ROOT

ALL_MBOX = "all-series.mbox"
MARKER = ".kernel-ci-patches"
CHECKPATCH_REPORT = "checkpatch.txt"


class ExportError(BuildError):
    """The output folder cannot be written safely, or there is nothing to export."""


@dataclass
class ExportedSeries:
    name: str
    patch_files: list[Path]  # the copies under <dest>/<series>/
    sources: list[Path]  # the repository's patch files, same order
    mbox: Path


@dataclass
class Export:
    dest: Path
    series: list[ExportedSeries]
    all_mbox: Path
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def patch_files(self) -> list[Path]:
        return [p for s in self.series for p in s.patch_files]

    def source_of(self, exported: Path) -> Path:
        for one in self.series:
            for copy, original in zip(one.patch_files, one.sources, strict=True):
                if copy == exported:
                    return original
        raise KeyError(exported)

    @property
    def findings(self) -> list[str]:
        return [finding for check in self.checks for finding in check.findings]


def _replace_dir(staging: Path, dest: Path) -> None:
    """Put staging at dest; an existing dest is replaced only if an earlier export made it (marker)."""
    if dest.exists():
        if not (dest / MARKER).is_file() and any(dest.iterdir()):
            raise ExportError(
                f"{dest} exists and was not written by `kernel-ci patches`: choose another output folder "
                "or remove it"
            )
        old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
        dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old)
    else:
        staging.rename(dest)


def export(series: Sequence[patches.Series], dest: Path) -> Export:
    """Write the layout above for the given series into dest (atomically replacing an earlier export)."""
    if not series:
        raise ExportError("no patch series to export (kernel-patches/ has none, or none was chosen)")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.tmp.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        (staging / MARKER).write_text("written by kernel-ci patches; replaced on each run\n")
        exported: list[ExportedSeries] = []
        for one in series:
            mbox = patches.export_series(one, staging)  # also checks every patch is a format-patch file
            copies = []
            for patch in one.patches:
                copy = staging / one.name / patch.relative_to(one.directory)
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(patch, copy)
                copies.append(copy)
            exported.append(ExportedSeries(one.name, copies, list(one.patches), mbox))
        (staging / ALL_MBOX).write_bytes(b"".join(s.mbox.read_bytes() for s in exported))
        index = {
            "all": ALL_MBOX,
            "series": {
                one.name: {"mbox": one.mbox.name, "patches": patches.series_digest(original)}
                for one, original in zip(exported, series, strict=True)
            },
        }
        (staging / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        _replace_dir(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    def moved(path: Path) -> Path:
        return dest / path.relative_to(staging)

    result = [
        ExportedSeries(s.name, [moved(p) for p in s.patch_files], s.sources, moved(s.mbox)) for s in exported
    ]
    return Export(dest, result, dest / ALL_MBOX)


def checkpatch(result: Export, image: str, kernel_tree: Path) -> list[CheckResult]:
    """checkpatch.pl over every exported patch; writes checkpatch.txt; returns one result per patch."""
    from kernel_ci.build import kcheck

    checks = kcheck.checkpatch(image, kernel_tree, result.patch_files, files=False, strict=True)
    result.checks = checks
    lines = []
    for check in checks:
        verdict = "clean" if check.ok else "FINDINGS"
        lines.append(f"== {Path(check.target).relative_to(result.dest)}: {verdict}")
        lines.append(check.output.rstrip())
        lines.append("")
    (result.dest / CHECKPATCH_REPORT).write_text("\n".join(lines))
    return checks


_TERSE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<level>ERROR|WARNING|CHECK):(?P<text>.*)$")


def finding_locations(result: Export) -> list[tuple[str, int | None, str]]:
    """(repository path of the patch, line in it or None, finding) for every checkpatch finding."""
    located = []
    for check in result.checks:
        original = result.source_of(Path(check.target))
        try:
            where = original.resolve().relative_to(REPO_ROOT).as_posix()
        except ValueError:
            where = original.as_posix()
        for finding in check.findings:
            match = _TERSE.match(finding)
            line = int(match.group("line")) if match else None
            located.append((where, line, finding))
    return located


def run(
    dest: Path,
    *,
    series: Sequence[str] | None = None,
    kernel: str | None = None,
    check: bool = True,
    patches_root: Path = KERNEL_PATCHES,
) -> Export:
    """Export the series and (unless check=False) run checkpatch.pl from the pinned tree in the container."""
    chosen = patches.discover_series(patches_root, None if series is None else list(series))
    result = export(chosen, dest)
    if check:
        from kernel_ci.build import images, source
        from kernel_ci.host import setup as hostsetup

        hostsetup.prepare_build_host()
        tree = source.resolve(kernel).tree
        checkpatch(result, images.ensure_builder_image(), tree)
    return result
