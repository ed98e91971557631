"""Kernel-style static checks, run in the builder container: checkpatch.pl, sparse (`make C=2`), cppcheck.

Each check returns a CheckResult (tool, target, findings, output) instead of raising, so a caller can
report every finding of every file at once: a nox session, the build pipeline, a test.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ci import builder

# checkpatch's only complaint about a new file in a patch series or module that is not in MAINTAINERS:
# expected for out-of-tree work, reported but not a finding.
CHECKPATCH_ACCEPTED = ("added, moved or deleted file(s), does MAINTAINERS need updating?",)
_SPARSE_LINE = re.compile(r"^\S+\.[ch]:\d+:\d+: (warning|error):")
CPPCHECK_TEMPLATE = "{file}:{line}: {severity}: {message} [{id}]"


@dataclass
class CheckResult:
    tool: str
    target: str
    findings: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> bool:
        return not self.findings

    def describe(self) -> str:
        if self.ok:
            return f"{self.tool} {self.target}: clean"
        return f"{self.tool} {self.target}: {len(self.findings)} finding(s)\n  " + "\n  ".join(self.findings)


def _checkpatch_findings(output: str) -> list[str]:
    findings = []
    for line in output.splitlines():
        if re.search(r"\b(ERROR|WARNING|CHECK):", line) and not any(ok in line for ok in CHECKPATCH_ACCEPTED):
            findings.append(line.strip())
    return findings


def checkpatch(
    image: str, kernel_tree: Path, targets: Sequence[Path], *, files: bool, strict: bool = False
) -> list[CheckResult]:
    """checkpatch.pl of the kernel tree over patches (files=False) or source files (files=True, `-f`)."""
    results = []
    for target in targets:
        target = target.resolve()
        argv = [
            "perl",
            "/kernel/scripts/checkpatch.pl",
            "--no-tree",
            "--terse",
            "--show-types",
            "--color=never",
        ]
        if files:
            argv.append("-f")
        if strict:
            argv.append("--strict")
        run = builder.run_in_toolchain(
            image,
            [*argv, f"/target/{target.name}"],
            {kernel_tree.resolve(): "/kernel:ro", target.parent: "/target:ro"},
            "/target",
            quiet=True,
            check=False,
        )
        results.append(CheckResult("checkpatch", str(target), _checkpatch_findings(run.output), run.output))
    return results


def sparse(image: str, kbuild: Path, module_dir: Path) -> CheckResult:
    """`make C=2` (sparse over every file) of an out-of-tree module against a kbuild tree."""
    with tempfile.TemporaryDirectory(prefix="sparse-") as scratch:
        tree = Path(scratch) / module_dir.name
        shutil.copytree(module_dir, tree)
        run = builder.run_in_toolchain(
            image,
            ["make", "-C", "/kbuild", "M=/mod", "C=2", "modules"],
            {kbuild.resolve(): "/kbuild:ro", tree: "/mod"},
            "/mod",
            quiet=True,
            check=False,
        )
    findings = [line.replace("/mod/", "") for line in run.output.splitlines() if _SPARSE_LINE.match(line)]
    if run.returncode != 0 and not findings:
        findings.append(f"make C=2 failed (exit {run.returncode}); see output")
    return CheckResult("sparse", str(module_dir), findings, run.output)


def cppcheck(image: str, kbuild: Path, sources: Sequence[Path]) -> CheckResult:
    """cppcheck over C files with the kernel's include paths; warnings, style, portability, performance."""
    if not sources:
        return CheckResult("cppcheck", "(no files)")
    folder = sources[0].resolve().parent
    argv = ["cppcheck", "--quiet", "--enable=warning,style,performance,portability", "--inline-suppr"]
    argv += ["--suppress=missingIncludeSystem", "--suppress=unusedFunction", "--std=c11"]
    argv += ["-D__KERNEL__", "-DMODULE", "-I", "/kbuild/include", "-I", "/kbuild/arch/x86/include"]
    argv += [f"--template={CPPCHECK_TEMPLATE}", *[f"/src/{s.name}" for s in sources]]
    mounts = {kbuild.resolve(): "/kbuild:ro", folder: "/src:ro"}
    run = builder.run_in_toolchain(image, argv, mounts, "/src", quiet=True, check=False)
    findings = [line for line in run.output.splitlines() if re.match(r"^/src/\S+:\d+: \w+:", line)]
    return CheckResult("cppcheck", str(folder), findings, run.output)
