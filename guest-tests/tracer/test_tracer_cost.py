"""The cost of monitoring on an allocation-heavy workload, with 0, 1 and 16 of its processes monitored.

WORKERS processes each make ROUNDS x WL_RUN of COUNT kmalloc + kfree pairs (not parked), all released at
once; a figure is the wall time of the whole batch per pair (median of REPEATS batches). With nothing
monitored every probe returns at once; with something monitored every kfree() in the system looks its
address up (lockless, under RCU) and only the monitored processes' own __kmalloc returns take tracer_lock.
The figures go to $KCI_ARTIFACTS/tracer-cost.json, which `kernel-ci bench` reads (ci/guestbench.py). The
tests check that every configuration ran and counted, not how fast it was (that depends on the host).
"""

from __future__ import annotations

import fcntl
import json
import os
import statistics
import struct
import time
from pathlib import Path

import pytest
import tracerlib as tl

WORKERS = 16
ROUNDS = 8
COUNT = 256
SIZE = 64
REPEATS = 3
MONITORED = (0, 1, 16)
PAIRS = WORKERS * ROUNDS * COUNT


def _fork_worker(fd: int, go: int, stop: int) -> int:
    """A child that waits for a byte on go, then runs its rounds on the open workload file fd."""
    arg = struct.pack(tl.WL_RUN_FORMAT, COUNT, SIZE, 0, tl.WL_OP_KMALLOC, 0)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(stop)
            os.read(go, 1)
            for _ in range(ROUNDS):
                fcntl.ioctl(fd, tl.WL_RUN, arg)
            code = 0
        finally:
            os._exit(code)
    return pid


def batch_seconds(tracer: tl.Tracer | None, monitored: int) -> float:
    """The seconds of one batch, with the first `monitored` workers monitored."""
    fds = [os.open(tl.WL_DEV, os.O_RDWR) for _ in range(WORKERS)]  # one run at a time per open file
    go_r, go_w = os.pipe()
    pids: list[int] = []
    try:
        pids = [_fork_worker(fd, go_r, go_w) for fd in fds]
        for pid in pids[:monitored]:
            assert tracer is not None
            tracer.add(pid)
        start = time.monotonic()
        os.write(go_w, b"g" * WORKERS)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        seconds = time.monotonic() - start
        pids = []
        assert codes == [0] * WORKERS, f"worker exit codes {codes}"
        return seconds
    finally:
        for pid in pids:
            tl.kill_and_reap(pid)
        for fd in [*fds, go_r, go_w]:
            os.close(fd)


@pytest.fixture(scope="module")
def figures():
    """Every configuration REPEATS times: the tracer not loaded, then loaded with 0, 1 and 16 monitored."""
    tl.ensure_unloaded(tl.TRACER)
    seconds: dict[str, list[float]] = {"tracer not loaded": []}
    for _ in range(REPEATS):
        seconds["tracer not loaded"].append(batch_seconds(None, 0))
    tl.insmod(tl.TRACER)
    dev = tl.Tracer()
    try:
        for _ in range(REPEATS):
            for n in MONITORED:
                seconds.setdefault(f"{n} monitored", []).append(batch_seconds(dev, n))
                tl.table()  # drops the exited workers
        _, pools, stats_text = tl.stats()
    finally:
        dev.close()
        tl.unload_tracer()
    result = {
        "workload": f"{WORKERS} processes x {ROUNDS} x (kmalloc({SIZE}) x {COUNT}, kfree x {COUNT})",
        "pairs_per_batch": PAIRS,
        "ns_per_pair": {name: statistics.median(s) * 1e9 / PAIRS for name, s in seconds.items()},
        "seconds": seconds,
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
    assert all(len(s) == REPEATS and min(s) > 0 for s in figures["seconds"].values()), figures


def test_no_record_or_process_left(figures):
    """Every monitored worker exited and was dropped, every block it allocated was freed: pools empty."""
    pools = figures["pools_after"]
    assert pools["processes"][0].startswith("0/") and pools["records"][0].startswith("0/"), pools
