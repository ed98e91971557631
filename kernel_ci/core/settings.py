"""The user's settings, read once (command line, environment, config file) and handed down as an argument.

Environment variables stay supported as INPUTS (``KERNEL_CI_CACHE``, ``KERNEL_CI_CACHE_URL``,
``KERNEL_CI_CACHE_TOKEN``, ``KERNEL_CI_CACHE_READ_TOKEN``, ``KERNEL_CI_CONFIG``, ``CCACHE_REMOTE_STORAGE``);
they are read here and nowhere else, and no module of ours writes one for another to read: a setting that
travels through ``os.environ`` is invisible in the call that uses it, leaks into every child process, and
outlives the call that set it.

Configuration of the shared cache (first found wins): ``--cache-url``, ``$KERNEL_CI_CACHE_URL`` (+
``$KERNEL_CI_CACHE_TOKEN``, ``$KERNEL_CI_CACHE_READ_TOKEN``), the ``[cache]`` table (``url``, ``token``,
``read_token``, ``ccache``) of ``$KERNEL_CI_CONFIG`` or ``~/.config/kernel-ci/config.toml``.

The builder container runs the series' code, so its ccache storage carries the READ token and ccache's
``read-only`` attribute: a series cannot poison the shared ccache. The write token goes there only when the
user vouches for the series (``--trusted-ccache-writes``).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel_ci.core.errors import UsageError

CACHE_ENV = "KERNEL_CI_CACHE"
URL_ENV = "KERNEL_CI_CACHE_URL"
TOKEN_ENV = "KERNEL_CI_CACHE_TOKEN"
READ_TOKEN_ENV = "KERNEL_CI_CACHE_READ_TOKEN"
CONFIG_ENV = "KERNEL_CI_CONFIG"
CCACHE_REMOTE_ENV = "CCACHE_REMOTE_STORAGE"


def default_cache_root(environ: Mapping[str, str]) -> Path:
    """$KERNEL_CI_CACHE, else $XDG_CACHE_HOME/kernel-ci, else ~/.cache/kernel-ci; absolute (a relative one
    is the current directory's: the builder's bind mounts and QEMU's paths take absolute paths only)."""
    explicit = environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).absolute()
    xdg = environ.get("XDG_CACHE_HOME")
    return ((Path(xdg) if xdg else Path.home() / ".cache") / "kernel-ci").absolute()


@dataclass(frozen=True)
class Settings:
    cache_root: Path  # the local caches: downloads, sources, build store, rootfs, ccache
    config_file: Path  # where the [cache] table was looked for
    cache_url: str | None = None  # the shared build cache service; None = local only
    cache_token: str | None = field(default=None, repr=False)  # needed to push; reads may be anonymous
    # the builder container's ccache credential: it runs untrusted patch code, so never the write token
    cache_read_token: str | None = field(default=None, repr=False)
    trusted_ccache_writes: bool = False  # --trusted-ccache-writes: the write token for the builder's ccache
    # CCACHE_REMOTE_STORAGE for the build container: the user's own, else the service's ccache storage
    ccache_remote: str | None = field(default=None, repr=False)

    @classmethod
    def load(
        cls,
        cache_url: str | None = None,
        environ: Mapping[str, str] | None = None,
        *,
        trusted_ccache_writes: bool = False,
    ) -> Settings:
        """The settings of this run: cache_url is --cache-url; environ defaults to the process's."""
        env = os.environ if environ is None else environ
        config_file = Path(env.get(CONFIG_ENV) or Path.home() / ".config" / "kernel-ci" / "config.toml")
        table = _cache_table(config_file)
        url = cache_url or env.get(URL_ENV) or table.get("url") or None
        if url is not None and not str(url).startswith(("http://", "https://")):
            raise UsageError(f"cache URL {url!r}: expected http://HOST:PORT or https://...")
        url = str(url).rstrip("/") if url else None
        token = env.get(TOKEN_ENV) or table.get("token") or None
        read_token = env.get(READ_TOKEN_ENV) or table.get("read_token") or None
        ccache_remote = env.get(CCACHE_REMOTE_ENV) or None
        if ccache_remote is None and url and bool(table.get("ccache", True)):
            ccache_remote = ccache_storage(
                url, token if trusted_ccache_writes else read_token, trusted_ccache_writes
            )
        return cls(
            cache_root=default_cache_root(env),
            config_file=config_file,
            cache_url=url,
            cache_token=token,
            cache_read_token=read_token,
            trusted_ccache_writes=trusted_ccache_writes,
            ccache_remote=ccache_remote,
        )


def ccache_storage(url: str, token: str | None, writable: bool = False) -> str:
    """CCACHE_REMOTE_STORAGE for the service at url (ccache sends the token as ``Authorization: Bearer``).

    Unless writable, ccache is told the storage is ``read-only`` (it then never tries a PUT): the builder
    container gets this one by default, with the read token (kernel_ci.build.ccacherelay relays it)."""
    value = f"{url}/ccache/"
    if token:
        value += f"|bearer-token={token}"
    if not writable:
        value += "|read-only=true"
    return value


def _cache_table(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        table = tomllib.loads(path.read_text()).get("cache", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read the cache configuration in {path}: {exc}") from exc
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [cache] must be a table")
    return table
