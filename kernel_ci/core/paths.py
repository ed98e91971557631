"""Where things live: the repository's folders and the per-user cache (XDG)."""

from __future__ import annotations

import os
from pathlib import Path

from kernel_ci.core.settings import default_cache_root

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNEL_PATCHES = REPO_ROOT / "kernel-patches"
KERNEL_MODULES = REPO_ROOT / "kernel-modules"
GUEST_TESTS = REPO_ROOT / "guest-tests"
CONTAINERS = REPO_ROOT / "containers"
KCONFIG_DIR = REPO_ROOT / "kconfig"
SOURCES_LOCK = REPO_ROOT / "kernel-sources.lock.toml"


def cache_root() -> Path:
    """$KERNEL_CI_CACHE, else $XDG_CACHE_HOME/kernel-ci, else ~/.cache/kernel-ci (the user's input, read
    by the same rule as Settings.cache_root; no module of ours sets the variable for another)."""
    return default_cache_root(os.environ)


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
