"""The test half of the pipeline: built kernel -> rootfs overlay -> QEMU -> guest suites -> JUnit.

It composes the stages (suites, payload, rootfs, qemu, scanner, report); none of them knows the others.
run.json (report.model.RunRecord) is written here and only here.
A run lives in out/runs/<time>/: payload/, results/, console.log, qemu-cmdline.sh, run.json, junit.xml
(and overlay.qcow2 when kept). out/junit.xml and out/latest point at the newest run.
With several guests (--guests, kernel_ci.guest.placement) each guest is a complete run of its own suites
in out/runs/<time>/guest-<n>/ (`kernel-ci repro` reboots one), and the run dir holds what they make
together: junit.xml (report.verdict.merge_guests), run.json (its `guests`) and their console.logs in one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kernel_ci.build import debuginfo, extmodules, images, kconfig
from kernel_ci.build import kbuild as builder
from kernel_ci.build.layout import EXTMOD_DIR, GDB_SCRIPT
from kernel_ci.build.records import BuildMetadata
from kernel_ci.core.console import console, step, warn
from kernel_ci.core.errors import UsageError
from kernel_ci.core.paths import CONTAINERS, GUEST_INIT, MODULE_PATH, SUITE_PATH, cache_dir
from kernel_ci.guest import binaries, interactive, payload, placement, qemu, rootfs, scanner, suites
from kernel_ci.guest.protocol import ConsoleReport
from kernel_ci.guest.suites import SuiteRoots
from kernel_ci.host import setup as hostsetup
from kernel_ci.report import junit, render, verdict
from kernel_ci.report.model import GuestEnd, Outcome, RootfsRef, RunRecord, RunReport

ROOTFS_RECIPE = CONTAINERS / "rootfs"
C_FLAGS = ("-static", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-std=gnu11")


@dataclass
class TestOptions:
    __test__ = False  # not a pytest test class

    kernel_dir: Path  # a build output dir (bzImage, config, kbuild/, metadata.json)
    output: Path
    suites: Sequence[str] | None = None
    # where the suite folders are: a folder, or a suite path (Project.suite_path; tests use their own)
    suites_dir: SuiteRoots = SUITE_PATH
    # the project's module path (Project.module_path: its kernel-modules/, then the packaged defaults),
    # for a module the build did not carry
    modules_dir: extmodules.ModuleRoots = MODULE_PATH
    memory: str = "1024M"
    cpus: int = 2
    accel: str = "auto"
    append: str = ""
    boot_timeout: float = 120.0
    idle_timeout: float = 120.0
    timeout: float = 1800.0
    keep_overlay: bool = False
    attempt: int = 0  # 0: a run; n: its n-th retry in a fresh guest (flow/attribute.py); $KCI_ATTEMPT
    extra_properties: dict[str, str] = field(default_factory=dict)
    gdb_port: int | None = None  # QEMU's gdbstub on 127.0.0.1:PORT (and nokaslr); None: none
    guests: int | None = None  # guests booted at once, each running a share of the suites; None: auto
    warm_start: bool = True  # restore the kernel's saved booted guest instead of booting (guest.warmstart)


# The guest machine's options: a rerun of a run (repro, attribution's retries and prefixes) keeps them.
MACHINE_OPTIONS = (
    "memory",
    "cpus",
    "accel",
    "append",
    "boot_timeout",
    "idle_timeout",
    "timeout",
    "guests",
    "warm_start",
)
SUITE_TIMES = "suite-times.json"  # in the cache: each suite's seconds in its last run (placement's hint)


def _runnable(chosen: list[suites.Suite], kernel_config: str) -> list[suites.Suite]:
    """Suites whose required kconfig the kernel has; the others are dropped with a warning."""
    keep = []
    for suite in chosen:
        merged = kconfig.merge([kconfig.Fragment(f"suite {suite.name}", "\n".join(suite.kconfig) + "\n")])
        lost = kconfig.verify(kernel_config, merged.requests)
        if lost:
            warn(f"suite {suite.name} skipped: " + "; ".join(item.describe() for item in lost))
        else:
            keep.append(suite)
    return keep


def module_files(
    image: str,
    kernel_dir: Path,
    names: Sequence[str],
    work: Path,
    modules_dir: extmodules.ModuleRoots = MODULE_PATH,
) -> dict[str, Path]:
    """The .ko of each named module folder (along the module path): from the build's outputs (extmod/),
    else built now against the build's kbuild tree (a build made with external modules off, or a module
    added since)."""
    found: dict[str, Path] = {}
    for name in names:
        kos = sorted((kernel_dir / "extmod" / name).glob("*.ko"))
        if not kos:
            (module,) = extmodules.discover(modules_dir, [name])
            kos = extmodules.build(image, kernel_dir / "kbuild", module, work)
        if len(kos) != 1:
            raise payload.PayloadError(f"module {name}: expected one .ko, found {[k.name for k in kos]}")
        found[name] = kos[0]
    return found


def cached_c_compiler(image: str) -> Callable[[Path, list[str], Path], None]:
    """c_compiler behind the guest binary cache (kernel_ci.guest.binaries): an unchanged suite is not
    compiled again; the key has the toolchain image's id, so a new compiler compiles afresh."""
    toolchain_id = images.toolchain(image).image_id
    return binaries.cached_compiler(c_compiler(image), toolchain_id, C_FLAGS, cache_dir("guest-binaries"))


