"""build.debuginfo without a VM: what the scanner hands the decoder, vmlinux unpacking, the decode's
container command and how its files are read back, and every fallback to the raw trace.

The decode itself (decode_stacktrace.sh in the builder container against a real vmlinux and .ko) runs in
tests/e2e/test_oops_decode.py: a vmlinux with line tables is a kernel build away.
"""

from __future__ import annotations

import dataclasses
import lzma
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_ci.build import debuginfo
from kernel_ci.build.artifacts import gdb_loader_importing_each, python_int_literals
from kernel_ci.build.layout import DECODE_SCRIPT, VMLINUX_XZ
from kernel_ci.guest.protocol import EndKind, Plan
from kernel_ci.guest.scanner import scan
from kernel_ci.report import junit, verdict
from kernel_ci.report.model import GuestEnd

DATA = Path(__file__).parent / "data" / "console"
# decode_stacktrace.sh's test for "this line has an address to translate" (its `[[ $line =~ ... ]]`)
SCRIPT_FRAME = re.compile(r"[^+ ]+\+0x[0-9a-f]+/0x[0-9a-f]+")


def oops_faults():
    return scan((DATA / "oops_in_suite.log").read_text()).faults


def test_the_scanned_trace_carries_every_frame_the_decoder_translates() -> None:
    (fault,) = oops_faults()
    lines = fault.trace.splitlines()
    frames = [line for line in lines if SCRIPT_FRAME.search(line)]
    # the faulting instruction (in the module: decoded against its .ko) and the whole call trace
    assert frames[0] == "RIP: 0010:kci_smoke_write+0x15/0x30 [kci_smoke]"
    assert [f.strip() for f in frames[1:6]] == [
        "proc_reg_write+0x51/0x90",
        "vfs_write+0xc1/0x260",
        "ksys_write+0x5f/0xe0",
        "do_syscall_64+0x33/0x40",
        "entry_SYSCALL_64_after_hwframe+0x61/0xc6",
    ]
    # timestamps are gone (the script would reformat them), the Code: line it disassembles is kept
    assert not any(line.startswith("[") for line in lines)
    assert any(line.startswith("Code: ") for line in lines)


def test_vmlinux_is_unpacked_once_into_the_run_dir(tmp_path: Path) -> None:
    kernel_dir, run_dir = tmp_path / "build", tmp_path / "run"
    kernel_dir.mkdir()
    assert debuginfo.unpack_vmlinux(kernel_dir, run_dir) is None  # an older build: no vmlinux.xz
    body = b"\x7fELF" + bytes(range(256)) * 1000
    (kernel_dir / VMLINUX_XZ).write_bytes(lzma.compress(body, check=lzma.CHECK_CRC32))
    vmlinux = debuginfo.unpack_vmlinux(kernel_dir, run_dir)
    assert vmlinux == run_dir / "vmlinux" and vmlinux.read_bytes() == body
    assert vmlinux.stat().st_mode & 0o777 == 0o644  # the decode container's build user reads it
    assert [p.name for p in run_dir.iterdir()] == ["vmlinux"]  # no partial file left
    (kernel_dir / VMLINUX_XZ).write_bytes(b"not xz")
    assert debuginfo.unpack_vmlinux(kernel_dir, run_dir) == vmlinux  # once: not unpacked again


def test_the_xz_tool_of_the_builder_writes_what_unpack_reads(tmp_path: Path) -> None:
    """The build compresses with xz(1) multithreaded (several blocks); Python's lzma reads them all."""
    body = bytes(range(256)) * 40000
    (tmp_path / "vmlinux").write_bytes(body)
    packed = subprocess.run(
        ["xz", "-1", "-T2", "--block-size=1MiB", "--check=crc32", "-c", str(tmp_path / "vmlinux")],
        capture_output=True,
        check=True,
    ).stdout
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / VMLINUX_XZ).write_bytes(packed)
    unpacked = debuginfo.unpack_vmlinux(tmp_path / "build", tmp_path / "run")
    assert unpacked is not None and unpacked.read_bytes() == body


