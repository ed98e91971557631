"""tracer.ko: exact counts per column, the control ioctls and their errors, process lifetimes, nmissed."""

from __future__ import annotations

import errno
import fcntl
import gzip
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import tracerlib as tl

# ---- the interface ----


def test_device_is_misc_10_42(tracer):
    st = os.stat(tl.DEV)
    assert stat.S_ISCHR(st.st_mode), f"{tl.DEV} is not a character device"
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (10, 42)


def test_proc_header_and_mode(tracer):
    text = tl.PROC.read_text()
    assert text.splitlines()[0].split() == tl.COLUMNS, text
    assert stat.S_IMODE(os.stat(tl.PROC).st_mode) == 0o444


def test_mutex_lock_symbol_chosen_at_load(tracer):
    """With CONFIG_DEBUG_LOCK_ALLOC=y mutex_lock is mutex_lock_nested: the probe follows the kernel."""
    config = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    nested = "CONFIG_DEBUG_LOCK_ALLOC=y" in config.splitlines()
    probes, _, text = tl.stats()
    want, other = ("mutex_lock_nested", "mutex_lock") if nested else ("mutex_lock", "mutex_lock_nested")
    assert want in probes and other not in probes, text


def test_probes_registered_with_the_kprobe_core(tracer):
    listed = tl.kprobes_listed(tl.TRACER_SYMBOLS)
    symbols = {line.split()[2].split("+")[0] for line in listed}
    expected = tl.TRACER_SYMBOLS - {"mutex_lock", "mutex_lock_nested"}
    assert expected <= symbols, "\n".join(listed)
    assert symbols & {"mutex_lock", "mutex_lock_nested"}, "\n".join(listed)
    print("\n".join(listed))  # [OPTIMIZED] marks the jump-optimized ones


# ---- exact counts: one parked run of every operation, one test per column ----


FULL = dict(count=37, size=100, step=8)


@pytest.fixture(scope="module")
def full_run(tracer):
    work = tl.Workload(**FULL)
    (m,) = tl.measure(tracer, work)
    return work, m


def test_workload_ran(full_run):
    _work, m = full_run
    assert m.status == 0, f"WL_RUN in the worker failed: {tl.errname(m.status)}"
    assert m.pid in m.before and m.pid in m.after, m.describe()


@pytest.mark.parametrize("column", tl.COUNTERS)
def test_exact_count(full_run, column):
    work, m = full_run
    want = work.expected()[column]
    got = m.delta()[column]
    assert got == want, f"{column}: {got} counted, {want} done\n{m.describe()}"


def test_each_operation_only_moves_its_columns(tracer):
    works = [
        tl.Workload(count=13, size=40, ops=tl.WL_OP_KMALLOC),
        tl.Workload(count=17, ops=tl.WL_OP_MUTEX),
        tl.Workload(count=19, ops=tl.WL_OP_SEM),
        tl.Workload(count=11, ops=tl.WL_OP_SCHED),
    ]
    for work in works:
        (m,) = tl.measure(tracer, work)
        assert m.status == 0, tl.errname(m.status)
        assert m.delta() == work.expected(), f"ops {work.ops:#x}\n{m.describe()}"


def test_large_allocations_bytes(tracer):
    """Sizes above the largest kmalloc cache (kmalloc_large, page allocator) are counted the same way."""
    work = tl.Workload(count=8, size=5000, step=3000, ops=tl.WL_OP_KMALLOC)
    (m,) = tl.measure(tracer, work)
    assert m.status == 0, tl.errname(m.status)
    assert m.delta() == work.expected(), m.describe()


def test_exact_on_repeated_runs(tracer):
    for i in range(5):
        work = tl.Workload(count=5 + 7 * i, size=24 + i, step=i)
        (m,) = tl.measure(tracer, work)
        assert m.status == 0, tl.errname(m.status)
        assert m.delta() == work.expected(), f"run {i}\n{m.describe()}"


# ---- frees that bypass kfree() ----


