"""Collect a finished build's outputs into one directory: what users download and what later stages use.

Layout of an output directory (and of a build cache entry):
  bzImage, config, System.map      the kernel
  vmlinux.xz                       vmlinux, xz-compressed (line tables: decoding, gdb): compressing_vmlinux
  modules/lib/modules/<release>/   `make modules_install` output
  kbuild/                          a prepared tree for out-of-tree modules: `make -C kbuild M=$PWD modules`
  patches/<series>.mbox            the applied patches, one downloadable file per series
  metadata.json                    written by the pipeline
"""

from __future__ import annotations

import contextlib
import hashlib
import lzma
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kernel_ci.build.layout import make_honest_links
from kernel_ci.core.digest import SourceDigests, sha256_file, tree_digest
from kernel_ci.core.files import file_identity

# What an out-of-tree module's build (`make -C kbuild M=...`) reads of the source tree, as upstream's
# scripts/package/install-extmod-build selects it: the top and the arch's own Makefiles (kbuild never
# descends into the kernel's other folders for an M= build, and never reads a Kconfig: the configuration
# is include/config/auto.conf), and these folders whole. The Makefiles and Kconfigs of every folder were
# ~4,300 of the export's 11,600 files; a restore's time goes per file.
KBUILD_SRC_NAMES = ("Makefile", "Kbuild", "Kconfig")
KBUILD_SRC_TOPS = ("", "arch/x86")  # folders whose own KBUILD_SRC_NAMES files the export holds
KBUILD_SRC_DIRS = (
    "include",
    "arch/x86/include",
    "scripts",
    "tools/include",
    "tools/objtool",
    "arch/x86/entry/syscalls",
)
# The folders the source walk enters (below a KBUILD_SRC_DIRS folder: every one): KBUILD_SRC_TOPS,
# KBUILD_SRC_DIRS and the folders on the way to them (arch/, tools/, arch/x86/entry/: none of their files)
_KBUILD_SRC_PATH = frozenset(KBUILD_SRC_TOPS) | {
    "/".join(parts[:depth])
    for parts in (d.split("/") for d in KBUILD_SRC_DIRS)
    for depth in range(len(parts) + 1)
}
KBUILD_EXPORT = "kbuild"  # the export's folder in an output dir
GDB_LOADER = "vmlinux-gdb.py"  # scripts_gdb's loader, beside scripts/gdb/ in the export
KBUILD_OUT_FILES = (
    ".config",
    "Module.symvers",
    "System.map",
    "include",
    "arch/x86/include/generated",
    "scripts",
    "tools/objtool/objtool",
    "arch/x86/tools",
)


def _copy_file(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest, follow_symlinks=True)


def _link_file(src: str, dest: str) -> None:
    """A hard link to src (no bytes copied), or a copy where a link cannot be made (another filesystem,
    the link limit). dest's folder exists."""
    if os.path.islink(src):  # link(2) would link the symlink itself (scripts/dummy-tools/nm -> ld): copy it
        shutil.copy2(src, dest, follow_symlinks=True)
        return
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest, follow_symlinks=True)


def _is_kbuild_file(rel_dir: str, name: str) -> bool:
    """Outside KBUILD_SRC_DIRS: the Makefiles and Kconfigs of the top and the arch folder (rel_dir: the
    file's folder relative to the source tree, "" at its top)."""
    return rel_dir in KBUILD_SRC_TOPS and name.startswith(KBUILD_SRC_NAMES)


def _in_full_dir(rel_dir: str) -> bool:
    return any(rel_dir == d or rel_dir.startswith(d + "/") for d in KBUILD_SRC_DIRS)


def _kbuild_sources(src: Path) -> Iterator[tuple[str, str, str]]:
    """(folder relative to src, "" at its top; file name; path) of each source file the export holds."""
    for rel_dir, name, item in _kbuild_source_entries(src):
        yield rel_dir, name, item.path


