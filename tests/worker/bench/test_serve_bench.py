"""`npuserve bench serve`: its statistics, workload and arrivals, and short real runs
against a stack of its own with the synthetic backend."""

from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from worker.bench import serve_bench
from worker.bench.serve_stats import (
    LevelRun,
    RequestRecord,
    compare,
    distribution_ms,
    percentile,
    summarize,
)
from worker.bench.serve_workload import (
    Workload,
    WorkloadSpec,
    calibrate,
    draw_length,
    poisson_arrivals,
)

REPO = Path(__file__).resolve().parents[3]
SYNTHETIC = ["--backend", "synthetic", "--synthetic-step-ms", "5"]


def test_percentiles_interpolate_linearly_as_numpy_does() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    assert distribution_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert distribution_ms([0.001, 0.003]) == {"mean": 2.0, "p50": 2.0, "p90": 2.8,
                                               "p99": 2.98}


def _record(index: int, sent: float, times: list[float], **kw: object) -> RequestRecord:
    record = RequestRecord(index, sent, **kw)  # type: ignore[arg-type]
    for t in times:
        record.message(t, 1)
    return record


def test_a_level_counts_finished_requests_and_their_latencies_and_errors_by_status() -> None:
    records = [
        _record(0, 0.0, [0.1, 0.15, 0.2], prompt_tokens=10),
        _record(1, 0.5, [0.7, 0.8], prompt_tokens=20),
        _record(2, 0.6, [0.9], error="RESOURCE_EXHAUSTED"),
        _record(3, 0.6, [], error="RESOURCE_EXHAUSTED"),
        _record(4, 0.6, [], error="UNAVAILABLE"),
        _record(5, 0.9, [1.0], unfinished=True),
    ]
    level = summarize(LevelRun("concurrency", 4, records, wall_s=2.0))
    assert level["concurrency"] == 4
    assert (level["requests"], level["completed"], level["unfinished"]) == (6, 2, 1)
    assert level["errors"] == {"RESOURCE_EXHAUSTED": 2, "UNAVAILABLE": 1}
    assert level["error_count"] == 3
    assert (level["output_tokens"], level["output_tokens_per_s"]) == (5, 2.5)
    assert level["requests_per_s"] == 1.0
    assert level["ttft_ms"]["p50"] == pytest.approx(150.0)
    assert level["e2e_ms"]["p50"] == pytest.approx(250.0)
    assert level["itl_ms"]["mean"] == pytest.approx(200 / 3, abs=1e-3)  # 50, 50, 100 ms
    assert level["tpot_ms"]["p50"] == pytest.approx(75.0)  # 50 and 100 ms per token
    assert level["mean_prompt_tokens"] == 15.0


def test_the_steady_throughput_counts_tokens_between_the_first_finish_and_the_last_send(
) -> None:
    records = [_record(0, 0.0, [0.5, 1.0]),  # finishes first, at 1.0
               _record(1, 0.0, [1.5, 2.0, 2.5, 3.5]),
               _record(2, 2.0, [2.2, 2.9], unfinished=True),  # cut, its tokens still came
               _record(3, 3.0, [])]  # the last one sent, at 3.0
    run = LevelRun("concurrency", 2, records, wall_s=4.0, sent_until=3.0)
    # from 1.0 to 3.0: 1.0, 1.5, 2.0, 2.5 and 2.2, 2.9
    assert summarize(run)["steady_output_tokens_per_s"] == 3.0
    run.sent_until = 1.5
    assert summarize(run)["steady_output_tokens_per_s"] is None  # under a second


def test_the_comparison_is_the_throughput_ratio_and_the_latency_added() -> None:
    def level(tok_s: float, itl: float) -> dict[str, object]:
        return {"output_tokens_per_s": tok_s,
                "itl_ms": {"p50": itl, "p90": itl + 1, "p99": itl + 5},
                "ttft_ms": {"p50": 2 * itl}}

    c = compare(level(90.0, 21.0), level(100.0, 20.0))
    assert c["stack_over_engine_throughput"] == 0.9
    assert (c["added_itl_p50_ms"], c["added_itl_p99_ms"], c["added_ttft_p50_ms"]) == (
        1.0, 1.0, 2.0)


def test_poisson_arrivals_are_seeded_and_come_at_the_rate_with_exponential_gaps() -> None:
    times = poisson_arrivals(50.0, 200.0, seed=3)
    assert times == poisson_arrivals(50.0, 200.0, seed=3)
    assert times != poisson_arrivals(50.0, 200.0, seed=4)
    assert times == sorted(times) and 0 < times[0] and times[-1] < 200.0
    assert abs(len(times) - 10_000) < 4 * math.sqrt(10_000)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.05)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError):
        poisson_arrivals(0.0, 10.0, seed=0)


