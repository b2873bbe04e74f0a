"""Worker metrics: names, values, and one registry per instance."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client import generate_latest

from worker.engine.scheduler import PrefixCacheStats
from worker.metrics import WorkerMetrics, rss_bytes


def _sample(metrics: WorkerMetrics, name: str, labels: dict[str, str] | None = None
            ) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


def test_observations_show_up_under_their_names() -> None:
    m = WorkerMetrics()
    m.observe_step(0.004, tokens=3)
    m.observe_step(0.2, tokens=2)
    m.finished.labels("stop").inc()
    m.set_load(running=2, waiting=1, blocks_used=5, blocks_total=64)
    m.set_memory(weight_bytes=1000, weight_memory_bytes=1500, kv_cache_bytes=2000)
    assert _sample(m, "npuserve_worker_generated_tokens_total") == 5
    assert _sample(m, "npuserve_worker_step_seconds_count") == 2
    assert _sample(m, "npuserve_worker_step_seconds_bucket", {"le": "0.005"}) == 1
    assert _sample(m, "npuserve_worker_requests_finished_total", {"reason": "stop"}) == 1
    assert _sample(m, "npuserve_worker_running_requests") == 2
    assert _sample(m, "npuserve_worker_waiting_requests") == 1
    assert _sample(m, "npuserve_worker_kv_blocks_used") == 5
    assert _sample(m, "npuserve_worker_weight_bytes") == 1000
    assert _sample(m, "npuserve_worker_weight_memory_bytes") == 1500
    assert _sample(m, "npuserve_worker_kv_cache_bytes") == 2000
    assert (_sample(m, "npuserve_worker_rss_bytes") or 0) > 10 << 20


def test_prompt_token_counters_follow_the_engines_totals() -> None:
    m = WorkerMetrics()
    m.count_prompt_tokens(PrefixCacheStats(prompt_tokens=600, cached_tokens=0))
    m.count_prompt_tokens(PrefixCacheStats(prompt_tokens=1200, cached_tokens=512))
    m.count_prompt_tokens(PrefixCacheStats(prompt_tokens=1200, cached_tokens=512))
    assert _sample(m, "npuserve_worker_prompt_tokens_total") == 1200
    assert _sample(m, "npuserve_worker_prompt_tokens_cached_total") == 512


def test_each_instance_has_its_own_registry() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()
    a.generated_tokens.inc(4)
    assert _sample(b, "npuserve_worker_generated_tokens_total") == 0
    assert b"npuserve_worker_generated_tokens_total 4.0" in generate_latest(a.registry)


def test_serve_exposes_metrics_over_http() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = WorkerMetrics()
    m.set_load(running=3, waiting=0, blocks_used=0, blocks_total=1)
    m.serve(port, addr="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert b"npuserve_worker_running_requests 3.0" in resp.read()


def test_rss_is_this_process_resident_memory() -> None:
    assert 10 << 20 < rss_bytes() < 1 << 40