def _kbuild_source_entries(src: Path) -> Iterator[tuple[str, str, os.DirEntry[str]]]:
    """(folder relative to src, "" at its top; file name; its listing entry) of each source file the export
    holds: a walk of the folders that hold them (KBUILD_SRC_DIRS and the way there; ~6,450 files) in
    strings and os calls (pathlib's objects were most of the export's time). Links to folders are neither
    entered nor placed."""
    top = os.fspath(src)
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        full = _in_full_dir(rel_dir)
        with os.scandir(os.path.join(top, rel_dir) if rel_dir else top) as listing:
            for item in listing:
                if item.is_dir(follow_symlinks=False):
                    below = f"{rel_dir}/{item.name}" if rel_dir else item.name
                    if full or below in _KBUILD_SRC_PATH:
                        pending.append(below)
                elif item.is_dir():
                    continue
                elif full or _is_kbuild_file(rel_dir, item.name):
                    yield rel_dir, item.name, item


def export_kbuild_sources(src: Path, dest: Path, *, link: bool) -> None:
    """The source pass of export_kbuild_tree, each folder of dest made once. It reads only the source
    tree, which no build writes (kbuild builds out of tree, O=; the tree is mounted read-only), so it can
    run while make does (SourceExport)."""
    dest.mkdir(parents=True, exist_ok=True)

    def place(item: os.DirEntry[str], target: str) -> None:
        if link:
            _link_file(item.path, target)
        else:
            shutil.copy2(item.path, target, follow_symlinks=True)

    _place_sources(src, dest, place)


def update_kbuild_sources(src: Path, dest: Path) -> set[str]:
    """The source pass over a kept export (exporting_sources(kept=...)) of the same object tree, links
    only: a file that is already a link to its source (same device and inode) stays; anything else there
    is replaced by one. What the export holds beyond the sources and the outputs is removed by
    remove_extras. Returns the relative paths it placed."""
    device = os.stat(src).st_dev

    def relink(item: os.DirEntry[str], target: str) -> None:
        try:
            there = os.lstat(target)
        except FileNotFoundError:
            there = None
        if there is not None:
            if stat.S_ISREG(there.st_mode) and (there.st_dev, there.st_ino) == (device, item.inode()):
                return
            if stat.S_ISDIR(there.st_mode):
                shutil.rmtree(target)
            else:
                os.unlink(target)
        _link_file(item.path, target)

    return _place_sources(src, dest, relink)


def _place_sources(src: Path, dest: Path, place: Callable[[os.DirEntry[str], str], None]) -> set[str]:
    """place(the source's listing entry, its path under dest) for each source file the export holds, its
    folder made first (once); the relative paths placed."""
    made: set[str] = set()
    placed: set[str] = set()
    for rel_dir, name, item in _kbuild_source_entries(src):
        if rel_dir not in made:
            os.makedirs(os.path.join(dest, rel_dir), exist_ok=True)
            made.add(rel_dir)
        rel = os.path.join(rel_dir, name)
        placed.add(rel)
        place(item, os.path.join(dest, rel))
    return placed


def _kbuild_outputs(out: Path) -> Iterator[str]:
    """The path relative to out of each object tree file the export holds: KBUILD_OUT_FILES, from
    folders without objects and .cmd files (except under include/), without links into the container's
    source tree (scripts/gdb/linux/*.py -> /build/src/...: the source pass placed those files)."""
    for item in KBUILD_OUT_FILES:
        path = out / item
        if not path.is_dir():
            if path.exists():
                yield item
            continue
        for directory, _dirs, files in os.walk(path):
            rel_dir = os.path.relpath(directory, out)
            for name in files:
                if name.endswith((".o", ".cmd")) and not item.startswith("include"):
                    continue
                file = os.path.join(directory, name)
                if os.path.islink(file) and not os.path.exists(file):
                    continue
                yield os.path.join(rel_dir, name)


def _place_outputs(out: Path, dest: Path, *, update: bool = False) -> set[str]:
    """The object tree pass of export_kbuild_tree: copied over the sources, each folder of dest made once;
    the relative paths placed. With update (a kept export), a copy of the same size and mtime that no
    other name shares is kept (copy2 keeps the mtime; kbuild rewriting a file gives it a new one)."""
    made: set[str] = set()
    placed_all: set[str] = set()
    for rel in _kbuild_outputs(out):
        placed_all.add(rel)
        target = os.path.join(dest, os.path.dirname(rel))
        if target not in made:
            os.makedirs(target, exist_ok=True)
            made.add(target)
        placed = os.path.join(dest, rel)
        source = os.path.join(out, rel)
        if update and _same_copy(source, placed):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(placed)  # a source file linked there: replaced, never written through the link
        shutil.copy2(source, placed, follow_symlinks=True)
    return placed_all