def c_compiler(image: str) -> Callable[[Path, list[str], Path], None]:
    """compile_c for the payload: static binaries built in the builder container."""

    def compile_c(src_dir: Path, c_files: list[str], out_binary: Path) -> None:
        builder.run_in_toolchain(
            image,
            [
                "gcc",
                *C_FLAGS,
                "-I",
                "/src/lib",
                "-o",
                f"/out/{out_binary.name}",
                *[f"/src/{f}" for f in c_files],
            ],
            {src_dir.resolve(): "/src:ro", out_binary.parent.resolve(): "/out"},
            "/out",
            quiet=True,
        )

    return compile_c


class GuestsStopped(Exception):
    """Raised in a guest's console feed when another guest of the run failed or the run was interrupted:
    qemu.run_guest stops that guest's QEMU and lets it through."""


class _LiveConsole:
    """Feeds the console scanner and shows the run's phases (markers, faults) as they happen."""

    def __init__(self, label: str = "guest", stop: threading.Event | None = None) -> None:
        self.scanner = scanner.ConsoleScanner()
        self.label = label
        self.stop = stop

    def __call__(self, line: str) -> None:
        if self.stop is not None and self.stop.is_set():
            raise GuestsStopped(
                f"{self.label} stopped: another guest of the run failed, or it was interrupted"
            )
        for event in self.scanner.feed(line):
            text = _describe(event)
            if text:
                console.print(f"[dim]{self.label}:[/] {text}", highlight=False)


def _describe(event: scanner.Event) -> str:
    match event:
        case scanner.InitReady():
            return "init ready"
        case scanner.InitFailed():
            return "[red]init could not start the runner[/]"
        case scanner.SuiteStarted(name=name):
            return f"suite {name} started"
        case scanner.SuiteEnded(span=span):
            return f"suite {span.name} ended"
        case scanner.RunnerDone():
            return "all suites done"
        case scanner.FaultStarted(kind=kind, title=title):
            return f"[bold red]{kind}[/]: {title}"
    return ""


def needs_toolchain(chosen: Sequence[suites.Suite], kernel_dir: Path) -> bool:
    """Whether the payload needs the builder container: a C suite to compile, or a module the build did
    not carry (extmod/<name>/*.ko) to build now. Python and kselftest suites with the build's own modules
    need neither, so that run needs no Docker at all."""
    if any(s.language == "c" for s in chosen):
        return True
    names = dict.fromkeys(m for s in chosen for m in s.all_modules)
    return any(not any((kernel_dir / "extmod" / name).glob("*.ko")) for name in names)


