"""Where things live: the repository's folders and the per-user cache (XDG)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNEL_PATCHES = REPO_ROOT / "kernel-patches"
KERNEL_MODULES = REPO_ROOT / "kernel-modules"
GUEST_TESTS = REPO_ROOT / "guest-tests"
CONTAINERS = REPO_ROOT / "containers"
KCONFIG_DIR = REPO_ROOT / "kconfig"
SOURCES_LOCK = REPO_ROOT / "kernel-sources.lock.toml"


def cache_root() -> Path:
    """$KERNEL_CI_CACHE, else $XDG_CACHE_HOME/kernel-ci, else ~/.cache/kernel-ci."""
    explicit = os.environ.get("KERNEL_CI_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "kernel-ci"


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
