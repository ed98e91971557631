"""The cost of monitoring on an allocation-heavy workload, with 0, 1 and 16 of its processes monitored.

WORKERS processes each make ROUNDS x WL_RUN of COUNT kmalloc + kfree pairs (not parked), all released at
once; a figure is the wall time of the whole batch per pair (median of the batches after a warm-up one).
With nothing monitored every probe returns at once; with something monitored every kfree() in the system
looks its address up (lockless, under RCU) and only the monitored processes' own __kmalloc returns take
tracer_lock. The figures go to $KCI_ARTIFACTS/tracer-cost.json, which `kernel-ci bench` reads
(kernel_ci/bench/guest.py). The tests check that every configuration ran and counted, not how fast it was
(that depends on the host).

Figures take full batches (ROUNDS x REPEATS: ~20 s under TCG), which only the bench asks for, with
`kci.bench=1` on the kernel command line; an ordinary run makes one round per batch and one batch after the
warm-up, which runs every configuration and every check below in about a second.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import statistics
import struct
import time
from pathlib import Path

import pytest
import tracerlib as tl


def _kasan_kernel() -> bool:
    config = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    return "CONFIG_KASAN=y" in config.splitlines()


def _measuring() -> bool:
    return "kci.bench=1" in Path("/proc/cmdline").read_text().split()


MEASURING = _measuring()
WORKERS = 16
# On a KASAN kernel (kconfig/debug.config) every allocation saves a stack trace for KASAN and kmemleak and
# is ~20 times slower; 24 rounds there ran for minutes without a line on the console, which the host reads
# as a hung guest. One round still runs every configuration and check; its figures are not the CI kernel's.
ROUNDS = 24 if MEASURING and not _kasan_kernel() else 1
COUNT = 256
SIZE = 64
REPEATS = 4 if MEASURING else 2  # the first batch of each configuration is a warm-up, not counted
MONITORED = (0, 1, 16)
PAIRS = WORKERS * ROUNDS * COUNT


def _fork_worker(fd: int, go: int, done: int, leave: int) -> int:
    """A child that waits for a byte on go, runs its rounds on the open workload file fd, writes a byte to
    done, and exits once it reads a byte on leave (so that the driver can read its counts first)."""
    arg = struct.pack(tl.WL_RUN_FORMAT, COUNT, SIZE, 0, tl.WL_OP_KMALLOC, 0)
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            os.read(go, 1)
            for _ in range(ROUNDS):
                fcntl.ioctl(fd, tl.WL_RUN, arg)
            ok = True
        finally:
            os.write(done, b"d" if ok else b"f")  # the driver waits for one byte per worker, failed or not
            if ok:
                os.read(leave, 1)
            os._exit(0 if ok else 1)
    return pid


def batch(tracer: tl.Tracer | None, monitored: int) -> tuple[float, dict[int, int]]:
    """One batch with the first `monitored` workers monitored: its seconds (from the go to the last worker
    done) and the kmalloc column of each monitored worker afterwards."""
    fds = [os.open(tl.WL_DEV, os.O_RDWR) for _ in range(WORKERS)]  # one run at a time per open file
    go, done, leave = os.pipe(), os.pipe(), os.pipe()
    pids: list[int] = []
    try:
        pids = [_fork_worker(fd, go[0], done[1], leave[0]) for fd in fds]
        for pid in pids[:monitored]:
            assert tracer is not None
            tracer.add(pid)
        start = time.monotonic()
        os.write(go[1], b"g" * WORKERS)
        ends = b"".join(os.read(done[0], 1) for _ in range(WORKERS))
        seconds = time.monotonic() - start
        assert ends == b"d" * WORKERS, f"{ends.count(b'f')} worker(s) failed their WL_RUN"
        counted = {}
        if monitored:
            t = tl.table()
            counted = {pid: t[pid]["kmalloc"] for pid in pids[:monitored]}
        os.write(leave[1], b"l" * WORKERS)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        pids = []
        assert codes == [0] * WORKERS, f"worker exit codes {codes}"
        return seconds, counted
    finally:
        for pid in pids:
            tl.kill_and_reap(pid)
        for fd in [*fds, *go, *done, *leave]:
            os.close(fd)


@pytest.fixture(scope="module")
def figures():
    """Every configuration REPEATS times: the tracer not loaded, then loaded with 0, 1 and 16 monitored."""
    tl.ensure_unloaded(tl.TRACER)
    seconds: dict[str, list[float]] = {"tracer not loaded": []}
    counted: dict[str, list[int]] = {}
    for _ in range(REPEATS):
        seconds["tracer not loaded"].append(batch(None, 0)[0])
    tl.insmod(tl.TRACER)
    dev = tl.Tracer()
    try:
        for _ in range(REPEATS):
            for n in MONITORED:
                took, kmallocs = batch(dev, n)
                seconds.setdefault(f"{n} monitored", []).append(took)
                counted.setdefault(f"{n} monitored", []).extend(kmallocs.values())
                tl.table()  # drops the exited workers
        _, pools, stats_text = tl.stats()
    finally:
        dev.close()
        tl.unload_tracer()
    timed = {name: s[1:] for name, s in seconds.items()}  # without the warm-up batch
    result = {
        "workload": f"{WORKERS} processes x {ROUNDS} x (kmalloc({SIZE}) x {COUNT}, kfree x {COUNT})",
        "kasan": _kasan_kernel(),
        "measured": MEASURING,  # full batches (kci.bench=1), else a functional run: not a figure
        "pairs_per_batch": PAIRS,
        "ns_per_pair": {name: statistics.median(s) * 1e9 / PAIRS for name, s in timed.items()},
        "seconds": timed,
        "warm_up_seconds": {name: s[0] for name, s in seconds.items()},
        "kmalloc_counted": {name: min(c) for name, c in counted.items() if c},
        "pools_after": pools,
    }
    text = json.dumps(result, indent=2)
    artifacts = Path(os.environ.get("KCI_ARTIFACTS", "/tmp"))
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "tracer-cost.json").write_text(text + "\n")
    print(text)
    print(stats_text)
    return result


def test_every_configuration_measured(figures):
    names = ["tracer not loaded", *(f"{n} monitored" for n in MONITORED)]
    assert list(figures["ns_per_pair"]) == names
    assert all(len(s) == REPEATS - 1 and min(s) > 0 for s in figures["seconds"].values()), figures


def test_monitored_workers_were_counted(figures):
    """The monitored configurations really monitored: every monitored worker's kmalloc column has at least
    its ROUNDS x COUNT calls (its system calls may add a few)."""
    assert set(figures["kmalloc_counted"]) == {"1 monitored", "16 monitored"}, figures
    assert all(n >= ROUNDS * COUNT for n in figures["kmalloc_counted"].values()), figures


def test_no_record_or_process_left(figures):
    """Every monitored worker exited and was dropped, every block it allocated was freed: pools empty."""
    pools = figures["pools_after"]
    assert pools["processes"][0].startswith("0/") and pools["records"][0].startswith("0/"), pools