def run_tests(options: TestOptions) -> RunReport:
    hostsetup.prepare_test_host()
    kernel_dir = options.kernel_dir
    metadata = BuildMetadata.read(kernel_dir)
    found = suites.load_suites(options.suites_dir, options.suites)
    chosen = _runnable(found, (kernel_dir / "config").read_text())
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    runs = options.output / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{stamp}-", dir=runs))

    step(f"payload: {len(chosen)} suite(s)")
    image = ""  # the builder image, only when something must be compiled (no Docker otherwise)
    if needs_toolchain(chosen, kernel_dir):
        hostsetup.prepare_build_host()
        image = images.ensure_builder_image()
    module_names = list(dict.fromkeys(m for s in chosen for m in s.all_modules))
    module_kos = module_files(image, kernel_dir, module_names, run_dir / "modules-build", options.modules_dir)
    groups = guest_groups(chosen, options)
    many = len(groups) > 1
    payloads = [
        payload.assemble_payload(
            group,
            (run_dir / f"guest-{number}" if many else run_dir) / "payload",
            metadata.kernel.release,
            cached_c_compiler(image) if image else _no_compiler,
            module_kos,
            kselftest_dir=kernel_dir / "kselftest",
            attempt=options.attempt,
        )
        for number, group in enumerate(groups, 1)
    ]
    step("rootfs")
    base = rootfs.ensure_rootfs(ROOTFS_RECIPE, GUEST_INIT)
    record = RunRecord(
        created=stamp,
        build_key=metadata.build_key,
        kernel_dir=str(kernel_dir.resolve()),
        kernel=asdict(metadata.kernel),
        reproduce_build=metadata.reproduce,
        rootfs=RootfsRef(base.key, str(base.path)),
        suites=tuple(s.name for s in chosen),
        options={k: _plain(v) for k, v in asdict(options).items()},
    )
    bzimage = kernel_dir / "bzImage"
    if many:
        report = boot_guests(run_dir, groups, bzimage, base.path, payloads, metadata, options, record)
    else:
        report = boot_and_collect(run_dir, bzimage, base.path, payloads[0], metadata, options, record)
    hint = _hint_suffix(options)
    placement.record_times(
        cache_dir() / SUITE_TIMES, {n + hint: t for n, t in _suite_seconds(report).items()}
    )
    _publish(options.output, run_dir)
    return report


def guest_groups(chosen: Sequence[suites.Suite], options: TestOptions) -> list[list[suites.Suite]]:
    """The suites of each guest: all in one (one suite, --gdb, --guests 1), else placement's split."""
    names = [s.name for s in chosen]
    if len(names) < 2 or options.gdb_port is not None or options.guests == 1:
        return [list(chosen)]
    kept, hint = placement.load_times(cache_dir() / SUITE_TIMES), _hint_suffix(options)
    times = {name: kept[name + hint] for name in names if name + hint in kept}
    count = options.guests or placement.auto_guests(
        names, times, placement.memory_mib(options.memory), free_mib=placement.available_mib()
    )
    by_name = {s.name: s for s in chosen}
    return [[by_name[name] for name in group] for group in placement.split(names, count, times)]


def _hint_suffix(options: TestOptions) -> str:
    """Suite times are kept apart per kernel command line addition: a suite run with --append is another
    workload (the bench's kci.bench=1 makes the tracer suite measure for minutes, and the next plain run
    then gave it a guest of its own)."""
    return f" [{' '.join(options.append.split())}]" if options.append.strip() else ""


def _suite_seconds(report: RunReport) -> dict[str, float]:
    """Each suite's own seconds in this run (not the boot pseudo-suite): placement's hint for the next."""
    return {
        s.name: s.seconds for s in report.suites if s.name != verdict.BOOT_SUITE and s.seconds is not None
    }