def test_a_build_without_vmlinux_keeps_the_raw_trace_with_a_note(tmp_path: Path) -> None:
    faults = oops_faults()
    decoded = debuginfo.decode_faults(faults, image="unused", kernel_dir=tmp_path, work=tmp_path / "run")
    (fault,) = decoded
    assert fault.trace.startswith(faults[0].trace + "\n")
    assert fault.trace.endswith(f"(kernel-ci: call trace not decoded to file:line: the build has no "
                                f"{VMLINUX_XZ} (built by an older kernel-ci: rebuild))")  # fmt: skip
    assert dataclasses.replace(fault, trace=faults[0].trace) == faults[0]  # nothing else changed


def test_a_corrupt_vmlinux_xz_or_a_missing_script_keeps_the_raw_trace(tmp_path: Path) -> None:
    faults = oops_faults()
    (tmp_path / VMLINUX_XZ).write_bytes(b"not xz at all")
    (fault,) = debuginfo.decode_faults(faults, image="unused", kernel_dir=tmp_path, work=tmp_path / "a")
    assert "could not be unpacked" in fault.trace.splitlines()[-1]
    (tmp_path / VMLINUX_XZ).write_bytes(lzma.compress(b"\x7fELF"))
    (fault,) = debuginfo.decode_faults(faults, image="unused", kernel_dir=tmp_path, work=tmp_path / "b")
    assert fault.trace.splitlines()[-1].endswith(f"the build has no {DECODE_SCRIPT})")


def test_no_fault_decodes_nothing(tmp_path: Path) -> None:
    assert debuginfo.decode_faults([], image="unused", kernel_dir=tmp_path, work=tmp_path) == []
    assert not list(tmp_path.iterdir())


def test_the_decode_command_decodes_every_trace_and_survives_a_failing_one(tmp_path: Path) -> None:
    """The container's loop, run by a real sh over the protocol files; the kernel's script is replaced by
    one that fails on the second trace, in a copy of the loop whose paths point at tmp_path."""
    argv = debuginfo.decode_command(3)
    assert argv[:2] == ["sh", "-c"]
    script = tmp_path / "decode_stacktrace.sh"
    script.write_text(
        'read first; [ "$first" = two ] && { echo broken >&2; exit 3; }; echo "decoded $first"\n'
    )
    loop = argv[2].replace("/kci/scripts/decode_stacktrace.sh", str(script))
    for index, word in enumerate(["one", "two", "three"]):
        (tmp_path / f"trace-{index}.txt").write_text(word + "\n")
    subprocess.run(["sh", "-c", loop], cwd=tmp_path, check=True)
    assert (tmp_path / "decoded-0.txt").read_text() == "decoded one\n"
    assert (tmp_path / "errors-1.txt").read_text() == "broken\n"
    assert (tmp_path / "status-1").read_text() == "3\n"
    assert (tmp_path / "decoded-2.txt").read_text() == "decoded three\n"
    assert not (tmp_path / "status-0").exists() and not (tmp_path / "status-2").exists()
    faults = oops_faults() * 3
    read = [debuginfo._read_decoded(fault, tmp_path, index) for index, fault in enumerate(faults)]
    assert read[0].trace == "decoded one"
    assert read[1].trace.startswith(faults[1].trace)
    assert read[1].trace.endswith("not decoded to file:line: decode_stacktrace.sh exited 3: broken)")
    assert read[2].trace == "decoded three"


def test_what_the_script_prints_is_read_back_bounded(tmp_path: Path) -> None:
    (fault,) = oops_faults()
    (tmp_path / "decoded-0.txt").write_text("RIP: 0010:f (a.c:1)\n" * 20000)
    (tmp_path / "errors-0.txt").write_text(
        "WARNING! Modules path isn't set, but is needed to parse this symbol\n"
    )
    read = debuginfo._read_decoded(fault, tmp_path, 0)
    assert len(read.trace) < debuginfo.DECODED_LIMIT + 200
    assert f"cut at {debuginfo.DECODED_LIMIT} characters" in read.trace
    assert read.trace.endswith("(kernel-ci: decode_stacktrace.sh: WARNING! Modules path isn't set, but is "
                               "needed to parse this symbol)")  # fmt: skip
    (tmp_path / "decoded-0.txt").write_text("\n\n")
    (tmp_path / "errors-0.txt").write_text("")
    assert debuginfo._read_decoded(fault, tmp_path, 0).trace.endswith("decode_stacktrace.sh printed nothing)")


