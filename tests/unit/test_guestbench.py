"""The tracer cost figures of `kernel-ci bench`, read from the artifact the tracer suite writes."""

from __future__ import annotations

import pytest

from kernel_ci.bench.guest import TRACER_COST_RUNS, tracer_cost_figures

COST = {
    "workload": "16 processes x 4 x (kmalloc(64) x 256, kfree x 256)",
    "pairs_per_batch": 16384,
    "measured": True,
    "ns_per_pair": {
        "tracer not loaded": 50000.0,
        "0 monitored": 51000.4,
        "1 monitored": 60000.0,
        "16 monitored": 70000.0,
    },
    "seconds": {
        "tracer not loaded": [0.9, 0.8, 1.0],
        "0 monitored": [0.85, 0.8, 0.9],
        "1 monitored": [1.0, 0.95, 2.0],
        "16 monitored": [1.2, 1.1, 1.15],
    },
}


def test_one_figure_per_configuration_with_the_median_batch() -> None:
    figures = tracer_cost_figures(COST)
    assert [f.name for f in figures] == [f"tracer: allocation-heavy batch, {n}" for n in TRACER_COST_RUNS]
    assert [f.seconds for f in figures] == [0.9, 0.85, 1.0, 1.15]
    assert figures[1].note.startswith("51,000 ns per kmalloc+kfree (16 processes")


def test_a_missing_configuration_is_an_error_not_a_silent_gap() -> None:
    partial = {**COST, "seconds": {k: v for k, v in COST["seconds"].items() if k != "16 monitored"}}
    with pytest.raises(KeyError, match="16 monitored"):
        tracer_cost_figures(partial)


def test_a_functional_run_s_file_is_not_a_figure() -> None:
    """An ordinary run (no kci.bench=1) makes one round per batch: its seconds are not the workload's."""
    with pytest.raises(ValueError, match="functional"):
        tracer_cost_figures({**COST, "measured": False})
    with pytest.raises(ValueError, match="functional"):
        tracer_cost_figures({k: v for k, v in COST.items() if k != "measured"})  # written before the flag