def boot_guests(
    run_dir: Path,
    groups: Sequence[Sequence[suites.Suite]],
    bzimage: Path,
    base_image: Path,
    payloads: Sequence[Path],
    metadata: BuildMetadata,
    options: TestOptions,
    record: RunRecord,
) -> RunReport:
    """Boot one guest per group at once (a thread each: QEMU does the work), each a complete run in
    run_dir/guest-<n>; then one report, JUnit, run.json and console.log for the run. A guest whose run
    raises (kernel-ci's own failure, not the guest's) stops the others, as Ctrl-C does."""
    names = [f"guest-{number}" for number in range(1, len(groups) + 1)]
    plan = "; ".join(
        f"{name}: {', '.join(s.name for s in group)}" for name, group in zip(names, groups, strict=True)
    )
    step(f"boot {len(groups)} guests at once ({plan})")
    stop = threading.Event()
    outcomes: list[RunReport | BaseException | None] = [None] * len(groups)

    def run_one(index: int) -> None:
        try:
            outcomes[index] = boot_and_collect(
                run_dir / names[index],
                bzimage,
                base_image,
                payloads[index],
                metadata,
                options,
                dataclasses.replace(record, suites=tuple(s.name for s in groups[index])),
                label=names[index].replace("-", " "),
                stop=stop,
                show=False,
            )
        except BaseException as exc:  # handed to the main thread, which raises it
            outcomes[index] = exc
            stop.set()

    started = datetime.now(UTC)
    threads = [
        threading.Thread(target=run_one, args=(i,), name=names[i], daemon=True) for i in range(len(groups))
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)  # a timed join: Ctrl-C reaches this thread
    except BaseException:
        stop.set()  # each guest stops at its next console line; a daemon thread's QEMU dies with us
        raise
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:  # the guest's own failure, not the GuestsStopped it caused in the others
        raise next((e for e in errors if not isinstance(e, GuestsStopped)), errors[0])
    reports = [o for o in outcomes if isinstance(o, RunReport)]
    report = verdict.merge_guests(reports, record.suites)
    junit.write_junit(report, run_dir / "junit.xml")
    _join_consoles(run_dir, names, groups)
    guest_records = [RunRecord.read(run_dir / name) for name in names]
    outcome = report.outcome if report.outcome is not None else Outcome.INFRA_FAILURE
    boots = [r.boot_seconds for r in guest_records if r.boot_seconds is not None]
    first = [r.first_test_seconds for r in guest_records if r.first_test_seconds is not None]
    dataclasses.replace(
        record,
        accelerator=guest_records[0].accelerator,
        outcome=outcome.name,
        exit_code=int(outcome),
        guest_end=max(guest_records, key=lambda r: Outcome[r.outcome].severity).guest_end,
        seconds=round((datetime.now(UTC) - started).total_seconds(), 2),
        boot_seconds=max(boots) if boots else None,
        first_test_seconds=min(first) if first else None,
        guests=tuple(names),
    ).write(run_dir)
    console.print(render.render_report(report))
    console.print(f"run: {run_dir}  ({len(groups)} guests; reproduce one: kernel-ci repro {run_dir}/guest-N)")
    return report


def _join_consoles(run_dir: Path, names: Sequence[str], groups: Sequence[Sequence[suites.Suite]]) -> None:
    """run_dir/console.log: each guest's console.log after a line naming the guest and its suites (what
    the cache service and CI keep of a run)."""
    with (run_dir / "console.log").open("wb") as joined:
        for name, group in zip(names, groups, strict=True):
            joined.write(f"===== kernel-ci: {name} ({', '.join(s.name for s in group)}) =====\n".encode())
            with contextlib.suppress(FileNotFoundError), (run_dir / name / "console.log").open("rb") as log:
                shutil.copyfileobj(log, joined)


def _no_compiler(src_dir: Path, c_files: list[str], out_binary: Path) -> None:
    """compile_c of a payload that needs_toolchain said has nothing to compile."""
    raise payload.PayloadError(f"no C compiler for {out_binary.name}: needs_toolchain missed a C suite")


