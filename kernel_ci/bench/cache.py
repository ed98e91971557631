"""``kernel-ci cache bench``: what the shared build cache costs and serves, on this machine's loopback.

1. Restore of a full kernel build output (``out/build`` or the newest local cache entry) from the service
   into an empty local store, as ``kernel-ci build`` does on a remote hit: download + verify + unpack,
   then the local store's atomic publish (timed apart: it checks the names, sizes and modes of the
   ~15,000 names and renames the entry into place; a restored entry is not fsynced, see cache/store.py).
2. ccache objects of 10 KiB: requests/s and latency percentiles of GETs under a bounded load (wrk: fixed
   duration and connection count) against the service, and against nginx serving the same objects from
   a directory as a WebDAV ccache backend (the setup ccache's documentation describes), and the ratio.

The service runs in its own process (multiprocessing; ``--workers`` uvicorn worker processes, 2 by default),
as an operator would run it, and nginx with the same number of worker processes (not ``auto``, one per
core, which on a bigger machine would give it more processes than the service): the same worker count and
the same connections, as the comparison asks. JSON in out/bench/.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import platform
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx

from kernel_ci.bench.figures import Figure
from kernel_ci.cache.server.server import wait_healthy
from kernel_ci.cache.store import FileRecord, LocalStore, WrittenTree
from kernel_ci.core import proc
from kernel_ci.core.console import console, step
from kernel_ci.core.errors import InfrastructureError
from kernel_ci.core.paths import REPO_ROOT
from kernel_ci.host import setup as hostsetup

TOKEN = secrets.token_hex(16)
OBJECT_SIZE = 10 * 1024
OBJECTS = 2000
CCACHE_ALPHABET = "0123456789abcdefghijklmnopqrstuv"

WRK_SCRIPT = """
local keys = {}
init = function(args)
  for line in io.lines(args[1]) do keys[#keys + 1] = line end
end
request = function()
  return wrk.format("GET", keys[math.random(#keys)])
end
"""

NGINX_CONF = """
{user}
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  client_body_temp_path {prefix}/body;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location /ccache/ {{
      dav_methods PUT DELETE;
      create_full_put_path on;
      client_max_body_size 64m;
    }}
  }}
}}
"""


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(data: str, port: int, token: str, workers: int) -> None:
    from kernel_ci.cache.server.server import ServerConfig, serve

    # uvicorn's worker processes reopen the parent's stdin by fd number: make it fd 0 (multiprocessing
    # replaced it with a /dev/null file of another number, which a spawned grandchild does not inherit)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdin = os.fdopen(0)
    config = ServerConfig(data=Path(data), tokens=[token])
    serve(config, "127.0.0.1", port, log_level="warning", workers=workers)


@contextlib.contextmanager
def service(data: Path, workers: int = 1) -> Iterator[str]:
    port = _free_port()
    worker = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(str(data), port, TOKEN, workers)
    )
    worker.start()
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(url, worker.is_alive):
            raise InfrastructureError(
                f"the cache service did not start for the bench (exit {worker.exitcode})"
            )
        yield url
    finally:
        worker.terminate()
        worker.join(20)


# The reference server and the load generator, by program and the Debian package that has it: installed
# when missing and this host allows it (root on Debian), as the build part installs tuxmake's host tools.
# On a fresh machine neither is there, and the part stopped at its first figure without them.
BENCH_TOOLS = {"nginx": "nginx-light", "wrk": "wrk"}


def require_tool(program: str) -> None:
    if shutil.which(program) is not None:
        return
    package = BENCH_TOOLS[program]
    if not hostsetup.can_install():
        raise InfrastructureError(f"{program} is not installed: apt-get install {package}")
    hostsetup.apt_install([package])


@contextlib.contextmanager
def nginx(root: Path, prefix: Path, workers: int) -> Iterator[str]:
    require_tool("nginx")
    port = _free_port()
    (prefix / "body").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    # as root, nginx's workers would run as "nobody", who cannot write into our private temporary dirs
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_CONF.format(user=user, prefix=prefix, port=port, root=root, workers=workers))
    proc.run(["nginx", "-c", conf, "-p", prefix], quiet=True)  # daemonizes once it listens
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.run(["nginx", "-c", conf, "-p", prefix, "-s", "stop"], quiet=True, check=False)


def ccache_keys(count: int) -> list[str]:
    rng = secrets.SystemRandom()
    return ["".join(rng.choice(CCACHE_ALPHABET) for _ in range(33)) for _ in range(count)]


def populate(url: str, keys: list[str], headers: dict[str, str]) -> None:
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        for key in keys:
            response = client.put(f"/ccache/{key[:2]}/{key[2:]}", content=os.urandom(OBJECT_SIZE))
            response.raise_for_status()


def wrk(url: str, paths_file: Path, script: Path, duration: float, connections: int) -> dict[str, float]:
    """One bounded wrk run (2 threads, fixed connections and duration); requests/s and latency percentiles."""
    require_tool("wrk")
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{max(1, int(duration))}s", "--latency", "--timeout", "5s"]
    result = proc.run([*argv, "-s", script, url, "--", paths_file], quiet=True, timeout=duration + 60)
    text = result.output
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    figures: dict[str, float] = {"requests_per_second": rps}
    for percentile in ("50", "90", "99"):
        match = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
        if match:
            scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
            figures[f"p{percentile}_ms"] = round(float(match.group(1)) * scale, 3)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    figures["non_2xx"] = float(errors.group(1)) if errors else 0.0
    return figures


class TimedPutStore(LocalStore):
    """A local store that measures its last publish (put: move, check names/sizes/modes, rename), which a
    remote restore ends with, so that the bench can tell it apart from the download."""

    put_seconds = 0.0

    def put(
        self,
        key: str,
        outputs: Path,
        manifest: Mapping[str, str],
        *,
        move: bool = False,
        expected: Mapping[str, FileRecord] | None = None,
        verified: bool = False,
        durable: bool = True,
        written: WrittenTree | None = None,
    ) -> Path:
        started = time.monotonic()
        try:
            return super().put(
                key,
                outputs,
                manifest,
                move=move,
                expected=expected,
                verified=verified,
                durable=durable,
                written=written,
            )
        finally:
            self.put_seconds = time.monotonic() - started


def restore_bench(url: str, work: Path) -> dict[str, float | str]:
    from kernel_ci.cache.remote import CacheClient, RemoteConfig, RemoteStore

    source = REPO_ROOT / "out" / "build"
    if not (source / "entry.json").is_file():
        newest = next(iter(LocalStore().manifests()), None)
        if newest is None:
            return {"skipped": "no build output (out/build) or local cache entry to measure"}
        found = LocalStore().get(newest[0])
        assert found is not None
        source = found
    key = json.loads((source / "entry.json").read_text())["key"]
    pusher = RemoteStore(LocalStore(work / "pusher"), CacheClient(RemoteConfig(url, TOKEN)))
    started = time.monotonic()
    pusher.push(key, source)
    push_seconds = time.monotonic() - started
    local = TimedPutStore(work / "reader")
    reader = RemoteStore(local, CacheClient(RemoteConfig(url)))
    started = time.monotonic()
    entry = reader.get(key)
    restore_seconds = time.monotonic() - started
    publish_seconds = local.put_seconds
    assert entry is not None
    info = json.loads((entry / "entry.json").read_text())
    return {
        "key": key,
        "files": info["file_count"],
        "bytes": info["total_bytes"],
        "push_seconds": round(push_seconds, 2),
        "restore_seconds": round(restore_seconds, 2),
        "download_verify_unpack_seconds": round(restore_seconds - publish_seconds, 2),
        "local_publish_seconds": round(publish_seconds, 2),
    }


def run_cache_bench(out_dir: Path, duration: float = 10.0, connections: int = 16, workers: int = 2) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {
        # the reference (nginx) is measured in the same run, under the same load: the ratio is the figure
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": os.getloadavg()},
        "duration_s": duration,
        "connections": connections,
        "service_workers": workers,
        "nginx_workers": workers,  # the same count (worker_processes), not nginx's auto
    }
    with tempfile.TemporaryDirectory(prefix="kci-cachebench-") as tmp_name:
        tmp = Path(tmp_name)
        with service(tmp / "service", workers) as url:
            step("restore of a full build output from the service")
            results["restore"] = restore_bench(url, tmp / "restore")
            console.print(results["restore"])

            step(f"{OBJECTS} ccache objects of {OBJECT_SIZE // 1024} KiB: service vs nginx WebDAV")
            keys = ccache_keys(OBJECTS)
            populate(url, keys, {"Authorization": f"Bearer {TOKEN}"})
            script = tmp / "get.lua"
            script.write_text(WRK_SCRIPT)
            paths = tmp / "paths.txt"
            paths.write_text("".join(f"/ccache/{k[:2]}/{k[2:]}\n" for k in keys))
            with nginx(tmp / "webdav", tmp / "nginx", workers) as nginx_url:
                populate(nginx_url, keys, {})
                # one short warm-up each (connections, page cache), then the measured runs
                wrk(url, paths, script, 2, connections)
                wrk(nginx_url, paths, script, 2, connections)
                results["service"] = wrk(url, paths, script, duration, connections)
                results["nginx_webdav"] = wrk(nginx_url, paths, script, duration, connections)
        ratio = results["service"]["requests_per_second"] / results["nginx_webdav"]["requests_per_second"]
        results["throughput_ratio_service_to_nginx"] = round(ratio, 3)
    results["machine"]["load_after"] = os.getloadavg()
    (out_dir / "cache-bench.json").write_text(json.dumps(results, indent=1))
    _print(results)
    return results


def _print(results: dict) -> None:
    from rich.table import Table

    table = Table(title="build cache service bench", title_justify="left")
    table.add_column("what")
    table.add_column("figure", justify="right")
    restore = results.get("restore", {})
    if "restore_seconds" in restore:
        table.add_row(
            f"restore a full build ({restore['files']} files, {restore['bytes'] / 1e6:.0f} MB)",
            f"{restore['restore_seconds']} s",
        )
        table.add_row(
            "  of which download + verify + unpack", f"{restore['download_verify_unpack_seconds']} s"
        )
        table.add_row(
            "  of which local store publish (check + rename)", f"{restore['local_publish_seconds']} s"
        )
        table.add_row("push the same build (first time)", f"{restore['push_seconds']} s")
    for name in ("service", "nginx_webdav"):
        figures = results[name]
        table.add_row(
            f"10 KiB ccache GETs, {name}",
            f"{figures['requests_per_second']:.0f} req/s, p50 {figures.get('p50_ms', '?')} ms, "
            f"p99 {figures.get('p99_ms', '?')} ms",
        )
    table.add_row("throughput ratio service / nginx", f"{results['throughput_ratio_service_to_nginx']:.2f}")
    machine = results["machine"]
    load = ", ".join(f"{a:.1f}" for a in (*machine["load_before"], *machine.get("load_after", ())))
    table.add_row("load average (1/5/15 min, before then after)", load)
    table.add_row(
        "workers (service = nginx) x connections", f"{results['service_workers']} x {results['connections']}"
    )
    console.print(table)


GETS = 10_000  # a figure's "seconds": the time for this many GETs at the measured rate


def cache_figures(out_dir: Path, duration: float = 10.0) -> list[Figure]:
    """The cache bench as `kernel-ci bench` figures (bench.json, the README table): the restore of a full
    build, and the ccache GETs as the seconds GETS take at each server's measured rate, so that the
    ratio is service / nginx in time (the target, GETs >= 0.5x nginx's rate, is <= 2.0x here)."""
    results = run_cache_bench(out_dir, duration=duration)
    restore = results.get("restore", {})
    service, reference = results["service"], results["nginx_webdav"]
    figures = []
    if "restore_seconds" in restore:
        figures.append(
            Figure(
                "cache: restore a full build from the service",
                restore["restore_seconds"],
                "<= 1 s",
                f"{restore['files']} files, {restore['bytes'] / 1e6:.0f} MB; "
                f"push {restore['push_seconds']} s",
            )
        )
    figures.append(
        Figure(
            f"cache: {GETS} ccache GETs of {OBJECT_SIZE // 1024} KiB, service",
            round(GETS / service["requests_per_second"], 3),
            "<= 2.0x nginx (>= 0.5x its req/s)",
            f"{service['requests_per_second']:.0f} req/s, p99 {service.get('p99_ms', '?')} ms; nginx "
            f"{reference['requests_per_second']:.0f} req/s; {results['service_workers']} worker processes "
            f"each, {results['connections']} connections",
            reference=round(GETS / reference["requests_per_second"], 3),
            reference_name="nginx WebDAV, same objects, same run",
        )
    )
    return figures
