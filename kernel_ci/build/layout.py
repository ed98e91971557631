"""The layout of a build output directory, which is also the layout of a build cache entry.

Shared by the build stage (which writes it) and the cache (which stores, checks and restores it), so it
imports nothing of ours:
  bzImage, config, System.map      the kernel
  vmlinux.xz                       vmlinux with its line tables (CONFIG_DEBUG_INFO), xz-compressed: traces
                                   decode against it (build.debuginfo), gdb loads it unpacked
  modules/lib/modules/<release>/   `make modules_install` output; its `build` and `source` symlinks are the
                                   only symlinks an honest entry has (both -> kbuild/), and a restore
                                   recreates them rather than trusting any link from a cache entry
  kbuild/                          a prepared tree for out-of-tree modules: `make -C kbuild M=$PWD modules`;
                                   with the kernel's scripts (decode_stacktrace.sh) and gdb scripts
                                   (kbuild/vmlinux-gdb.py, kbuild/scripts/gdb/linux/)
  patches/<series>.mbox            the applied patches, one downloadable file per series
  metadata.json                    the typed build record (kernel_ci.build.records.BuildMetadata)
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

# `make modules_install` links lib/modules/<release>/{build,source} to the build container's trees
# (/build/out, /build/src), which do not exist outside it. The outputs (and every build cache entry) carry
# instead links to their own kbuild/ tree, which is what `make -C .../build M=$PWD` needs. They are never
# taken from a cache entry's files: whoever stores or restores an entry drops links and recreates these
# (make_honest_links).
VMLINUX_XZ = "vmlinux.xz"
GDB_SCRIPT = "kbuild/vmlinux-gdb.py"  # loads kbuild/scripts/gdb/linux/ (the lx-* commands)
DECODE_SCRIPT = "kbuild/scripts/decode_stacktrace.sh"
EXTMOD_DIR = "extmod"  # extmod/<module>/*.ko: the out-of-tree modules
MODULES_ROOT = "modules/lib/modules"
HONEST_LINK_NAMES = ("build", "source")
HONEST_LINK_TARGET = "../../../../kbuild"
_RELEASE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def honest_links(root: Path) -> dict[str, str]:
    """The symlinks an output tree at root should have (relative path -> target), from its directories."""
    base = root / MODULES_ROOT
    try:
        if not stat.S_ISDIR(base.lstat().st_mode) or any(
            not stat.S_ISDIR((root / part).lstat().st_mode) for part in ("modules", "modules/lib")
        ):
            return {}
        releases = sorted(os.listdir(base))
    except FileNotFoundError:
        return {}
    links = {}
    for release in releases:
        if _RELEASE_RE.fullmatch(release) and stat.S_ISDIR((base / release).lstat().st_mode):
            for name in HONEST_LINK_NAMES:
                links[f"{MODULES_ROOT}/{release}/{name}"] = HONEST_LINK_TARGET
    return links


def make_honest_links(root: Path) -> dict[str, str]:
    """Create the honest symlinks of the output tree at root (replacing whatever is at their place)."""
    links = honest_links(root)
    for rel, target in links.items():
        path = root / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        os.symlink(target, path)
    return links