def _same_copy(source: str, placed: str) -> bool:
    try:
        theirs, ours = os.stat(source), os.lstat(placed)
    except FileNotFoundError:
        return False
    return (
        stat.S_ISREG(ours.st_mode)
        and ours.st_nlink == 1
        and (theirs.st_size, theirs.st_mtime_ns, stat.S_IMODE(theirs.st_mode))
        == (ours.st_size, ours.st_mtime_ns, stat.S_IMODE(ours.st_mode))
    )


def remove_extras(dest: Path, kept: set[str]) -> None:
    """Remove from dest every file not named in kept (relative paths) and every folder holding none: what
    a kept export still held of an older build that this build's export does not."""

    def walk(rel_dir: str) -> bool:  # whether the folder holds anything kept
        holds = False
        with os.scandir(os.path.join(dest, rel_dir) if rel_dir else dest) as listing:
            entries = list(listing)
        for item in entries:
            rel = f"{rel_dir}/{item.name}" if rel_dir else item.name
            if item.is_dir(follow_symlinks=False):
                if walk(rel):
                    holds = True
                else:
                    shutil.rmtree(item.path)
            elif rel in kept:
                holds = True
            else:
                os.unlink(item.path)
        return holds

    walk("")


def export_kbuild_tree(
    src: Path,
    out: Path,
    dest: Path,
    *,
    link_sources: bool = False,
    sources_placed: bool = False,
    kept_sources: set[str] | None = None,
) -> None:
    """A single self-contained tree (srctree == objtree) that builds out-of-tree modules for this kernel:
    the source's Makefiles, Kconfigs, headers and scripts, overlaid with the build's generated headers,
    .config, Module.symvers and host tools (fixdep, modpost, objtool).

    With link_sources the source's files are hard-linked, not copied (~90 MB, seconds of a build): only
    for a source tree nothing ever writes in place (kernel-ci's own patched tree, itself hard links to
    the pristine tarball's tree, mounted read-only into every container). The object tree's files are
    always copied: kbuild rewrites some of them in place, which would change the exported ones too.
    sources_placed: the source pass has been made into dest already (SourceExport, beside make);
    kept_sources: dest was a kept export (SourceExport with kept), these are the sources the pass placed:
    the outputs pass keeps unchanged copies and what neither pass placed is removed."""
    if not sources_placed:
        export_kbuild_sources(src, dest, link=link_sources)
    placed = _place_outputs(out, dest, update=kept_sources is not None)
    # scripts_gdb's loader (a link to the container's source tree): beside scripts/gdb/, which it imports
    if os.path.lexists(out / GDB_LOADER):
        loader = (src / "scripts/gdb" / GDB_LOADER).read_text()
        (dest / GDB_LOADER).unlink(missing_ok=True)  # a new file: never written through a hard link
        (dest / GDB_LOADER).write_text(gdb_loader_importing_each(loader))
        placed.add(GDB_LOADER)
    constants = dest / GDB_CONSTANTS
    if constants.is_file():
        text = constants.read_text()
        constants.unlink()  # a new file: never written through a hard link
        constants.write_text(python_int_literals(text))
    # The build's tree is O=-style; the exported one is a plain tree: drop the O= wrapper makefile.
    (dest / "source").unlink(missing_ok=True)
    if kept_sources is not None:
        remove_extras(dest, kept_sources | placed)


# Names what the export takes from the source tree; the remembered digest of those files is kept under it,
# so a kernel-ci that selects other files never reads a digest of an older selection, and it is a flag of
# the build plan (build.plan.build_flags): a build cache entry's export is of the selection its key names.
EXPORT_SELECTION = hashlib.sha256(
    repr((KBUILD_SRC_NAMES, KBUILD_SRC_TOPS, KBUILD_SRC_DIRS)).encode()
).hexdigest()[:16]


