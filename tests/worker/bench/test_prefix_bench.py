"""The shared-prefix benchmark on the tiny random Qwen3: both engines give the same outputs,
the hits are counted, and the table prints (times are never asserted)."""

from __future__ import annotations

from pathlib import Path

from worker.backends.torch_settings import TorchSettings
from worker.bench.prefix_bench import PrefixBenchConfig, format_table, run


def test_a_small_run_compares_caching_on_and_off_with_equal_outputs(tiny_qwen3: Path) -> None:
    r = run(PrefixBenchConfig(str(tiny_qwen3), requests=3, prefix_tokens=64, own_tokens=8,
                              output_tokens=4, backend=TorchSettings(kv_cache_gb=0.05)))
    assert r["outputs_identical"] == r["outputs_compared"] == 3 + 2 * 3
    assert len(r["ttft_miss_ms_each"]) == 3 and len(r["ttft_hit_ms_each"]) == 2
    # one at a time: the 2nd and 3rd hit the 64 shared tokens; batched: the 2nd and 3rd
    # arrive with the first and are admitted in its step, before anything is cached
    assert r["prompt_tokens_cached"] >= 2 * 64
    assert "greedy outputs identical with and without caching: 9/9" in format_table(r)