@pytest.mark.parametrize("decoded", [True, False])
def test_the_junit_failure_text_carries_the_trace_the_decoder_left(tmp_path: Path, decoded: bool) -> None:
    """Decoded or not, the oops is the same failed case of its suite: only its text differs."""
    report = scan((DATA / "oops_in_suite.log").read_text())
    (fault,) = report.faults
    trace = (
        fault.trace.replace("kci_smoke_write+0x15/0x30", "kci_smoke_write (/mod/kci_smoke.c:42)")
        if decoded
        else debuginfo.with_note(fault.trace, "Docker failed")
    )
    report = dataclasses.replace(report, faults=[dataclasses.replace(fault, trace=trace)])
    end = GuestEnd(kind=EndKind.POWEROFF, detail="", console_tail="", sysrq_dump="", console_dropped_bytes=0)
    run = verdict.collect(Plan("5.10.223-kci", ()), tmp_path, report, end)
    junit.write_junit(run, tmp_path / "junit.xml")
    text = (tmp_path / "junit.xml").read_text()
    assert ("kci_smoke.c:42" in text) == decoded
    assert ("not decoded to file:line: Docker failed" in text) != decoded
    (case,) = [c for s in run.suites for c in s.cases if c.name.startswith("kernel: BUG")]
    assert case.state == "failed" and case.message.startswith("oops: BUG: kernel NULL pointer dereference")


def test_the_gdb_constants_become_python() -> None:
    """5.10's generated scripts/gdb/linux/constants.py has C literals (BIT(0) -> 1UL): Python refused it."""
    generated = (
        "import gdb\nif 1:\n"
        '    LX_CLK_GET_RATE_NOCACHE = gdb.parse_and_eval("((((1UL))) << (6))")\n'
        "LX_SB_RDONLY = ((((1UL))) << (0))\nLX_BIG = 0x10ULL + 4u + 7L\nLX_MNT_NOSUID = 0x01\n"
        "LX_OF_DT_HEADER = 0xd00dfeed\nLX_1UL_NAME = LX_MNT_NOSUID\n"
    )
    with pytest.raises(SyntaxError):
        compile(generated, "constants.py", "exec")
    fixed = python_int_literals(generated)
    compile(fixed, "constants.py", "exec")
    assert "LX_SB_RDONLY = ((((1))) << (0))" in fixed and "LX_BIG = 0x10 + 4 + 7" in fixed
    assert "0xd00dfeed" in fixed and "LX_1UL_NAME = LX_MNT_NOSUID" in fixed


LOADER = """import os

sys.path.insert(0, os.path.dirname(__file__) + "/scripts/gdb")

try:
    gdb.parse_and_eval("0")
except:
    gdb.write("NOTE: gdb 7.2 or later required\\n")
else:
    import linux.utils
    import linux.proc
    import linux.timerlist
"""


def test_the_gdb_loader_imports_each_module_on_its_own(tmp_path: Path) -> None:
    """A module that fails at import (linux.proc: no struct mount in reduced debug info) no longer stops
    those after it; run by Python with a stand-in for gdb's own module and a scripts package."""
    loader = gdb_loader_importing_each(LOADER)
    assert "import linux." not in loader and "_kci_import('linux.timerlist')" in loader
    package = tmp_path / "scripts" / "gdb" / "linux"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "utils.py").write_text("LOADED.append('utils')\n")
    (package / "proc.py").write_text("raise RuntimeError('No struct type named mount.')\n")
    (package / "timerlist.py").write_text("LOADED.append('timerlist')\n")
    (tmp_path / "vmlinux-gdb.py").write_text(loader)
    script = tmp_path / "run.py"
    script.write_text(
        "import builtins, sys, types\n"
        "written = []\n"
        "gdb = types.SimpleNamespace(parse_and_eval=lambda e: 0, write=written.append)\n"
        "builtins.LOADED = []\n"
        f"__file__ = {str(tmp_path / 'vmlinux-gdb.py')!r}\n"
        "exec(open(__file__).read())\n"
        "print(LOADED, written)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("['utils', 'timerlist']"), result.stdout + result.stderr
    assert "kernel-ci: linux.proc not loaded (No struct type named mount.)" in result.stdout
    assert gdb_loader_importing_each("print('no imports')\n") == "print('no imports')\n"