def _plain(value: object) -> object:
    """An option as run.json holds it: paths as strings, a suite path as a list of them."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list) and all(isinstance(v, Path) for v in value):
        return [str(v) for v in value]
    return value


def boot_and_collect(
    run_dir: Path,
    bzimage: Path,
    base_image: Path,
    payload_dir: Path,
    metadata: BuildMetadata,
    options: TestOptions,
    record: RunRecord,
    *,
    label: str = "guest",
    stop: threading.Event | None = None,
    show: bool = True,
) -> RunReport:
    """Boot a fresh overlay with the payload, watch the console, turn what came back into a report.
    label names the guest on the terminal; stop ends it early (boot_guests); show: print the report."""
    if show:
        step("boot")
    kernel_dir = bzimage.parent
    accel = qemu.choose_accelerator(bzimage, options.accel)
    append = tuple(options.append.split())
    extra_args: tuple[str, ...] = ()
    if options.gdb_port is not None:
        append += ("nokaslr",)
        extra_args = ("-gdb", f"tcp:127.0.0.1:{options.gdb_port}")
        vmlinux = debuginfo.unpack_vmlinux(kernel_dir, run_dir)
        console.print(f"[bold]gdb[/]: {gdb_command(kernel_dir, vmlinux, options.gdb_port)}", soft_wrap=True)
    overlay = qemu.create_overlay(base_image, run_dir)
    results_dir = run_dir / "results"
    results_dir.mkdir(exist_ok=True)
    cfg = qemu.QemuConfig(
        kernel=bzimage,
        overlay=overlay,
        payload_dir=payload_dir,
        results_dir=results_dir,
        run_dir=run_dir,
        accel=accel,
        memory=options.memory,
        cpus=options.cpus,
        extra_append=append,
        boot_timeout=options.boot_timeout,
        idle_timeout=options.idle_timeout,
        global_timeout=options.timeout,
        extra_args=extra_args,
    )
    if options.warm_start and options.gdb_port is None:  # a gdb session wants to see the boot
        cfg = dataclasses.replace(cfg, warm=qemu.warm_folder(cfg, base_image, payload.RUNNER))
    live = _LiveConsole(label, stop)
    run = qemu.run_guest(cfg, live)
    live.scanner.finish()
    report_in = decode_traces(live.scanner.report(), kernel_dir, run_dir, payload_dir)
    end = GuestEnd(
        kind=run.end,
        detail=run.detail,
        console_tail=_tail(run.console_log),
        sysrq_dump=run.sysrq_dump,
        console_dropped_bytes=run.console_dropped_bytes,
    )
    properties = {
        "kernel.version": metadata.kernel.version,
        "kernel.requested": metadata.kernel.requested,
        "kernel.release": metadata.kernel.release,
        "build_key": metadata.build_key,
        "accelerator": accel,
        "patches": " ".join(metadata.patches) or "none",
        "rootfs": record.rootfs.key,
        "guest.end": run.end,
        "boot_seconds": "" if run.boot_seconds is None else f"{run.boot_seconds:.2f}",
        "warm_start": run.warm_start,  # restored: no boot, the saved one's console replayed
        **_cut_properties(run, report_in),
        **options.extra_properties,
    }
    plan = payload.read_plan(payload_dir / "plan.json")
    report = verdict.collect(plan, results_dir, report_in, end, properties)
    junit.write_junit(report, run_dir / "junit.xml")
    outcome = report.outcome if report.outcome is not None else Outcome.INFRA_FAILURE
    keep = options.keep_overlay or outcome != Outcome.PASS
    if not keep:
        overlay.unlink(missing_ok=True)
    elif run.warm_start == "restored":  # its backing file is the snapshot's disk, which can be evicted
        qemu.rebase_overlay(overlay, base_image)
    dataclasses.replace(
        record,
        accelerator=accel,
        qemu_command=tuple(run.command),
        overlay=str(overlay) if keep else None,
        payload=str(payload_dir),
        outcome=outcome.name,
        exit_code=int(outcome),
        guest_end=str(run.end),
        seconds=round(run.seconds, 2),
        boot_seconds=run.boot_seconds,
        first_test_seconds=run.first_test_seconds,
    ).write(run_dir)
    if show:
        console.print(render.render_report(report))
        console.print(f"run: {run_dir}  (reproduce: kernel-ci repro {run_dir})")
    return report


def gdb_command(kernel_dir: Path, vmlinux: Path | None, port: int) -> str:
    """The gdb command line for a guest started with QEMU's gdbstub on port: vmlinux (unpacked into the
    run dir) and the build's gdb scripts."""
    script = kernel_dir / GDB_SCRIPT
    return interactive.gdb_command(vmlinux, script if script.is_file() else None, port)


