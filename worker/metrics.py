"""Prometheus metrics of one worker, on a registry of its own (so tests can make several).

    metrics = WorkerMetrics()
    metrics.serve(9400)          # /metrics on 127.0.0.1:9400
    metrics.observe_step(0.012, tokens=8)
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from worker.backends.base import DeviceStats

if TYPE_CHECKING:
    from worker.engine.scheduler import PrefixCacheStats

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
"""Decode steps are milliseconds; a step carrying a long prefill chunk can take seconds."""


def rss_bytes() -> int:
    """Resident memory of this process now (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class WorkerMetrics:
    """Load, throughput, latency and memory of one worker."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.running = Gauge("npuserve_worker_running_requests",
                             "Requests in the running batch", registry=r)
        self.waiting = Gauge("npuserve_worker_waiting_requests",
                             "Claimed requests waiting for a batch slot or KV blocks", registry=r)
        self.generated_tokens = Counter("npuserve_worker_generated_tokens",
                                        "Tokens generated and published", registry=r)
        self.step_seconds = Histogram("npuserve_worker_step_seconds",
                                      "Duration of one engine step", buckets=STEP_BUCKETS,
                                      registry=r)
        self.finished = Counter("npuserve_worker_requests_finished",
                                "Requests ended by this worker, by finish reason",
                                ["reason"], registry=r)
        self.device_failures = Counter(
            "npuserve_worker_device_failures",
            "Requests whose device call failed: retried (handed back) or failed", ["outcome"],
            registry=r)
        self.weight_bytes = Gauge("npuserve_worker_weight_bytes",
                                  "Bytes of model weights read per decode step", registry=r)
        self.weight_memory_bytes = Gauge(
            "npuserve_worker_weight_memory_bytes",
            "Bytes the model weights hold in memory (packed copies included)", registry=r)
        self.kv_cache_bytes = Gauge("npuserve_worker_kv_cache_bytes",
                                    "Bytes held by the KV cache", registry=r)
        self.rss_bytes = Gauge("npuserve_worker_rss_bytes",
                               "Resident memory of the worker process", registry=r)
        self.kv_blocks_used = Gauge("npuserve_worker_kv_blocks_used",
                                    "KV cache blocks owned by requests", registry=r)
        self.device_memory_total = Gauge(
            "npuserve_worker_device_memory_total_bytes",
            "Accelerator memory in all, as its driver reports it", ["device"], registry=r)
        self.device_memory_used = Gauge(
            "npuserve_worker_device_memory_used_bytes",
            "Accelerator memory in use (all processes), as its driver reports it", ["device"],
            registry=r)
        self.device_utilization = Gauge(
            "npuserve_worker_device_utilization",
            "Busy fraction of the accelerator's compute units, 0..1", ["device"], registry=r)
        self.kv_blocks_total = Gauge("npuserve_worker_kv_blocks_total",
                                     "KV cache blocks in all", registry=r)
        self.step_in_progress = Gauge(
            "npuserve_worker_step_in_progress_seconds",
            "How long the engine step now running has run (0 between steps)", registry=r)
        self.prompt_tokens = Counter(
            "npuserve_worker_prompt_tokens",
            "Tokens admitted requests needed in the KV cache: prompts, and the tokens already "
            "generated of preempted or resumed requests (counted at each admission)", registry=r)
        self.prompt_tokens_cached = Counter(
            "npuserve_worker_prompt_tokens_cached",
            "Of npuserve_worker_prompt_tokens_total, those found in the prefix cache instead "
            "of computed (the hit rate is the ratio of the two)", registry=r)
        self._prompt_seen = (0, 0)
        self.slow_steps = Counter(
            "npuserve_worker_slow_steps",
            "Engine steps that ran past --step-warn-s", registry=r)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP on a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", addr, port)

    def observe_step(self, seconds: float, tokens: int) -> None:
        self.step_seconds.observe(seconds)
        self.generated_tokens.inc(tokens)

    def count_prompt_tokens(self, stats: PrefixCacheStats) -> None:
        """Bring the prompt-token counters up to the engine's totals."""
        total, cached = self._prompt_seen
        self.prompt_tokens.inc(max(0, stats.prompt_tokens - total))
        self.prompt_tokens_cached.inc(max(0, stats.cached_tokens - cached))
        self._prompt_seen = (stats.prompt_tokens, stats.cached_tokens)

    def set_load(self, running: int, waiting: int, blocks_used: int, blocks_total: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_blocks_used.set(blocks_used)
        self.kv_blocks_total.set(blocks_total)

    def set_device(self, device: str, stats: DeviceStats) -> None:
        self.device_memory_total.labels(device).set(stats.memory_total_bytes)
        self.device_memory_used.labels(device).set(stats.memory_used_bytes)
        self.device_utilization.labels(device).set(stats.utilization)

    def set_memory(self, weight_bytes: int, weight_memory_bytes: int,
                   kv_cache_bytes: int) -> None:
        self.weight_bytes.set(weight_bytes)
        self.weight_memory_bytes.set(weight_memory_bytes)
        self.kv_cache_bytes.set(kv_cache_bytes)
        self.rss_bytes.set(rss_bytes())
