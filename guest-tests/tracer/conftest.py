"""Fixtures of the tracer suite: the workload helper module for the whole run, tracer.ko per test file."""

from __future__ import annotations

import pytest
import tracerlib as tl


@pytest.fixture(scope="session", autouse=True)
def workload_module():
    tl.debugfs_ready()
    tl.ensure_loaded(tl.WORKLOAD)
    yield
    tl.ensure_unloaded(tl.WORKLOAD)


@pytest.fixture(scope="module")
def tracer():
    """tracer.ko loaded and /dev/tracer open (unloaded again after the file's tests)."""
    tl.ensure_loaded(tl.TRACER)
    dev = tl.Tracer()
    yield dev
    dev.close()
    tl.ensure_unloaded(tl.TRACER)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test carries the /proc/tracer and /proc/tracer_stats text at the time of the failure."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for path in (tl.PROC, tl.STATS):
            try:
                text = path.read_text()
            except OSError as e:
                text = f"({e})"
            report.sections.append((str(path), text))
            print(f"--- {path} at the failure:\n{text}")
