"""The service's Prometheus metrics, through prometheus-client (the library every exporter uses): its text
format, label escaping and histogram buckets instead of hand-written ones, and above all its
multiprocess mode.

Why multiprocess mode: ``kernel-ci cache serve --workers N`` runs N uvicorn worker processes behind one
socket, and a scrape of ``/metrics`` lands on one of them. Counters kept in a process's memory would show
that one worker's share, a different one on every scrape. In multiprocess mode each process writes its
values to files under ``PROMETHEUS_MULTIPROC_DIR``, and a scrape, whichever worker answers it, sums the
files of all workers. ``server.serve`` is the one place that sets that variable (see
``server.metrics_dir``). Without it (one process, or the tests' in-thread servers) each
``Metrics`` object has its own registry, so two services in one process never share counters.

The gauges (builds, blobs, bytes, ...) are read from the index at scrape time and rendered by this
module's collector: they describe the shared store, not a process, so they are never summed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY = "kernel_ci_cache_request_duration_seconds"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)

# name -> (help, label names): every counter the service increments, declared once
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kernel_ci_cache_requests_total": (
        "look-ups by kind (build, blob, ccache) and result",
        ("kind", "result"),
    ),
    "kernel_ci_cache_http_responses_total": ("HTTP responses by route group", ("route", "method", "code")),
    "kernel_ci_cache_published_total": ("build manifests published, by result", ("result",)),
    "kernel_ci_cache_uploaded_bytes_total": ("bytes uploaded, by kind", ("kind",)),
    "kernel_ci_cache_evictions_total": ("entries evicted to make room, by kind", ("kind",)),
    "kernel_ci_cache_corrupt_blobs_total": ("stored blobs that no longer matched their digest", ()),
    "kernel_ci_cache_explain_refused_total": ("miss explanations refused (too many at once)", ()),
}


class _Gauges(Collector):
    def __init__(self, gauges: dict[str, tuple[str, float]]) -> None:
        self.gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, (help_text, value) in self.gauges.items():
            yield GaugeMetricFamily(name, help_text, value=value)


class Metrics:
    """Counters and the request latency histogram of the service (summed over workers, see above)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.counters = {
            name: Counter(name, help_text, labels, registry=self.registry)
            for name, (help_text, labels) in COUNTERS.items()
        }
        self.latency = Histogram(
            LATENCY,
            "request latency by route",
            ("route", "method"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

        # labelled children by their labels: .labels() costs ~10x the increment, and the ccache read path
        # counts three things per request
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}

    def child(self, name: str, **labels: str) -> Any:
        """The labelled counter (or LATENCY histogram) itself, for a caller that counts it per request."""
        return self._child(name, labels)

    def _child(self, name: str, labels: dict[str, str]) -> Any:
        key = (name, tuple(labels.values()))
        child = self._children.get(key)
        if child is None:
            parent = self.latency if name == LATENCY else self.counters[name]
            child = self._children[key] = parent.labels(**labels) if labels else parent
        return child

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        self._child(name, labels).inc(amount)

    def observe(self, seconds: float, **labels: str) -> None:
        self._child(LATENCY, labels).observe(seconds)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The Prometheus text format: the gauges, then the counters and histogram (of all workers)."""
        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(_Gauges(gauges))
        text = generate_latest(scrape)
        if os.environ.get(MULTIPROC_ENV):
            workers = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(workers)
            text += generate_latest(workers)
        else:
            text += generate_latest(self.registry)
        return text.decode()
