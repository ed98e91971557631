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
from xml.sax.saxutils import quoteattr

from kernel_ci.build import kbuild as builder

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
        if not target.is_file():  # checkpatch.pl -f exits 0 on a missing file
            results.append(CheckResult("checkpatch", str(target), [f"{target}: no such file"]))
            continue
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
        findings = _checkpatch_findings(run.output)
        # exit 1 with only accepted complaints is normal (its "total:" line is there); exit != 0 without
        # any report means it did not run (no perl, no such file): not "clean"
        if run.returncode != 0 and not findings and not re.search(r"^total: ", run.output, re.M):
            findings.append(f"checkpatch.pl failed (exit {run.returncode}); see output")
        results.append(CheckResult("checkpatch", str(target), findings, run.output))
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


# cppcheck cannot analyse kernel code through the kernel's headers: its preprocessor fails on them
# (`#error "Unknown compiler"` in compiler_types.h, then IS_ENABLED() in kconfig.h) and its parser on the
# asm goto of the x86 headers (internalAstError), and either way it gives up on the whole file after one
# error line about a header. So the sources are checked without the kernel's include paths (their
# #includes are missing system includes, suppressed), and the kernel's iterator macros, which cppcheck
# cannot parse unexpanded (unknownMacro, again the whole file skipped), are defined by this library as
# loops over an opaque function: the loop bodies are analysed and no value is assumed for the cursor.
def _loop(cursor: str, *args: str, spare: str = "") -> str:
    """A for loop whose cursor (and spare cursor) come from an opaque call, so nothing is known of them."""
    call = f"__kci_iter({', '.join(args)})"
    if not spare:
        return f"for ({cursor} = {call}; {cursor}; {cursor} = {call})"
    step = f"__kci_iter({', '.join([*args, spare])})"
    return f"for ({cursor} = {call}, {spare} = {cursor}; {cursor}; {cursor} = {step})"


_KERNEL_ITERATORS = {
    "list_for_each(pos,head)": _loop("pos", "head"),
    "list_for_each_safe(pos,n,head)": _loop("pos", "head", spare="n"),
    "list_for_each_entry(pos,head,member)": _loop("pos", "head"),
    "list_for_each_entry_safe(pos,n,head,member)": _loop("pos", "head", spare="n"),
    "list_for_each_entry_reverse(pos,head,member)": _loop("pos", "head"),
    "hlist_for_each_entry(pos,head,member)": _loop("pos", "head"),
    "hlist_for_each_entry_safe(pos,n,head,member)": _loop("pos", "head", spare="n"),
    "hash_for_each(name,bkt,obj,member)": _loop("obj", "name", "&bkt"),
    "hash_for_each_safe(name,bkt,tmp,obj,member)": _loop("obj", "name", "&bkt", spare="tmp"),
    "hash_for_each_possible(name,obj,member,key)": _loop("obj", "name", "key"),
    "hash_for_each_possible_safe(name,obj,tmp,member,key)": _loop("obj", "name", "key", spare="tmp"),
    "for_each_possible_cpu(cpu)": _loop("cpu", "0"),
    "for_each_online_cpu(cpu)": _loop("cpu", "0"),
}


def _cppcheck_library() -> str:
    defines = [
        f"  <define name={quoteattr(name)} value={quoteattr(value)}/>"
        for name, value in _KERNEL_ITERATORS.items()
    ]
    return '<?xml version="1.0"?>\n<def format="2">\n' + "\n".join(defines) + "\n</def>\n"


_CPPCHECK_LINE = re.compile(r"^\S+:\d+: (error|warning|style|performance|portability|information): ")


def cppcheck(image: str, kbuild: Path, sources: Sequence[Path]) -> CheckResult:
    """cppcheck over C files: warnings, style, performance, portability, and every error that stopped it.

    `kbuild` is accepted for symmetry with sparse; its headers are deliberately not given to cppcheck (see
    _KERNEL_ITERATORS). Any line cppcheck reports is a finding, whatever file it names: an error about a
    macro or a header means the file was not analysed, which must not read as clean.
    """
    if not sources:
        return CheckResult("cppcheck", "(no files)")
    folders = sorted({s.resolve().parent for s in sources})
    mounts = {folder: f"/src{i}:ro" for i, folder in enumerate(folders)}
    files = [f"/src{folders.index(s.resolve().parent)}/{s.name}" for s in sources]
    argv = ["cppcheck", "--quiet", "--enable=warning,style,performance,portability", "--inline-suppr"]
    argv += ["--suppress=missingIncludeSystem", "--suppress=missingInclude", "--suppress=unusedFunction"]
    argv += ["--std=c11", "--error-exitcode=1", "-D__KERNEL__", "-DMODULE", "--library=/cfg/kernel.cfg"]
    argv += [f"--template={CPPCHECK_TEMPLATE}", *files]
    with tempfile.TemporaryDirectory(prefix="cppcheck-") as scratch:
        (Path(scratch) / "kernel.cfg").write_text(_cppcheck_library())
        mounts[Path(scratch)] = "/cfg:ro"
        run = builder.run_in_toolchain(image, argv, mounts, "/", quiet=True, check=False)
    findings = [line for line in run.output.splitlines() if _CPPCHECK_LINE.match(line)]
    if run.returncode != 0 and not findings:
        findings.append(f"cppcheck failed (exit {run.returncode}); see output")
    target = ", ".join(str(f) for f in folders)
    return CheckResult("cppcheck", target, findings, run.output)