def _parked_with_records(tracer, work: tl.Workload, settle=None):
    """Run a parked workload; the tables and records in use at both parks (settle() runs while parked
    after, before the second look). Returns (Measured, records before, records after)."""
    work.start()
    try:
        tracer.add(work.pid)
        work.wait(tl.WL_PARKED_BEFORE)
        before, held_before = tl.table(), tl.pool_used("records")
        work.release()
        work.wait(tl.WL_PARKED_AFTER)
        if settle:
            settle(held_before)
        after, held_after = tl.table(), tl.pool_used("records")
        work.release()
    except BaseException:
        work.abort()
        raise
    return tl.Measured(before, after, work.pid, work.finish()), held_before, held_after


def test_kfree_bulk_releases_bytes_and_records(tracer):
    """kfree_bulk() frees kmalloc blocks without calling kfree(): the tracer probes kmem_cache_free_bulk(),
    so their bytes go to the caller's kfree_mem and their records back to the pool (not stale records)."""
    work = tl.Workload(count=40, size=48, step=8, ops=tl.WL_OP_BULK)
    m, held_before, held_after = _parked_with_records(tracer, work)
    assert m.status == 0, tl.errname(m.status)
    assert m.delta() == work.expected(), m.describe()
    assert held_after <= held_before, f"{held_after - held_before} stale records\n{tl.stats()[2]}"


def test_kfree_rcu_releases_records(tracer):
    """kvfree_rcu() frees later, in batches, through kfree_bulk(): the records go once the batch is freed
    (the worker is still alive and monitored, so they cannot go with it)."""
    work = tl.Workload(count=40, size=40, step=4, ops=tl.WL_OP_KFREE_RCU)

    def until_released(held_before: int) -> None:
        deadline = time.monotonic() + 20  # a grace period and the batch's drain delay, under TCG
        while tl.pool_used("records") > held_before and time.monotonic() < deadline:
            time.sleep(0.1)

    m, held_before, held_after = _parked_with_records(tracer, work, until_released)
    assert m.status == 0, tl.errname(m.status)
    want = work.expected()
    got = m.delta()
    for column in ("kmalloc", "kmalloc_mem"):
        assert got[column] == want[column], f"{column}\n{m.describe()}"
    assert held_after <= held_before, f"{held_after - held_before} stale records after 20 s\n{tl.stats()[2]}"


# ---- add / remove ----


def test_add_remove_add_again(tracer):
    pid = tl.sleeper()
    try:
        assert pid not in tl.table()
        tracer.add(pid)
        t = tl.table()
        assert pid in t, t.text
        tracer.remove(pid)
        t = tl.table()
        assert pid not in t, t.text
        tracer.add(pid)
        t = tl.table()
        assert pid in t, t.text
        tracer.remove(pid)
    finally:
        tl.kill_and_reap(pid)


def test_counts_restart_after_remove_and_add(tracer):
    """A worker with non-zero counts, parked (nothing moves), removed and added again: all zero."""
    work = tl.Workload(count=9)
    work.start()
    try:
        tracer.add(work.pid)
        work.wait(tl.WL_PARKED_BEFORE)
        work.release()
        work.wait(tl.WL_PARKED_AFTER)
        t = tl.table()
        assert t[work.pid]["lock"] >= 9, t.text
        tracer.remove(work.pid)
        tracer.add(work.pid)
        t = tl.table()
        assert t[work.pid] == dict.fromkeys(tl.COUNTERS, 0), t.text
        work.release()
    except BaseException:
        work.abort()
        raise
    assert work.finish() == 0


def test_exited_process_disappears(tracer):
    pid = tl.sleeper()
    tracer.add(pid)
    assert pid in tl.table()
    os.kill(pid, 9)
    # a zombie (not reaped yet) is already gone from the table: do_exit dropped it
    t = tl.wait_gone(pid)
    assert pid not in t, f"pid {pid} still listed after it exited\n{t.text}"
    os.waitpid(pid, 0)
    assert pid not in tl.table()


