"""A build's debug outputs put to use: vmlinux unpacked for gdb, kernel traces decoded to file:line.

The build keeps vmlinux (with the line tables of CONFIG_DEBUG_INFO_REDUCED) as vmlinux.xz and the kernel's
scripts in kbuild/ (build.layout). When the console scanner caught an oops, a warning or a panic, the
kernel's own scripts/decode_stacktrace.sh turns each frame of its trace (`func+0x1c/0x40 [module]`) into
`func (path/file.c:LINE)`, against vmlinux for the kernel's frames and the module's .ko (built with debug
info too) for a module's; the JUnit failure text then says where the fault is.

Where it runs: in the builder container (kbuild.run_in_toolchain, the Docker seam), not on the host.
- The script needs binutils (nm, addr2line, readelf; objdump and as for the Code: line): the builder image
  has the very binutils whose assembler and linker wrote vmlinux's DWARF, while the host needs only Docker
  and QEMU, and its binutils, if any, may be too old for the toolchain's DWARF version.
- The script is the build's own (kbuild/scripts/, the kernel under test): a patch can change it, so it is
  run as the build's code is, confined: the build user, no network, no capabilities, everything read-only
  but a scratch directory, with a time limit.

A decode only annotates a report. Whatever goes wrong (a build without vmlinux.xz, Docker failing, the time
limit, a script that prints nothing) leaves the raw trace with a note saying why, and the test's outcome is
the same either way.
"""

from __future__ import annotations

import dataclasses
import lzma
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path

from kernel_ci.build import kbuild as builder
from kernel_ci.build.layout import DECODE_SCRIPT, VMLINUX_XZ
from kernel_ci.core.console import console
from kernel_ci.core.errors import KernelCIError
from kernel_ci.guest.protocol import Fault

DECODE_TIMEOUT = 300.0  # seconds for one container decoding every trace of a run
DECODED_LIMIT = 256 * 1024  # characters of a decoded trace read back (a raw one is at most 400 lines)
ERRORS_LIMIT = 2048  # characters of the script's stderr quoted in a note
NOTE_PREFIX = "(kernel-ci: "
# The container's view: the kernel's paths in vmlinux's DWARF start with the build container's source
# tree (kbuild.SRC), which the script strips from each file name.
_SCRIPTS, _VMLINUX, _MODULES, _WORK = "/kci/scripts", "/kci/vmlinux", "/kci/modules", "/kci/work"


def unpack_vmlinux(kernel_dir: Path, dest_dir: Path) -> Path | None:
    """kernel_dir's vmlinux.xz decompressed to dest_dir/vmlinux (once per dest_dir); None when the build
    kept no vmlinux (a build made by an older kernel-ci)."""
    target = dest_dir / "vmlinux"
    if target.is_file():
        return target
    packed = kernel_dir / VMLINUX_XZ
    if not packed.is_file():
        return None
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = dest_dir / ".vmlinux.partial"
    with lzma.open(packed) as source, partial.open("wb") as out:
        shutil.copyfileobj(source, out, 4 << 20)
    partial.chmod(0o644)  # read by the build user in the decode container
    partial.rename(target)
    return target


def with_note(trace: str, why: str) -> str:
    """The raw trace, with a last line saying why it is not decoded."""
    return f"{trace}\n{NOTE_PREFIX}call trace not decoded to file:line: {why})"


