"""The "why did this miss" diff of a build against its nearest other build (kernel_ci.build.keys), bounded.

One explanation reads the inputs of every build in the index and diffs them all: O(builds) work that any
anonymous reader can ask for (the /builds/<key> page, /api/v1/builds/<key>/miss). Unbounded, a few dozen
such requests at once hold every worker thread and starve the ccache and blob readers. So each process
explains at most ``Limits.max_concurrent_explains`` at a time; one more is refused at once (503, "retry")
rather than queued, as a queue would hold connections and memory instead of threads."""

from __future__ import annotations

import threading
from typing import Any

from starlette.concurrency import run_in_threadpool

from kernel_ci.build import keys as buildkey
from kernel_ci.cache.server.service import CacheService, ServiceError

BUSY_RETRY_SECONDS = 1


class ExplainBusy(ServiceError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"too many miss explanations in progress (at most {limit} at once): retry in a moment",
            503,
            retry_after=BUSY_RETRY_SECONDS,
        )


class MissExplainer:
    def __init__(self, service: CacheService, limit: int) -> None:
        self.service = service
        self.limit = max(1, limit)
        self._slots = threading.BoundedSemaphore(self.limit)

    async def explain(self, key: str) -> dict[str, Any] | None:
        """The explanation of `key` (None: no such build); ExplainBusy when all slots are taken."""
        if not self._slots.acquire(blocking=False):  # never blocks the event loop
            self.service.metrics.inc("kernel_ci_cache_explain_refused_total")
            raise ExplainBusy(self.limit)
        try:
            return await run_in_threadpool(explain_miss, self.service, key)
        finally:
            self._slots.release()


def explain_miss(service: CacheService, key: str) -> dict[str, Any] | None:
    inputs = service.index.all_inputs()
    mine = next((m for k, m in inputs if k == key), None)
    if mine is None:
        return None
    others = [(k, m) for k, m in inputs if k != key]
    explanation = buildkey.explain_miss(mine, others)
    return {
        "key": key,
        "nearest": explanation.nearest_key,
        "candidates": explanation.candidates,
        "text": explanation.render(limit=40),
        "differences": [
            {"name": d.name, "cached": d.cached, "wanted": d.wanted, "describe": d.describe()}
            for d in explanation.differences
        ],
    }