def test_exited_process_records_dropped(tracer):
    """A monitored process exits holding __kmalloc'd memory (pipe buffers): its records go with it."""
    assert not tl.table().rows, "a process is still monitored before the test"
    pid = tl.sleeper(pipes=8)
    tracer.add(pid)
    tl.poke(pid)  # it makes 8 pipes now, while monitored
    held = tl.pool_used("records")
    t = tl.table()
    tl.kill_and_reap(pid)
    assert held >= 8, f"{held} records for 8 live pipes\n{t.text}{tl.stats()[2]}"
    t = tl.wait_gone(pid)
    _, pools, text = tl.stats()
    assert pools["processes"][0].startswith("0/"), text + t.text
    assert pools["records"][0].startswith("0/"), text + t.text


def test_two_monitored_processes_kept_apart(tracer):
    a = tl.Workload(count=10, size=32, step=4)
    b = tl.Workload(count=25, size=200, step=16)
    ma, mb = tl.measure(tracer, a, b)
    assert ma.status == 0 and mb.status == 0
    assert ma.delta() == a.expected(), ma.describe()
    assert mb.delta() == b.expected(), mb.describe()


def test_unmonitored_process_never_shows(tracer):
    work = tl.Workload(count=30, park=False)
    work.start()
    seen = set()
    try:
        for _ in range(20):
            t = tl.table()
            seen |= set(t.rows)
    finally:
        status = work.finish()
    assert status == 0, tl.errname(status)
    t = tl.table()
    assert work.pid not in seen and work.pid not in t, t.text
    assert os.getpid() not in seen and os.getpid() not in t.rows, t.text


# ---- errors ----


def test_unknown_ioctl_is_enotty(tracer):
    for cmd in (0, 0x1234, tl.TRACER_ADD_PROCESS + 2, tl.WL_RUN):
        assert tracer.error(cmd, os.getpid()) == errno.ENOTTY, f"cmd {cmd:#x}"


def test_add_nonexistent_pid_is_esrch(tracer):
    pid = tl.sleeper()
    tl.kill_and_reap(pid)  # a pid that existed and is free now
    assert tracer.error(tl.TRACER_ADD_PROCESS, pid) == errno.ESRCH
    assert tracer.error(tl.TRACER_ADD_PROCESS, 4194304 + 1) == errno.ESRCH  # above pid_max


def test_add_invalid_pid_is_einval(tracer):
    for pid in (0, -1, -12345):
        assert tracer.error(tl.TRACER_ADD_PROCESS, pid) == errno.EINVAL, pid


def test_add_twice_is_eexist(tracer):
    pid = tl.sleeper()
    try:
        tracer.add(pid)
        assert tracer.error(tl.TRACER_ADD_PROCESS, pid) == errno.EEXIST
        t = tl.table()
        assert list(t.rows).count(pid) == 1, t.text
        tracer.remove(pid)
    finally:
        tl.kill_and_reap(pid)


def test_remove_never_added_is_enoent(tracer):
    pid = tl.sleeper()
    try:
        assert tracer.error(tl.TRACER_REMOVE_PROCESS, pid) == errno.ENOENT
    finally:
        tl.kill_and_reap(pid)
    assert tracer.error(tl.TRACER_REMOVE_PROCESS, pid) == errno.ENOENT  # and once it is gone
    assert tracer.error(tl.TRACER_REMOVE_PROCESS, 0) == errno.EINVAL


def test_remove_twice_is_enoent(tracer):
    pid = tl.sleeper()
    try:
        tracer.add(pid)
        tracer.remove(pid)
        assert tracer.error(tl.TRACER_REMOVE_PROCESS, pid) == errno.ENOENT
    finally:
        tl.kill_and_reap(pid)


# ---- concurrency ----