def kbuild_export_digest(kbuild: Path, out: Path, sources: SourceDigests) -> str:
    """A digest of the export kbuild (made by export_kbuild_tree from sources.root and out) that changes
    whenever any of its files does: the external modules' reuse key.

    From a tree with a memo (kernel-ci's own: it never changes under its name, and the export links its
    files) the source files' part is their remembered digest, and only the files the object tree gave
    (and the loader made from both) are read, from the export: 0.1 s where reading all of it took 0.9 s of
    every incremental build. A tree without one (a user's --tree, which they may edit while the export
    is read) gives tree_digest of the whole export, as read."""
    if sources.memo is None:
        return tree_digest(kbuild)

    def source_files() -> list[str]:
        return sorted(os.path.join(rel_dir, name) for rel_dir, name, _ in _kbuild_sources(sources.root))

    digest = hashlib.sha256(b"kbuild export\n")
    digest.update(sources.digest(f"kbuild export {EXPORT_SELECTION}", source_files).encode() + b"\n")
    for rel in sorted([*_kbuild_outputs(out), GDB_LOADER]):
        path = kbuild / rel
        if not path.is_file():  # the loader exists only with CONFIG_GDB_SCRIPTS
            digest.update(f"absent\0{rel}\n".encode())
            continue
        executable = oct(path.stat().st_mode & 0o111)
        digest.update(f"file\0{rel}\0{executable}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


# 5.10's scripts/gdb/linux/constants.py is C preprocessor output: `LX_SB_RDONLY = ((((1UL))) << (0))` since
# SB_RDONLY became BIT(0), and Python refuses 1UL, so vmlinux-gdb.py stopped at `import linux.proc` and
# every lx-* command after it (lx-mounts, lx-cmdline, lx-timerlist, ...) was missing. Upstream later made
# these gdb expressions (LX_GDBPARSED); the exported copy gets C's integer suffixes dropped instead.
GDB_CONSTANTS = "scripts/gdb/linux/constants.py"
_C_INT_SUFFIX = re.compile(r"\b(0[xX][0-9a-fA-F]+|\d+)(?:[uU](?:ll|LL|l|L)?|(?:ll|LL|l|L)[uU]?)\b")


# With CONFIG_DEBUG_INFO_REDUCED gcc describes a struct only in the file named after its header
# (-femit-struct-debug-baseonly): struct module is there (kernel/module.c), struct mount, task_struct and
# printk_log are not. linux/proc.py looks `struct mount` up when imported, and its error stopped the
# kernel's loader before the modules after it. The exported loader imports each module on its own and
# says which did not load; a command that needs a missing type says so when run.
_LOADER_IMPORT = re.compile(r"^(\s+)import (linux\.\w+)\s*$", re.MULTILINE)
_LOADER_HELPER = """
def _kci_import(name):
    # kernel-ci (build/artifacts.py): one module's failure no longer stops the others
    try:
        __import__(name)
    except Exception as exc:
        gdb.write("kernel-ci: %s not loaded (%s): its lx- commands are missing\\n" % (name, exc))

"""


def gdb_loader_importing_each(loader: str) -> str:
    """The kernel's vmlinux-gdb.py with each `import linux.X` guarded (see _LOADER_HELPER)."""
    if not _LOADER_IMPORT.search(loader):
        return loader
    guarded = _LOADER_IMPORT.sub(r"\1_kci_import('\2')", loader)
    head, marker, rest = guarded.partition("\nimport os\n")
    return head + marker + _LOADER_HELPER + rest if marker else _LOADER_HELPER + guarded


def python_int_literals(text: str) -> str:
    """C integer literals (1UL, 0x10ULL, 4u) as Python reads them (1, 0x10, 4)."""
    return _C_INT_SUFFIX.sub(r"\1", text)


def collect(
    src: Path,
    out: Path,
    dest: Path,
    *,
    link_sources: bool = False,
    sources: SourceExport | None = None,
) -> dict[str, str]:
    """Copy the kernel, config, symbols, installed modules and the kbuild tree into dest (link_sources:
    see export_kbuild_tree; sources: its source pass, made beside make and waited for). Returns a map of
    output name -> relative path."""
    dest.mkdir(parents=True, exist_ok=True)
    produced = {
        "bzImage": out / "arch/x86/boot/bzImage",
        "config": out / ".config",
        "System.map": out / "System.map",
    }
    for name, path in produced.items():
        _copy_file(path, dest / name)
    modules = out / ".kci-modules"
    if modules.is_dir():
        shutil.copytree(modules, dest / "modules", symlinks=True, dirs_exist_ok=True)
    kbuild = dest / KBUILD_EXPORT
    export_kbuild_tree(
        src,
        out,
        kbuild,
        link_sources=link_sources,
        sources_placed=sources is not None,
        kept_sources=sources.placed if sources is not None else None,
    )
    make_honest_links(dest)  # replaces modules_install's links to the container's /build/{out,src}
    return {name: name for name in produced} | {"modules": "modules", "kbuild": "kbuild"}


@dataclass
class SourceExport:
    """The kbuild export's source pass (export_kbuild_sources) in a thread while make runs.

    Most of an incremental build's collecting was this pass: ~11,000 files linked into ~3,700 new folders
    (about 0.6-0.8 s here), none of which depends on what make writes. make spends most of an incremental
    build linking on one core, so the pass costs the build nothing there; on a cold build it takes about a
    second of CPU from make's 240. exporting_sources() waits for it on every way out of its block, so a
    failed build never has a thread still writing into the staging dir it removes."""

    src: Path
    dest: Path
    link: bool
    kept: Path | None = None  # a kept export to update into dest (see exporting_sources), if there is one
    seconds: float = 0.0
    error: BaseException | None = None
    placed: set[str] | None = None  # the sources placed, when dest was a kept export
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="kbuild sources", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        started = time.monotonic()
        try:
            if self.link and self.kept is not None and self._take_kept():
                self.placed = update_kbuild_sources(self.src, self.dest)
            else:
                export_kbuild_sources(self.src, self.dest, link=self.link)
        except BaseException as exc:  # re-raised in the caller's thread by wait()
            self.error = exc
        self.seconds = round(time.monotonic() - started, 2)

    def _take_kept(self) -> bool:
        """Move the kept export into dest; False (and none kept any more) when there is none or it cannot
        be moved there (another filesystem)."""
        assert self.kept is not None
        if not self.kept.is_dir():
            return False
        try:
            os.rename(self.kept, self.dest)
        except OSError:
            shutil.rmtree(self.kept, ignore_errors=True)
            return False
        return True

    def wait(self) -> None:
        """Wait until the pass is done; raise what it raised."""
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def exporting_sources(
    src: Path, dest: Path, *, link: bool, kept: Path | None = None
) -> Iterator[SourceExport]:
    """The source pass into dest, in a thread from the start of the block; the block calls wait() before
    the outputs pass (collect(..., sources=...)). Leaving the block waits for the thread too.

    kept: where the last export of the same object tree was kept (flow.build keeps a no-cache build's,
    outside the object tree and every container's mounts). With link, it is moved into dest and brought
    up to date instead of made anew: on this VM's journal-less ext4, creating ~15,000 names a few seconds
    after deleting the last build's ~15,000 cost seconds (new inodes skip recently freed ones)."""
    export = SourceExport(src, dest, link, kept)
    export.start()
    try:
        yield export
    finally:
        if export._thread is not None:
            export._thread.join()


# xz's preset for vmlinux.xz. The default config's vmlinux is 41.8 MB (reduced debug info); on the 2-core
# host, one thread: preset 0 gives 10.5 MB in 1.3 s, preset 1 10.4 MB in 2.6 s (xz -T2 -1 had taken 1.15 s
# of every build in the builder container). Preset 0 in one thread fits in the shadow of collecting.
VMLINUX_XZ_PRESET = 0
# Two streams, one thread each: vmlinux is compressed from kbuild's SYSMAP line on, beside the end of make
# (bzImage's compression on one core); once make ends the second core would idle while the single stream
# went on, and with the collecting and the output's update down to ~0.5 s the build waited ~1 s for it.
# Fixed, not the machine's core count: the file's bytes must not depend on where it was built.
VMLINUX_XZ_STREAMS = 2
_XZ_CHUNK = 1 << 20


@dataclass
class Compression:
    """The background compression of vmlinux: its own seconds, and how long the build waited for it.

    Started by start() (from kbuild's line saying vmlinux is linked, see VMLINUX_LINKED) or, at the latest,
    by the end of make; the block's end waits for it. vmlinux is final once link-vmlinux.sh prints SYSMAP
    (sorttable has rewritten it; only nm reads it after that), while make goes on with bzImage's compression
    and the modules for seconds, mostly on one core: the other compresses. Whether vmlinux really was not
    written after the start is checked at the end (inode, size, mtime and ctime, which any write changes):
    if it was, it is compressed again, so an early start can cost time but never a stale vmlinux.xz."""

    seconds: float = 0.0
    waited: float = 0.0
    error: BaseException | None = None
    recompressed: bool = False
    vmlinux: Path = field(default=Path("vmlinux"), repr=False)
    target: Path = field(default=Path("vmlinux.xz"), repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _identity: tuple[int, ...] | None = field(default=None, repr=False)

    def start(self) -> threading.Thread:
        """Compress vmlinux as it is now, in a thread (once; later calls return the same thread)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="vmlinux.xz", daemon=True)
            self._thread.start()
        return self._thread

    def on_line(self, line: str) -> None:
        """A kbuild line: the start when it says vmlinux is final."""
        if self._thread is None and VMLINUX_LINKED.match(line):
            self.start()

    def _work(self) -> None:
        started = time.monotonic()
        try:
            self._identity = file_identity(self.vmlinux)
            _compress(self.vmlinux, self.target, self._stop)
        except BaseException as exc:  # re-raised in the caller's thread
            self.error = exc
        self.seconds = round(self.seconds + time.monotonic() - started, 2)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def finish(self) -> None:
        """Wait for it; compress again when vmlinux changed since it began; raise what it raised."""
        thread = self.start()
        waiting = time.monotonic()
        thread.join()
        if self.error is None and self._identity != file_identity(self.vmlinux):
            self.recompressed = True
            self._thread = None
            self.start().join()
        self.waited = round(time.monotonic() - waiting, 2)
        if self.error is not None:
            raise self.error


# link-vmlinux.sh's line once vmlinux is written for good (after SORTTAB, before it reads it for the map)
VMLINUX_LINKED = re.compile(r"^\s+SYSMAP\s+System\.map\s*$")


@contextlib.contextmanager
def compressing_vmlinux(vmlinux: Path, target: Path, *, early: bool = False) -> Iterator[Compression]:
    """vmlinux compressed to target (.xz, CRC32 check) in a thread while the block runs; the block's
    end waits for it, and raises what it raised. The kernel's image is done with when make has ended: the
    compression needs no container, and one thread of liblzma (which releases the GIL) runs beside the
    host's collecting, which uses the other core. With early, it starts when the block calls start() or
    passes it kbuild's lines (on_line), at the latest when the block ends. Leaving the block by an
    exception stops it at the next chunk. The file appears whole (renamed from a temporary name) or not
    at all."""
    done = Compression(vmlinux=vmlinux, target=target)
    if not early:
        done.start()
    try:
        yield done
    except BaseException:
        done.stop()
        target.unlink(missing_ok=True)  # an early start may have finished: nothing of a failed build stays
        raise
    done.finish()


def _compress(vmlinux: Path, target: Path, stop: threading.Event) -> None:
    """vmlinux as VMLINUX_XZ_STREAMS xz streams, one a thread, written one after the other into target
    (xz, xzcat and Python's lzma.open read concatenated streams as one file)."""
    partial = target.with_name(f".{target.name}.partial")
    size = os.path.getsize(vmlinux)
    per_stream = -(-size // VMLINUX_XZ_STREAMS // _XZ_CHUNK) * _XZ_CHUNK or _XZ_CHUNK
    ranges = [(start, min(start + per_stream, size)) for start in range(0, max(size, 1), per_stream)]
    streams: list[bytes] = [b""] * len(ranges)
    errors: list[BaseException] = []

    def compress(index: int) -> None:
        try:
            streams[index] = _xz_stream(vmlinux, *ranges[index], stop)
        except BaseException as exc:  # raised below, in the compressing thread
            errors.append(exc)

    helpers = [threading.Thread(target=compress, args=(i,), daemon=True) for i in range(1, len(ranges))]
    for helper in helpers:
        helper.start()
    compress(0)
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]
    try:
        with partial.open("wb") as out:
            for stream in streams:
                out.write(stream)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _xz_stream(vmlinux: Path, start: int, end: int, stop: threading.Event) -> bytes:
    """Bytes start..end of vmlinux as one xz stream (CRC32 check); liblzma releases the GIL."""
    compressor = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=VMLINUX_XZ_PRESET)
    parts = []
    with vmlinux.open("rb") as source:
        source.seek(start)
        left = end - start
        while left > 0:
            if stop.is_set():
                raise InterruptedError("vmlinux.xz: the build stopped")
            chunk = source.read(min(_XZ_CHUNK, left))
            if not chunk:
                raise OSError(f"{vmlinux} shrank while it was compressed")
            parts.append(compressor.compress(chunk))
            left -= len(chunk)
    parts.append(compressor.flush())
    return b"".join(parts)
