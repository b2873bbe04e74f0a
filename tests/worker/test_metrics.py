"""Worker metrics: names, labels, values, probes, and one registry per instance."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client import generate_latest

from tests.promtool import check_metrics
from worker.backends.base import DeviceStats
from worker.engine.scheduler import PrefixCacheStats, StepStats
from worker.metrics import WorkerMetrics, rss_bytes

LABELS = {"model": "m", "backend": "torch", "device": "cpu"}


def _metrics() -> WorkerMetrics:
    return WorkerMetrics(**LABELS)


def _sample(metrics: WorkerMetrics, name: str, labels: dict[str, str] | None = None
            ) -> float | None:
    return metrics.registry.get_sample_value(name, {**LABELS, **(labels or {})})


def test_observations_show_up_under_their_names_with_the_workers_labels() -> None:
    m = _metrics()
    m.observe_step(StepStats(num_seqs=1, prompt_tokens=40), 0.004, tokens=1)
    m.observe_step(StepStats(num_seqs=3, decode_seqs=3), 0.2, tokens=3)
    m.observe_step(StepStats(num_seqs=4, prompt_tokens=16, decode_seqs=3, preempted=2), 0.05,
                   tokens=4)
    m.finished.labels("stop").inc()
    m.set_load(running=2, waiting=1, blocks_used=16, blocks_total=64)
    m.set_memory(weight_bytes=1000, weight_memory_bytes=1500, kv_cache_bytes=2000)
    assert _sample(m, "npuserve_worker_generated_tokens_total") == 8
    for phase in ("prefill", "decode", "mixed"):
        assert _sample(m, "npuserve_worker_step_seconds_count", {"phase": phase}) == 1
    assert _sample(m, "npuserve_worker_step_seconds_bucket", {"phase": "prefill",
                                                              "le": "0.005"}) == 1
    assert _sample(m, "npuserve_worker_batch_size_sum") == 8
    assert _sample(m, "npuserve_worker_step_tokens_total", {"phase": "prompt"}) == 56
    assert _sample(m, "npuserve_worker_step_tokens_total", {"phase": "decode"}) == 6
    assert _sample(m, "npuserve_worker_preemptions_total") == 2
    assert _sample(m, "npuserve_worker_requests_finished_total", {"reason": "stop"}) == 1
    assert _sample(m, "npuserve_worker_running_requests") == 2
    assert _sample(m, "npuserve_worker_waiting_requests") == 1
    assert _sample(m, "npuserve_worker_kv_blocks_used") == 16
    assert _sample(m, "npuserve_worker_kv_blocks_capacity") == 64
    assert _sample(m, "npuserve_worker_kv_cache_usage_ratio") == 0.25
    m.set_prefill_cap(None)  # no cap: no series
    assert _sample(m, "npuserve_worker_prefill_cap_tokens") is None
    m.set_prefill_cap(96)
    assert _sample(m, "npuserve_worker_prefill_cap_tokens") == 96
    assert _sample(m, "npuserve_worker_weight_bytes") == 1000
    assert _sample(m, "npuserve_worker_weight_memory_bytes") == 1500
    assert _sample(m, "npuserve_worker_kv_cache_bytes") == 2000
    assert (m.registry.get_sample_value("process_resident_memory_bytes") or 0) > 10 << 20
    assert (m.registry.get_sample_value("npuserve_memory_limit_bytes") or 0) > 1 << 28
    assert _label(m, "npuserve_build_info", "component") == "worker"


def _label(m: WorkerMetrics, metric: str, label: str) -> str:
    for family in m.registry.collect():
        for sample in family.samples:
            if sample.name == metric:
                return sample.labels[label]
    raise AssertionError(f"{metric} not exported")


def test_device_readings_include_the_temperature_when_the_driver_gives_one() -> None:
    m = _metrics()
    m.set_device(DeviceStats(64 << 30, 16 << 30, 0.5))
    assert _sample(m, "npuserve_worker_device_memory_used_bytes") == 16 << 30
    assert _sample(m, "npuserve_worker_device_utilization_ratio") == 0.5
    assert _sample(m, "npuserve_worker_device_temperature_celsius") is None
    m.set_device(DeviceStats(64 << 30, 16 << 30, 0.5, temperature_c=71.0))
    assert _sample(m, "npuserve_worker_device_temperature_celsius") == 71.0


def test_the_exposition_passes_promtool_and_has_no_created_series() -> None:
    m = _metrics()
    m.observe_step(StepStats(num_seqs=1, prompt_tokens=4), 0.01, tokens=1)
    m.finished.labels("stop").inc()
    m.track_ages(lambda: 0.5, lambda: 1.5)
    text = generate_latest(m.registry).decode()
    assert "_created" not in text
    assert 'npuserve_worker_engine_loop_age_seconds{backend="torch",device="cpu",model="m"} 0.5' \
        in text
    check_metrics(text)


def test_prompt_token_counters_follow_the_engines_totals() -> None:
    m = _metrics()
    m.count_prompt_tokens(PrefixCacheStats(prompt_tokens=600, cached_tokens=0))
    m.count_prompt_tokens(PrefixCacheStats(prompt_tokens=1200, cached_tokens=512))
    m.count_prompt_tokens(PrefixCacheStats(prompt_tokens=1200, cached_tokens=512))
    assert _sample(m, "npuserve_worker_prompt_tokens_total") == 1200
    assert _sample(m, "npuserve_worker_prompt_tokens_cached_total") == 512


def test_each_instance_has_its_own_registry() -> None:
    a, b = _metrics(), _metrics()
    a.generated_tokens.inc(4)
    assert _sample(b, "npuserve_worker_generated_tokens_total") == 0
    assert (b'npuserve_worker_generated_tokens_total{backend="torch",device="cpu",model="m"} 4.0'
            in generate_latest(a.registry))


def test_serve_exposes_metrics_and_probes_over_http() -> None:
    m = _metrics()
    m.set_load(running=3, waiting=0, blocks_used=0, blocks_total=1)
    healthy = [True]
    server = m.serve(0, addr="127.0.0.1", probes={
        "/livez": lambda: (healthy[0], "engine loop went round 0.1s ago")})
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
            assert b'npuserve_worker_running_requests{backend="torch",device="cpu",model="m"} 3.0' \
                in resp.read()
        with urllib.request.urlopen(f"{base}/livez", timeout=5) as resp:
            assert resp.status == 200 and b"went round" in resp.read()
        healthy[0] = False
        try:
            urllib.request.urlopen(f"{base}/livez", timeout=5)
            raise AssertionError("an unhealthy probe answered 200")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and b"went round" in exc.read()
        try:
            urllib.request.urlopen(f"{base}/nothing", timeout=5)
            raise AssertionError("an unknown path answered 200")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404 and b"/livez" in exc.read()
    finally:
        server.shutdown()


def test_rss_is_this_process_resident_memory() -> None:
    assert 10 << 20 < rss_bytes() < 1 << 40
