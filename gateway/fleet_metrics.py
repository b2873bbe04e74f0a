"""The fleet as Redis shows it, as gauges: queue depth and the oldest waiter's age, leases,
running requests, live and accepting workers per model and backend.

Every gateway reads these each health beat and reports the same values (dashboards and
alerts take `max by (model)`). A model seen once keeps reporting, at 0, after its last
worker is gone: "no live worker for a served model" is then a value, not a missing series.
"""

from __future__ import annotations

import time
from collections import Counter

from gateway import metrics
from gateway.models import ModelRegistry
from gateway.redis_queue import RedisQueue


class FleetMetrics:
    """Sets the fleet gauges from one gateway's registry snapshot and queue reads."""

    def __init__(self, registry: ModelRegistry, queue: RedisQueue) -> None:
        self._registry = registry
        self._queue = queue
        self._models: set[str] = set()
        self._backends: set[tuple[str, str]] = set()

    def update_workers(self) -> None:
        """Set the workers' gauges from the registry's snapshot (no Redis read; after a
        refresh). The gateway sets them before its health follows the same snapshot, so a
        probe that sees /readyz change sees the workers that changed it."""
        self._models.update(self._registry.served())
        live: Counter[tuple[str, str]] = Counter()
        accepting: Counter[tuple[str, str]] = Counter()
        for model in sorted(self._models):
            workers = self._registry.workers(model)
            metrics.REQUESTS_RUNNING.labels(model).set(sum(w.running for w in workers))
            metrics.WORKER_SLOTS.labels(model).set(
                sum(w.capacity for w in workers if not w.draining))
            for w in workers:
                live[model, w.backend] += 1
                accepting[model, w.backend] += not w.draining
        self._backends.update(live)
        for key in self._backends:
            metrics.WORKERS.labels(*key).set(live[key])
            metrics.WORKERS_ACCEPTING.labels(*key).set(accepting[key])

    async def update_queues(self) -> None:
        """Read the queues of every model seen and set their gauges. Raises
        UnavailableError when Redis is unreachable; the gauges keep their last values then."""
        models = sorted(self._models)
        stats = await self._queue.queue_stats(models)
        now_ms = time.time() * 1000
        for model in models:
            s = stats[model]
            metrics.QUEUE_DEPTH.labels(model).set(s.depth)
            metrics.REQUESTS_LEASED.labels(model).set(s.leased)
            metrics.QUEUE_OLDEST_AGE.labels(model).set(
                0.0 if s.oldest_enqueue_ms is None else max(0.0, now_ms - s.oldest_enqueue_ms)
                / 1000)