def decode_faults(
    faults: Sequence[Fault],
    *,
    image: str,
    kernel_dir: Path,
    work: Path,
    module_dirs: Sequence[Path] = (),
) -> list[Fault]:
    """faults with their traces decoded, all of them in one container run; each fault that could not be
    decoded keeps its raw trace with a note. work: a scratch directory (vmlinux is unpacked there)."""
    if not faults:
        return []
    try:
        vmlinux = unpack_vmlinux(kernel_dir, work)
    except (OSError, lzma.LZMAError, EOFError) as exc:
        return _undecoded(faults, f"{kernel_dir / VMLINUX_XZ} could not be unpacked: {exc}")
    script = kernel_dir / DECODE_SCRIPT
    if vmlinux is None:
        return _undecoded(faults, f"the build has no {VMLINUX_XZ} (built by an older kernel-ci: rebuild)")
    if not script.is_file():
        return _undecoded(faults, f"the build has no {DECODE_SCRIPT}")
    scratch = work / "decode"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for index, fault in enumerate(faults):
        (scratch / f"trace-{index}.txt").write_text(fault.trace + "\n")
    builder.give_to_build_user(scratch)
    mounts = {
        script.parent.resolve(): f"{_SCRIPTS}:ro",
        vmlinux.resolve(): f"{_VMLINUX}:ro",
        scratch.resolve(): _WORK,
    }
    for index, directory in enumerate(d for d in module_dirs if d.is_dir()):
        mounts[directory.resolve()] = f"{_MODULES}/{index}:ro"
    if not any(target.startswith(_MODULES) for target in mounts.values()):
        (scratch / "no-modules").mkdir()  # the script would otherwise look beside vmlinux, then in /lib
        mounts[(scratch / "no-modules").resolve()] = f"{_MODULES}:ro"
    console.print(f"decoding {len(faults)} kernel trace(s) against vmlinux (scripts/decode_stacktrace.sh)")
    try:
        builder.run_in_toolchain(
            image,
            decode_command(len(faults)),
            mounts,
            _WORK,
            quiet=True,
            as_build_user=True,
            timeout=DECODE_TIMEOUT,
        )
    except KernelCIError as exc:  # Docker or the time limit: the traces stay as they were
        return _undecoded(faults, f"the decoder failed: {str(exc)[:ERRORS_LIMIT]}")
    return [_read_decoded(fault, scratch, index) for index, fault in enumerate(faults)]


def decode_command(count: int) -> list[str]:
    """The container's command: decode_stacktrace.sh over trace-N.txt into decoded-N.txt, its stderr into
    errors-N.txt and a failing status into status-N, for N below count; never stopping at a failure."""
    decode = shlex.join(["bash", f"{_SCRIPTS}/decode_stacktrace.sh", _VMLINUX, builder.SRC, _MODULES])
    loop = (
        f"n=0; while [ $n -lt {count} ]; do "
        f"{decode} < trace-$n.txt > decoded-$n.txt 2> errors-$n.txt || echo $? > status-$n; "
        "n=$((n + 1)); done"
    )
    return ["sh", "-c", loop]


def _read_decoded(fault: Fault, scratch: Path, index: int) -> Fault:
    decoded = _read_capped(scratch / f"decoded-{index}.txt", DECODED_LIMIT)
    errors = _read_capped(scratch / f"errors-{index}.txt", ERRORS_LIMIT).strip()
    status = _read_capped(scratch / f"status-{index}", 16).strip()
    if status or not decoded.strip():
        why = f"decode_stacktrace.sh exited {status}" if status else "decode_stacktrace.sh printed nothing"
        return dataclasses.replace(
            fault, trace=with_note(fault.trace, why + (f": {errors}" if errors else ""))
        )
    trace = decoded.rstrip("\n")
    if errors:  # e.g. "WARNING! Modules path isn't set": some frames stay undecoded, the rest is good
        trace += f"\n{NOTE_PREFIX}decode_stacktrace.sh: {errors})"
    return dataclasses.replace(fault, trace=trace)


def _read_capped(path: Path, limit: int) -> str:
    """At most limit characters of a file the container wrote ("" when it wrote none)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(limit * 4)
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if len(text) > limit:
        return text[:limit] + f"\n{NOTE_PREFIX}cut at {limit} characters)"
    return text


def _undecoded(faults: Sequence[Fault], why: str) -> list[Fault]:
    return [dataclasses.replace(fault, trace=with_note(fault.trace, why)) for fault in faults]


__all__ = ["DECODE_TIMEOUT", "decode_command", "decode_faults", "unpack_vmlinux", "with_note"]
