"""The payload the guest mounts read-only at /kci: runner, plan.json, suites and modules (PROTOCOL.md).

plan.json's layout (`Plan`) is in kernel_ci.guest.protocol, since the report reads it back.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from kernel_ci.core.errors import InfrastructureError
from kernel_ci.core.paths import GUEST_RUNNER
from kernel_ci.guest import protocol
from kernel_ci.guest.protocol import Plan, PlanSuite
from kernel_ci.guest.suites import Suite

RUNNER = GUEST_RUNNER
KTAP_LIB = ("lib/ktap.c",)
PYTEST_ARGV = (
    "python3",
    "-m",
    "pytest",
    "-q",
    "-p",
    "no:cacheprovider",
    "-o",
    "junit_logging=all",
    "--junitxml",
    "$KCI_JUNIT",
)

KSELFTEST_ARGV = ("sh", "./kci-kselftest.sh")  # -> kselftest's own run_kselftest.sh (TAP 13 per binary)
# kselftest's runner.sh writes the tests' output to /dev/stdout, which the guest's devtmpfs (no udev) does
# not have: the redirection would create a regular file there and the output would be lost.
KSELFTEST_WRAPPER = """\
#!/bin/sh
# kci: the /dev links udev would make, then kselftest's own runner.
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout
ln -sfn /proc/self/fd/2 /dev/stderr
exec sh ./run_kselftest.sh "$@"
"""

# compile_c(src_dir, c_files, out_binary): build a static binary from c_files (paths relative to src_dir,
# a folder holding "<suite>/" and "lib/", so "lib/ktap.c" and the suite's own "<suite>/x.c" are both under
# it, and a suite's `#include "../lib/ktap.h"` finds the lib wherever each came from: _build_c stages them).
CompileC = Callable[[Path, list[str], Path], None]


class PayloadError(InfrastructureError):
    """The payload cannot be assembled (missing module, clashing file names, non-empty destination)."""


def read_plan(path: Path) -> Plan:
    """plan.json, as written by assemble_payload."""
    try:
        return protocol.read_plan(path)
    except protocol.PlanError as exc:
        raise PayloadError(str(exc)) from exc


def assemble_payload(
    suites: Sequence[Suite],
    dest: Path,
    kernel_release: str,
    compile_c: CompileC,
    module_kos: Mapping[str, Path],
    *,
    runner: Path = RUNNER,
    kselftest_dir: Path | None = None,
    attempt: int = 0,
) -> Path:
    """Write dest/kci-runner.py, dest/plan.json, dest/suites/<name>/... and dest/modules/*.ko.

    module_kos maps a module folder name (as the manifests name it) to its built .ko file.
    kselftest_dir is the build's kselftest install tree (outputs' kselftest/), for kselftest suites.
    attempt: 0 for a run, n for its n-th retry (the plan's attempt, $KCI_ATTEMPT in the guest).
    """
    if dest.exists() and any(dest.iterdir()):
        raise PayloadError(f"{dest}: payload destination is not empty")
    kos = _module_files(suites, module_kos)
    (dest / "modules").mkdir(parents=True, exist_ok=True)
    for name, ko in kos.items():
        shutil.copyfile(ko, dest / "modules" / name)
    shutil.copyfile(runner, dest / "kci-runner.py")
    planned = []
    for suite in suites:
        workdir = Path("suites") / suite.name
        (dest / workdir).mkdir(parents=True)
        expected: tuple[tuple[str, str], ...] = ()
        cut: tuple[tuple[str, str, float], ...] = ()
        if suite.language == "c":
            argv = _build_c(suite, dest / workdir, compile_c)
        elif suite.language == "kselftest":
            argv = _copy_kselftest(suite, dest / workdir, kselftest_dir)
            expected = tuple(
                (x.testcase, x.reason) for x in suite.expected_failures if x.applies_to(kernel_release)
            )
            cut = tuple(
                (x.test, x.case, x.timeout)
                for x in suite.expected_failures
                if x.timeout is not None and x.applies_to(kernel_release)
            )
        else:
            argv = _copy_python(suite, dest / workdir)
        planned.append(
            PlanSuite(
                name=suite.name,
                language=suite.language,
                timeout=suite.timeout,
                modules=tuple(f"modules/{module_kos[m].name}" for m in suite.modules),
                argv=argv,
                workdir=workdir.as_posix(),
                junit=suite.language == "python",
                expected_failures=expected,
                case_timeouts=cut,
            )
        )
    plan = Plan(kernel_release, tuple(planned), attempt)
    protocol.write_plan(plan, dest / "plan.json")
    return dest


def _module_files(suites: Sequence[Suite], module_kos: Mapping[str, Path]) -> dict[str, Path]:
    """The .ko files to ship, by file name; every module a suite names must have been built."""
    wanted = list(dict.fromkeys(m for suite in suites for m in suite.all_modules))
    missing = [m for m in wanted if m not in module_kos]
    if missing:
        raise PayloadError(f"no built .ko for module folder(s) {', '.join(missing)} (needed by the suites)")
    files: dict[str, Path] = {}
    for module in wanted:
        ko = module_kos[module]
        if not ko.is_file():
            raise PayloadError(f"module {module}: {ko} does not exist")
        if ko.name in files and files[ko.name] != ko:
            raise PayloadError(f"two modules would both be shipped as modules/{ko.name}")
        files[ko.name] = ko
    return files


def _build_c(suite: Suite, out_dir: Path, compile_c: CompileC) -> tuple[str, ...]:
    """The suite's sources and its KTAP lib (suite.lib: the project's or the packaged one) side by side in
    a staging folder, as <suite>/ and lib/, compiled from there into one static binary."""
    binary = out_dir / suite.name
    sources = [f"{suite.name}/{src}" for src in suite.sources] + list(KTAP_LIB)
    with tempfile.TemporaryDirectory(prefix="kci-csrc-") as tmp:
        staged = Path(tmp)
        shutil.copytree(suite.path, staged / suite.name)
        shutil.copytree(suite.lib, staged / "lib")
        compile_c(staged, sources, binary)
    if not binary.is_file():
        raise PayloadError(f"suite {suite.name}: the C compiler produced no {binary}")
    binary.chmod(0o755)
    return (f"./{suite.name}",)


def _copy_python(suite: Suite, out_dir: Path) -> tuple[str, ...]:
    for source in suite.sources:
        target = out_dir / source
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(suite.path / source, target)
    return (*PYTEST_ARGV, *suite.sources)


def _copy_kselftest(suite: Suite, out_dir: Path, kselftest_dir: Path | None) -> tuple[str, ...]:
    """kselftest's runner and the suite's targets from the build's install tree; the test list keeps only
    the suite's targets, so run_kselftest.sh runs exactly those."""
    hint = f"build the kernel with this suite (kernel-ci build --suite {suite.name})"
    if kselftest_dir is None or not (kselftest_dir / "kselftest-list.txt").is_file():
        raise PayloadError(f"suite {suite.name}: the build has no kselftests ({kselftest_dir}): {hint}")
    missing = [t for t in suite.targets if not (kselftest_dir / t).is_dir()]
    if missing:
        raise PayloadError(
            f"suite {suite.name}: the build has no kselftest target {', '.join(missing)}: {hint}"
        )
    shutil.copy2(kselftest_dir / "run_kselftest.sh", out_dir / "run_kselftest.sh")
    shutil.copytree(kselftest_dir / "kselftest", out_dir / "kselftest")
    for target in suite.targets:
        shutil.copytree(kselftest_dir / target, out_dir / target, symlinks=True)
    wanted = set(suite.targets)
    lines = (kselftest_dir / "kselftest-list.txt").read_text().splitlines()
    entries = [line for line in lines if line.partition(":")[0] in wanted]
    if not entries:
        raise PayloadError(
            f"suite {suite.name}: kselftest-list.txt lists no test of {', '.join(suite.targets)}"
        )
    (out_dir / "kselftest-list.txt").write_text("\n".join(entries) + "\n")
    wrapper = out_dir / "kci-kselftest.sh"
    wrapper.write_text(KSELFTEST_WRAPPER)
    wrapper.chmod(0o755)
    return KSELFTEST_ARGV
