"""The mixed-load benchmark on the tiny random Qwen3: both runs count every stream's gaps and
every arrival, the percentiles are ordered, and the table prints (times are never compared)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.backends.torch_settings import TorchSettings
from worker.bench.mixed_bench import MixedLoadConfig, arrival_offsets, format_table, run
from worker.bench.mixed_plot import plot


def test_a_small_run_measures_both_runs_over_the_same_load(tiny_qwen3: Path,
                                                          tmp_path: Path) -> None:
    config = MixedLoadConfig(str(tiny_qwen3), streams=2, stream_prompt_tokens=8,
                             stream_output_tokens=12, arrivals=2, arrival_prompt_tokens=48,
                             arrival_output_tokens=3, arrival_interval_s=0.0,
                             max_batched_tokens=32, backend=TorchSettings(kv_cache_gb=0.05))
    r = run(config)
    for suffix in ("_no_cap", "_cap"):
        # at least their 12 tokens, more while an arrival waits for its first
        assert r["itl_count" + suffix] >= 2 * (12 - 1)
        assert r["output_tokens" + suffix] == r["itl_count" + suffix] + 2 + 2 * 3
        assert 0 < r["itl_p50_ms" + suffix] <= r["itl_p90_ms" + suffix] \
            <= r["itl_p99_ms" + suffix] <= r["itl_max_ms" + suffix]
        assert r["itl_p99_over_p50" + suffix] >= 1.0
        # both prompts arrive with the streams' first tokens: prefilled beside their decodes
        assert 1 <= r["mixed_steps" + suffix] <= r["steps" + suffix]
        assert r["decode_step_ms_mean" + suffix] > 0 and r["mixed_step_ms_mean" + suffix] > 0
        assert r["max_mixed_prefill_tokens" + suffix] <= 32 - 2
        series = r["series" + suffix]  # the plot's: every gap, each arrival's span
        assert len(series["itl_ms"]) == len(series["itl_at_s"]) == r["itl_count" + suffix]
        assert max(series["itl_ms"]) == pytest.approx(r["itl_max_ms" + suffix], abs=0.01)
        assert len(series["arrivals_s"]) == 2
        assert all(0 <= came <= answered <= r["wall_s" + suffix]
                   for came, answered in series["arrivals_s"])
    table = format_table(r)
    assert "p99 / p50" in table and "cap (stall 0.5)" in table
    plot(r, tmp_path / "mixed.png")
    assert (tmp_path / "mixed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_streams_decode_on_until_the_last_arrival_has_its_first_token(tiny_qwen3: Path) -> None:
    config = MixedLoadConfig(str(tiny_qwen3), streams=2, stream_prompt_tokens=8,
                             stream_output_tokens=2, arrivals=1, arrival_prompt_tokens=16,
                             arrival_output_tokens=2, arrival_interval_s=0.4,
                             backend=TorchSettings(kv_cache_gb=0.05))
    r = run(config)
    for suffix in ("_no_cap", "_cap"):
        assert r["wall_s" + suffix] >= 0.2  # the arrival came 0.2-0.6 s after the streams began
        assert r["itl_count" + suffix] > 2 * (2 - 1)  # so the streams outlived their 2 tokens
        assert r["arrival_ttft_mean_ms" + suffix] > 0
        assert r["mixed_steps" + suffix] >= 1  # and the arrival was prefilled beside them


def test_arrivals_are_seeded_and_spread_around_the_interval() -> None:
    config = MixedLoadConfig("unused", arrivals=50, arrival_interval_s=2.0, seed=3)
    offsets = arrival_offsets(config)
    assert offsets == arrival_offsets(config)
    gaps = [b - a for a, b in zip([0.0, *offsets], offsets, strict=False)]
    assert all(1.0 <= g <= 3.0 for g in gaps) and len(set(gaps)) == 50
    assert offsets != arrival_offsets(MixedLoadConfig("unused", arrivals=50, seed=4))


def test_a_capped_run_needs_a_stall_above_zero() -> None:
    with pytest.raises(ValueError, match="max_prefill_stall"):
        MixedLoadConfig("unused", max_prefill_stall=0.0)