def decode_traces(report: ConsoleReport, kernel_dir: Path, run_dir: Path, payload_dir: Path) -> ConsoleReport:
    """The console report with each kernel trace decoded to file:line (build.debuginfo) against the
    build's vmlinux and the modules: the build's own, its out-of-tree ones and those the payload shipped.
    A trace that cannot be decoded stays raw, with a note: the verdict is the same either way."""
    if not report.faults:
        return report
    step(f"decode {len(report.faults)} kernel trace(s)")
    module_dirs = [kernel_dir / "modules", kernel_dir / EXTMOD_DIR, payload_dir / "modules"]
    unpacked_for_gdb = (run_dir / "vmlinux").exists()
    try:
        faults = debuginfo.decode_faults(
            report.faults,
            image=images.ensure_builder_image(),
            kernel_dir=kernel_dir,
            work=run_dir,
            module_dirs=module_dirs,
        )
    except Exception as exc:  # an annotation: no failure of it (even a bug) may change the verdict
        why = f"{type(exc).__name__}: {exc}"
        faults = [dataclasses.replace(f, trace=debuginfo.with_note(f.trace, why)) for f in report.faults]
    finally:
        if not unpacked_for_gdb:  # vmlinux.xz stays in the build: `gdb` or `addr2line` can unpack it again
            (run_dir / "vmlinux").unlink(missing_ok=True)
    return dataclasses.replace(report, faults=faults)


def _cut_properties(run: qemu.GuestRun, console_report: scanner.ConsoleReport) -> dict[str, str]:
    """What the host did not keep of a flooding guest's console, said in the report."""
    cut: dict[str, str] = {}
    if run.console_dropped_bytes:
        cut["console.truncated"] = f"{run.console_dropped_bytes} bytes past the console.log limit not kept"
    if console_report.dropped_faults:
        cut["kernel.reports.dropped"] = f"{console_report.dropped_faults} (over {scanner.MAX_FAULTS} kept)"
    if console_report.dropped_suites:
        cut["console.suite_markers.dropped"] = str(console_report.dropped_suites)
    return cut


TAIL_BYTES = 256 * 1024  # the console tail read back for the report (console.log can be 64 MiB)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - TAIL_BYTES))
            data = handle.read(TAIL_BYTES)
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


def _publish(output: Path, run_dir: Path) -> None:
    shutil.copyfile(run_dir / "junit.xml", output / "junit.xml")
    latest = output / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(run_dir.relative_to(output))


def reproduce(run_dir: Path, *, interactive: bool = False) -> RunReport:
    """Boot the same kernel (restored from the build cache by its key) on the same rootfs image with the
    same payload, in a fresh overlay; results go to <run_dir>/repro-<time>/."""
    from kernel_ci.cache.store import LocalStore

    info = RunRecord.read(run_dir)
    if info.guests:
        raise UsageError(
            f"{run_dir} ran its suites in {len(info.guests)} guests: reboot one of them with "
            + " or ".join(f"kernel-ci repro {run_dir / name}" for name in info.guests)
        )
    entry = LocalStore().get(info.build_key)
    kernel_dir = Path(info.kernel_dir)
    if entry is not None:
        kernel_dir = entry
    elif not (kernel_dir / "bzImage").exists():
        raise UsageError(
            f"build {info.build_key[:16]} is neither in the build cache nor at {kernel_dir}; "
            f"rebuild it with: {info.reproduce_build}"
        )
    base = Path(info.rootfs.path)
    if not base.exists():
        raise UsageError(f"rootfs image {base} (key {info.rootfs.key[:16]}) is gone: rerun kernel-ci test")
    metadata = BuildMetadata.read(kernel_dir)
    options = TestOptions(kernel_dir=kernel_dir, output=run_dir.parent)
    for name, value in info.options.items():
        if name in MACHINE_OPTIONS:
            setattr(options, name, value)
    repro_dir = run_dir / f"repro-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    repro_dir.mkdir()
    payload_dir = Path(info.payload)
    if interactive:
        overlay = qemu.create_overlay(base, repro_dir)
        argv = list(info.qemu_command)
        argv[argv.index("-kernel") + 1] = str(kernel_dir / "bzImage")
        for index, arg in enumerate(argv):
            if arg.startswith("file=") and "overlay.qcow2" in arg:
                argv[index] = f"file={overlay},format=qcow2,if=virtio,cache=unsafe"
        os.execvp(argv[0], argv)
    return boot_and_collect(repro_dir, kernel_dir / "bzImage", base, payload_dir, metadata, options, info)
