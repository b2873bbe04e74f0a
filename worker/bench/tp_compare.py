"""Tensor parallelism against one rank on the same machine: `python -m worker.bench.tp_compare
--model DIR --ranks 2 --out DIR`.

Each configuration gets the same cores in all (`--threads` split evenly over its ranks) and
runs the same three measurements through the engine: a 256-token prefill, batch-1 decode
(ms per token after a warm-up) and decode of 8 sequences at once (tokens/s). Greedy tokens are
compared between the configurations as a check. Results: a table, JSON and a bar chart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from common.config import EngineConfig
from common.sampling_params import SamplingParams
from worker.backends.torch_backend import TorchBackend
from worker.backends.torch_settings import TorchSettings
from worker.engine.engine import Engine

PREFILL, DECODE, BATCH = 256, 48, 8


def measure(model: Path, ranks: int, threads: int) -> dict[str, Any]:
    settings = TorchSettings(kv_cache_gb=1.0, threads=max(1, threads // ranks),
                             tensor_parallel=ranks)
    engine = Engine(TorchBackend(model, EngineConfig(max_num_seqs=BATCH), settings))
    vocab = engine.model_config.vocab_size
    try:
        prompt = [(i * 7919) % (vocab - 10) + 5 for i in range(PREFILL)]
        engine.generate([prompt[:32]], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
        start = time.perf_counter()
        engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
        prefill_s = time.perf_counter() - start
        greedy = SamplingParams(max_tokens=DECODE + 8, temperature=0.0, ignore_eos=True)
        engine.add_request(prompt[:16], greedy, "alone")
        tokens, times = [], []
        while engine.has_unfinished():
            start = time.perf_counter()
            events = engine.step()
            times.append(time.perf_counter() - start)
            tokens += [e.token_id for e in events]
        decode_ms = 1000 * sum(times[8:]) / len(times[8:])
        batch = [prompt[i * 8:i * 8 + 16] for i in range(BATCH)]
        start = time.perf_counter()
        done = engine.generate(batch, SamplingParams(max_tokens=DECODE, temperature=0.0,
                                                     ignore_eos=True))
        batch_tps = sum(len(c.token_ids) for c in done) / (time.perf_counter() - start)
    finally:
        engine.backend.close()
    return {"ranks": ranks, "threads_per_rank": settings.threads, "prefill_s": prefill_s,
            "decode_ms_per_token": decode_ms, "batch8_tokens_per_s": batch_tps,
            "greedy_tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="cores for each configuration in all (default: all)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [measure(args.model, r, args.threads) for r in (1, args.ranks)]
    same = results[0]["greedy_tokens"] == results[1]["greedy_tokens"]
    print(f"{'ranks':>5} {'threads/rank':>12} {'prefill 256':>12} {'decode b1':>12} "
          f"{'decode b8':>12}")
    for r in results:
        print(f"{r['ranks']:>5} {r['threads_per_rank']:>12} {r['prefill_s']:>10.2f} s "
              f"{r['decode_ms_per_token']:>9.1f} ms {r['batch8_tokens_per_s']:>8.1f} t/s")
    print(f"greedy tokens identical: {same}")
    report = {"model": str(args.model), "threads": args.threads, "results": results,
              "greedy_identical": same}
    (args.out / "tp_compare.json").write_text(json.dumps(report, indent=1))
    _plot(results, args.out / "tp_compare.png", args.model.name, args.threads)
    return 0 if same else 1


def _plot(results: list[dict[str, Any]], path: Path, model: str, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['ranks']} rank{'s' if r['ranks'] > 1 else ''}" for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    for ax, key, title in zip(axes, ("prefill_s", "decode_ms_per_token", "batch8_tokens_per_s"),
                              ("prefill of 256 tokens (s)", "batch-1 decode (ms/token)",
                               "decode of 8 sequences (tokens/s)"), strict=True):
        values = [r[key] for r in results]
        bars = ax.bar(labels, values, color=["tab:blue", "tab:orange"])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_title(title)
    fig.suptitle(f"{model}: tensor parallelism on {threads} cores in all")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