def test_read_while_processes_come_and_go(tracer):
    """Batches of workers are added, some removed, and exit, while /proc/tracer is read all the time."""
    stop = threading.Event()
    errors: list[str] = []
    reads = 0

    def reader():
        nonlocal reads
        while not stop.is_set():
            try:
                tl.table()  # parses strictly: header, 10 integers per line, no pid twice
                reads += 1
            except Exception as e:  # collected and reported below
                errors.append(repr(e))
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for th in threads:
        th.start()
    pids = []
    try:
        for batch in range(10):
            works = [
                tl.Workload(count=5, park=False, ops=tl.WL_OP_KMALLOC | tl.WL_OP_MUTEX) for _ in range(4)
            ]
            for w in works:
                w.start()
            for i, w in enumerate(works):
                try:
                    tracer.add(w.pid)
                except OSError as e:
                    assert e.errno == errno.ESRCH, e  # it may already have exited
                if (batch + i) % 3 == 0:
                    try:
                        tracer.remove(w.pid)
                    except OSError as e:
                        assert e.errno == errno.ENOENT, e
            for w in works:
                assert w.finish() == 0
                pids.append(w.pid)
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors, errors
    assert reads > 0
    t = tl.table()
    assert not set(pids) & set(t.rows), f"exited processes still listed\n{t.text}"


def test_tracer_ioctls_count_nothing_of_the_tracers_own(tracer):
    """A monitored process that adds and removes another pid 20 times: the tracer allocates nothing of its
    own, so every column but sched (a return to user space may reschedule) moves exactly as in a round
    with no ioctl. The process sleeps in read(2) at both snapshots; each round is woken by one byte."""
    target = tl.sleeper()
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            dev = tl.Tracer()
            while True:
                rounds = os.read(go_r, 1)[0]
                for _ in range(rounds):
                    dev.add(target)
                    dev.remove(target)
                os.write(done_w, b"d")
        finally:
            os._exit(1)
    os.close(go_r)
    os.close(done_w)
    try:
        tl.wait_asleep(pid)
        tracer.add(pid)

        def round_delta(rounds: int) -> tuple[dict[str, int], str]:
            before = tl.table()
            os.write(go_w, bytes([rounds]))
            assert os.read(done_r, 1) == b"d"
            tl.wait_asleep(pid)
            after = tl.table()
            delta = {c: after[pid][c] - before[pid][c] for c in tl.COUNTERS if c != "sched"}
            return delta, before.text + after.text

        round_delta(20)  # warm up: the code paths of the loop are faulted in once
        idle, idle_text = round_delta(0)
        busy, busy_text = round_delta(20)
        assert busy == idle, f"20 add/remove: {busy}, none: {idle}\n{idle_text}{busy_text}"
    finally:
        tl.kill_and_reap(pid)
        tl.kill_and_reap(target)
        os.close(go_w)
        os.close(done_r)


# ---- misses ----


def test_stats_list_every_probe_with_nmissed(tracer):
    probes, pools, text = tl.stats()
    for symbol in (
        "__kmalloc",
        "kfree",
        "schedule",
        "up",
        "down_interruptible",
        "mutex_unlock",
        "kmem_cache_free_bulk",
    ):
        assert symbol in probes, text
        assert probes[symbol]["nmissed"].isdigit(), text
    assert "mutex_lock" in probes or "mutex_lock_nested" in probes, text
    assert set(pools) == {"processes", "records"}, text


def test_nmissed_counts_missed_hits(tracer):
    """kfree called from inside a kprobe handler is not run through the tracer's probe: reported as missed."""
    before = tl.nmissed("kfree")
    fd = os.open(tl.WL_DEV, os.O_RDWR)
    try:
        ran = fcntl.ioctl(fd, tl.WL_MISS, 7)
    finally:
        os.close(fd)
    assert ran == 7, f"the workload's probe handler ran {ran} times"
    after = tl.nmissed("kfree")
    assert after - before == 7, tl.stats()[2]


# ---- unload ----


def test_unload_removes_device_and_proc_files(tracer):
    tracer.close()
    pid = tl.sleeper()
    try:
        dev = tl.Tracer()
        dev.add(pid)  # unload while something is traced
        dev.close()
        tl.unload_tracer()  # also: every probe released by the kprobe core
        assert not tl.DEV.exists() and not tl.PROC.exists() and not tl.STATS.exists()
        tl.insmod(tl.TRACER)
        assert tl.table().rows == {}, "a fresh load starts with an empty table"
    finally:
        tl.kill_and_reap(pid)
        tracer.fd = os.open(tl.DEV, os.O_RDWR)  # the fixture closes it
