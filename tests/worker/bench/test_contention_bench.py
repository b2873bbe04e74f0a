"""The contention benchmark and the decode-by-batch phase on the tiny random Qwen3: every
phase runs and reports (times are never asserted, only that they were measured)."""

from __future__ import annotations

from pathlib import Path

from worker.backends.torch_settings import TorchSettings
from worker.bench import npuserve_phase
from worker.bench.contention_bench import ContentionConfig, format_table, run
from worker.bench.workload import workload_for_model


def test_a_small_run_measures_idle_contended_side_by_side_and_transformers(
        tiny_qwen3: Path) -> None:
    lines: list[str] = []
    r = run(ContentionConfig(str(tiny_qwen3), requests=2, max_batch=2,
                             backend=TorchSettings(kv_cache_gb=0.05)), progress=lines.append)
    for key in ("npuserve_idle_tokens_per_s", "npuserve_contended_tokens_per_s",
                "npuserve_pair_tokens_per_s", "hf_batched_contended_tokens_per_s",
                "hf_sequential_contended_tokens_per_s"):
        assert r[key] > 0, key
    assert r["contended_over_idle"] == (r["npuserve_contended_tokens_per_s"]
                                        / r["npuserve_idle_tokens_per_s"])
    assert r["hf_sequential_requests"] == 2  # fewer requests than sampled: all of them
    assert len(lines) == 6 and "one at a time beside it" in format_table(r)


def test_decode_throughput_is_measured_per_batch_size(tiny_qwen3: Path) -> None:
    engine = npuserve_phase.load_engine(str(tiny_qwen3), TorchSettings(kv_cache_gb=0.05),
                                        max_batch=4)
    prompts = [r.prompt_ids[:8] for r in workload_for_model(str(tiny_qwen3), 6).requests]
    got = npuserve_phase.decode_tokens_per_s_by_batch(engine, prompts, warmup_steps=2,
                                                      measured_steps=3)
    assert list(got) == [1, 2, 4] and all(v > 0 for v in got.values())  # the engine's batch
