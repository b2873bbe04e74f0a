"""Prometheus metrics of one worker, on a registry of its own (so tests can make several).

    metrics = WorkerMetrics(model="qwen3-8b", backend="torch", device="npu:0")
    metrics.serve(9400, probes={"/livez": ...})   # /metrics on 127.0.0.1:9400
    metrics.observe_step(StepStats(...), seconds=0.012)

Every series carries `model`, `backend` and `device`, so a fleet's workers aggregate by
model and split by card. Names follow Prometheus' conventions (`promtool check metrics`):
counters end in `_total`, units are base units (`_seconds`, `_bytes`, `_ratio`).
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.metrics_http import Probe, process_metrics, serve_http
from worker.backends.base import DeviceStats

if TYPE_CHECKING:
    from worker.engine.scheduler import PrefixCacheStats, StepStats

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
                0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Decode steps are milliseconds; a step carrying a long prefill chunk can take seconds."""
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
LABELS = ("model", "backend", "device")


def rss_bytes() -> int:
    """Resident memory of this process now (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class WorkerMetrics:
    """Load, throughput, latency, memory and device readings of one worker."""

    def __init__(self, registry: CollectorRegistry | None = None, *, model: str = "",
                 backend: str = "", device: str = "") -> None:
        self.registry = r = registry or CollectorRegistry()
        const = (model, backend, device)

        def metric(cls: type, name: str, doc: str, extra: tuple[str, ...] = (), *,
                   lazy: bool = False, **kw: Any) -> Any:
            """The metric bound to this worker's labels; with extra labels or `lazy`
            (no series until the first reading), call `.labels(*extra)` on it."""
            m = cls(name, doc, [*LABELS, *extra], registry=r, **kw)
            return m.labels(*const) if not extra and not lazy else _Bound(m, const)

        self.running = metric(Gauge, "npuserve_worker_running_requests",
                              "Requests this worker holds and generates")
        self.waiting = metric(Gauge, "npuserve_worker_waiting_requests",
                              "Claimed requests waiting in the engine for KV blocks or a slot")
        self.generated_tokens = metric(Counter, "npuserve_worker_generated_tokens",
                                       "Tokens generated and published")
        self.step_seconds = metric(
            Histogram, "npuserve_worker_step_seconds", "Duration of one engine step, by "
            "phase: prefill (only prompt chunks), decode (only next tokens) or mixed",
            ("phase",), buckets=STEP_BUCKETS)
        self.batch_size = metric(Histogram, "npuserve_worker_batch_size",
                                 "Sequences in one engine step", buckets=BATCH_BUCKETS)
        self.step_tokens = metric(Counter, "npuserve_worker_step_tokens",
                                  "Tokens fed to the model, by phase: prompt (prefill "
                                  "chunks) or decode", ("phase",))
        self.preemptions = metric(Counter, "npuserve_worker_preemptions",
                                  "Requests whose KV blocks were taken back (the cache was "
                                  "full); each is recomputed when it runs again")
        self.finished = metric(Counter, "npuserve_worker_requests_finished",
                               "Requests ended by this worker, by finish reason", ("reason",))
        self.device_failures = metric(
            Counter, "npuserve_worker_device_failures",
            "Requests whose device call failed: retried (handed back) or failed", ("outcome",))
        self.weight_bytes = metric(Gauge, "npuserve_worker_weight_bytes",
                                   "Bytes of model weights read per decode step")
        self.weight_memory_bytes = metric(
            Gauge, "npuserve_worker_weight_memory_bytes",
            "Bytes the model weights hold in memory (packed copies included)")
        self.kv_cache_bytes = metric(Gauge, "npuserve_worker_kv_cache_bytes",
                                     "Bytes held by the KV cache")
        self.kv_blocks_used = metric(Gauge, "npuserve_worker_kv_blocks_used",
                                     "KV cache blocks held by requests")
        self.kv_blocks_capacity = metric(Gauge, "npuserve_worker_kv_blocks_capacity",
                                         "KV cache blocks in all")
        self.kv_usage = metric(Gauge, "npuserve_worker_kv_cache_usage_ratio",
                               "Share of the KV cache's blocks held by requests, 0..1")
        self.prefill_cap = metric(
            Gauge, "npuserve_worker_prefill_cap_tokens",
            "Most prompt tokens a step may carry while requests decode, learned from step "
            "times (--max-prefill-stall; no series when off; 0: not measured yet, one KV "
            "block a step; else 1 or more)", lazy=True)
        self.device_memory_total = metric(
            Gauge, "npuserve_worker_device_memory_total_bytes",
            "Accelerator memory in all, as its driver reports it", lazy=True)
        self.device_memory_used = metric(
            Gauge, "npuserve_worker_device_memory_used_bytes",
            "Accelerator memory in use (all processes), as its driver reports it", lazy=True)
        self.device_utilization = metric(
            Gauge, "npuserve_worker_device_utilization_ratio",
            "Busy fraction of the accelerator's compute units, 0..1", lazy=True)
        self.device_temperature = metric(
            Gauge, "npuserve_worker_device_temperature_celsius",
            "The accelerator's temperature, where its driver reports one", lazy=True)
        self.step_in_progress = metric(
            Gauge, "npuserve_worker_step_in_progress_seconds",
            "How long the engine step now running has run (0 between steps)")
        self.prompt_tokens = metric(
            Counter, "npuserve_worker_prompt_tokens",
            "Tokens admitted requests needed in the KV cache: prompts, and the tokens already "
            "generated of preempted or resumed requests (counted at each admission)")
        self.prompt_tokens_cached = metric(
            Counter, "npuserve_worker_prompt_tokens_cached",
            "Of npuserve_worker_prompt_tokens_total, those found in the prefix cache instead "
            "of computed (the hit rate is the ratio of the two)")
        self._prompt_seen = (0, 0)
        self.slow_steps = metric(Counter, "npuserve_worker_slow_steps",
                                 "Engine steps that ran past --step-warn-s")
        self.draining = metric(Gauge, "npuserve_worker_draining",
                               "1 while the worker drains (claims nothing new), else 0")
        self.engine_loop_age = metric(
            Gauge, "npuserve_worker_engine_loop_age_seconds",
            "Seconds since the engine loop last went round (a step of any length counts "
            "from its start: see npuserve_worker_step_in_progress_seconds)")
        self.heartbeat_age = metric(
            Gauge, "npuserve_worker_heartbeat_age_seconds",
            "Seconds since the worker last renewed its registration and leases in Redis")
        process_metrics("worker", r)

    def serve(self, port: int, addr: str = "127.0.0.1",
              probes: dict[str, Probe] | None = None) -> WSGIServer:
        """Expose /metrics (and `probes`) over HTTP on a daemon thread."""
        return serve_http(addr, port, self.registry, probes)

    def track_ages(self, engine_loop: Callable[[], float], heartbeat: Callable[[], float]) -> None:
        """Read the two ages at each scrape."""
        self.engine_loop_age.set_function(engine_loop)
        self.heartbeat_age.set_function(heartbeat)

    def observe_step(self, stats: StepStats, seconds: float, tokens: int) -> None:
        """One engine step that ran `stats`, took `seconds` and published `tokens`."""
        if stats.num_seqs:
            self.step_seconds.labels(stats.phase).observe(seconds)
            self.batch_size.observe(stats.num_seqs)
        if stats.prompt_tokens:
            self.step_tokens.labels("prompt").inc(stats.prompt_tokens)
        if stats.decode_seqs:
            self.step_tokens.labels("decode").inc(stats.decode_seqs)
        if stats.preempted:
            self.preemptions.inc(stats.preempted)
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
        self.kv_blocks_capacity.set(blocks_total)
        self.kv_usage.set(blocks_used / blocks_total if blocks_total else 0.0)

    def set_prefill_cap(self, tokens: int | None) -> None:
        """The engine's current prefill cap (PrefillBudget.tokens); None: no cap."""
        if tokens is not None:
            self.prefill_cap.labels().set(tokens)

    def set_device(self, stats: DeviceStats) -> None:
        self.device_memory_total.labels().set(stats.memory_total_bytes)
        self.device_memory_used.labels().set(stats.memory_used_bytes)
        self.device_utilization.labels().set(stats.utilization)
        if stats.temperature_c is not None:
            self.device_temperature.labels().set(stats.temperature_c)

    def set_memory(self, weight_bytes: int, weight_memory_bytes: int,
                   kv_cache_bytes: int) -> None:
        self.weight_bytes.set(weight_bytes)
        self.weight_memory_bytes.set(weight_memory_bytes)
        self.kv_cache_bytes.set(kv_cache_bytes)


class _Bound:
    """A labelled metric with the worker's own labels filled in: `.labels(*extra)`."""

    def __init__(self, metric: Any, const: tuple[str, ...]) -> None:
        self._metric = metric
        self._const = const

    def labels(self, *extra: str) -> Any:
        return self._metric.labels(*self._const, *extra)