def test_lengths_follow_their_distribution_around_the_mean() -> None:
    rng = random.Random(0)
    assert {draw_length(rng, 64, "fixed", 0.5) for _ in range(10)} == {64}
    uniform = [draw_length(rng, 100, "uniform", 0.5) for _ in range(2000)]
    assert min(uniform) >= 50 and max(uniform) <= 150
    assert statistics.mean(uniform) == pytest.approx(100, rel=0.05)
    lognormal = [draw_length(rng, 100, "lognormal", 0.5) for _ in range(2000)]
    assert min(lognormal) >= 1 and max(lognormal) <= 400
    assert statistics.median(lognormal) == pytest.approx(100, rel=0.1)


def test_a_levels_requests_are_seeded_apart_and_mix_chinese_prompts() -> None:
    workload = Workload(WorkloadSpec(input_len=40, output_len=32, zh_fraction=0.3, seed=1))
    again = Workload(WorkloadSpec(input_len=40, output_len=32, zh_fraction=0.3, seed=1))
    first = [workload.request(0, i) for i in range(300)]
    assert first == [again.request(0, i) for i in range(300)]
    assert {r.prompt for r in first}.isdisjoint(workload.request(1, i).prompt
                                                for i in range(300))
    chinese = [r for r in first if r.language == "zh"]
    assert 0.2 < len(chinese) / len(first) < 0.4
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in r.prompt) for r in chinese)
    assert all(16 <= r.output_len <= 48 for r in first)


def test_calibration_gives_each_languages_tokens_per_word() -> None:
    def count(text: str) -> int:  # a Chinese character is a token, an English word two
        return len(text) if " " not in text else 2 * len(text.split())

    per_word = calibrate(count)
    assert per_word["en"] == 2.0
    assert 1.0 < per_word["zh"] < 3.0
    workload = Workload(WorkloadSpec(input_len=100, distribution="fixed"), per_word)
    english = next(r for i in range(50) if (r := workload.request(0, i)).language == "en")
    assert count(english.prompt) == 100


def test_a_closed_loop_run_on_its_own_synthetic_stack_loads_no_torch(
        tiny_qwen3: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    argv = ["--model", str(tiny_qwen3), *SYNTHETIC, "--concurrency", "1,4", "--duration", "2",
            "--input-len", "24", "--output-len", "16", "--json", str(out), "--plot", str(png)]
    script = ("import json, sys\nfrom worker.bench import serve_bench\n"
              f"code = serve_bench.main({argv!r})\n"
              "heavy = [m for m in ('torch', 'worker.engine', 'transformers', 'gateway')\n"
              "         if any(n == m or n.startswith(m + '.') for n in sys.modules)]\n"
              "print(json.dumps({'code': code, 'heavy': heavy}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"code": 0, "heavy": []}
    results = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in results["levels"]] == [1, 4]
    assert results["served"][0]["workers"][0]["backend"] == "synthetic"
    for level in results["levels"]:
        assert level["error_count"] == 0 and level["unfinished"] == 0
        assert level["completed"] >= 2
        assert level["output_tokens"] == pytest.approx(
            level["completed"] * level["mean_output_tokens"], abs=0.1 * level["completed"])
        assert 8 <= level["mean_output_tokens"] <= 24
        assert 10 <= level["mean_prompt_tokens"] <= 40
        assert level["output_tokens_per_s"] > 0
        for metric in ("ttft_ms", "itl_ms", "e2e_ms"):
            d = level[metric]
            assert 0 < d["p50"] <= d["p90"] <= d["p99"]
        assert level["itl_ms"]["p50"] >= 5.0  # the synthetic step
    assert png.stat().st_size > 10_000


def test_an_open_loop_run_compared_with_the_engine(tiny_qwen3: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    code = serve_bench.main(["--model", str(tiny_qwen3), *SYNTHETIC, "--rate", "20",
                             "--duration", "2", "--input-len", "16", "--output-len", "12",
                             "--compare-engine", "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    stack, engine = results["levels"][0], results["engine_levels"][0]
    assert stack["rate"] == engine["rate"] == 20
    assert stack["error_count"] == engine["error_count"] == 0
    assert engine["completed"] == stack["completed"] >= 10
    assert engine["output_tokens"] == stack["output_tokens"]
    assert engine["itl_ms"]["p50"] >= 5.0
    ratio = results["stack_over_engine_throughput"]
    assert ratio == results["comparison"][0]["stack_over_engine_throughput"]
    assert 0.3 < ratio < 1.5
    assert results["added_itl_p50_ms"] is not None
