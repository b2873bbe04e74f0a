"""`npuserve bench engine --shared-prefix`: requests that share a system prompt, served with
prefix caching and without it, side by side in one process.

Two engines over the same checkpoint and settings, one with prefix caching, one without:

1. time to first token: the requests one at a time on an idle engine, alternating between
   the engines request by request, so drift on a shared machine hits both alike. With
   caching the first request is a miss that fills the cache and the others hit the shared
   prefix; without it every request is a miss;
2. throughput: the same number of requests with another shared prefix (so nothing is cached
   yet) submitted at once and batched: output tokens/s and the mean time to first token, in
   rounds that alternate between the engines, each round with a prefix of its own.

Outputs are greedy with EOS ignored, and must be the same with and without caching.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from common.sampling_params import SamplingParams
from worker.backends.torch_settings import TorchSettings
from worker.bench import npuserve_phase, report
from worker.bench.report import Results
from worker.bench.workload import BenchRequest, Workload, make_shared_prefix_workload, usable_vocab

if TYPE_CHECKING:
    from worker.engine.engine import Engine


@dataclass(frozen=True, slots=True)
class PrefixBenchConfig:
    model_dir: str
    requests: int = 8
    """Requests in each phase."""
    max_batch: int = 16
    prefix_tokens: int = 512
    """The shared system prompt's length."""
    own_tokens: int = 64
    """Each request's own prompt tokens after the shared ones."""
    output_tokens: int = 64
    batched_rounds: int = 2
    """Batched runs per engine, alternating; the best of each engine's is reported."""
    seed: int = 0
    backend: TorchSettings = field(default_factory=lambda: TorchSettings(kv_cache_gb=1.0))


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@dataclass(slots=True)
class Batched:
    wall_s: float
    ttft_s: list[float]
    outputs: list[list[int]]


def alone(engine: Engine, request: BenchRequest) -> tuple[float, list[int]]:
    """One request on an idle engine -> (seconds from add_request to its first token, its
    output ids)."""
    start = time.perf_counter()
    engine.add_request(request.prompt_ids, _greedy(request.max_new_tokens))
    first, tokens = 0.0, list[int]()
    while engine.has_unfinished():
        for event in engine.step():
            if not tokens:
                first = time.perf_counter() - start
            tokens.append(event.token_id)
    return first, tokens


def together(engine: Engine, workload: Workload) -> Batched:
    """The whole workload submitted at once, batched as the engine likes."""
    start = time.perf_counter()
    ids = [engine.add_request(r.prompt_ids, _greedy(r.max_new_tokens))
           for r in workload.requests]
    first: dict[str, float] = {}
    outputs: dict[str, list[int]] = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for event in engine.step():
            first.setdefault(event.request_id, time.perf_counter() - start)
            outputs[event.request_id].append(event.token_id)
    return Batched(time.perf_counter() - start, [first[rid] for rid in ids],
                   [outputs[rid] for rid in ids])


def run(config: PrefixBenchConfig) -> Results:
    import torch

    settings = config.backend
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    load_start = os.getloadavg()[0]
    vocab, excluded = usable_vocab(config.model_dir)

    def workload(seed: int, requests: int = config.requests, prefix: int = config.prefix_tokens,
                 own: int = config.own_tokens, out: int = config.output_tokens) -> Workload:
        return make_shared_prefix_workload(requests, vocab, excluded, prefix_len=prefix,
                                           own_len=own, output_len=out, seed=seed)

    one_by_one = workload(config.seed)
    warm = workload(config.seed + 1, requests=1, prefix=0, own=16, out=4).requests[0]
    engines = {caching: npuserve_phase.load_engine(config.model_dir, settings,
                                                   max_batch=config.max_batch,
                                                   prefix_caching=caching)
               for caching in (False, True)}
    for engine in engines.values():
        alone(engine, warm)
    ttft: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, list[list[int]]] = {False: [], True: []}
    for request in one_by_one.requests:
        for caching, engine in engines.items():
            seconds, tokens = alone(engine, request)
            ttft[caching].append(seconds)
            outputs[caching].append(tokens)
    runs: dict[bool, list[Batched]] = {False: [], True: []}
    for round_ in range(config.batched_rounds):
        batched = workload(config.seed + 2 + round_)
        for caching, engine in engines.items():
            runs[caching].append(together(engine, batched))
    stats = engines[True].prefix_cache_stats

    misses, hits = ttft[False], ttft[True][1:]
    miss_ms, hit_ms = statistics.median(misses) * 1e3, statistics.median(hits or [0.0]) * 1e3
    tok = {c: [config.requests * config.output_tokens / r.wall_s for r in rs]
           for c, rs in runs.items()}
    best = {c: max(range(len(t)), key=t.__getitem__) for c, t in tok.items()}
    for caching, rs in runs.items():
        outputs[caching] += [out for r in rs for out in r.outputs]
    same = sum(a == b for a, b in zip(outputs[False], outputs[True], strict=True))
    return {
        "workload": "shared-prefix",
        "model": Path(config.model_dir).resolve().name,
        "model_dir": str(config.model_dir),
        "requests": config.requests,
        "max_batch": config.max_batch,
        "prefix_tokens": config.prefix_tokens,
        "own_tokens": config.own_tokens,
        "output_tokens": config.output_tokens,
        "seed": config.seed,
        **report.environment(settings, config.model_dir, load_start),
        "block_size": engines[True].backend.capacity.block_size,
        "ttft_miss_ms": miss_ms,
        "ttft_miss_ms_each": [s * 1e3 for s in misses],
        "ttft_hit_ms": hit_ms,
        "ttft_hit_ms_each": [s * 1e3 for s in hits],
        "ttft_first_with_caching_ms": ttft[True][0] * 1e3,
        "ttft_hit_speedup": miss_ms / hit_ms if hit_ms > 0 else 0.0,
        "ttft_hit_speedup_best": min(misses) / min(hits) if hits else 0.0,
        "batched_rounds": config.batched_rounds,
        "batched_output_tokens_per_s_no_caching": tok[False][best[False]],
        "batched_output_tokens_per_s_caching": tok[True][best[True]],
        "batched_output_tokens_per_s_no_caching_each": tok[False],
        "batched_output_tokens_per_s_caching_each": tok[True],
        "batched_speedup": tok[True][best[True]] / tok[False][best[False]],
        "batched_ttft_mean_ms_no_caching":
            statistics.fmean(runs[False][best[False]].ttft_s) * 1e3,
        "batched_ttft_mean_ms_caching": statistics.fmean(runs[True][best[True]].ttft_s) * 1e3,
        "prompt_tokens": stats.prompt_tokens,
        "prompt_tokens_cached": stats.cached_tokens,
        "outputs_identical": same,
        "outputs_compared": len(outputs[True]),
    }


def format_table(r: Results) -> str:
    """A short human summary: the ratios are the numbers to quote."""
    def spread(values: list[float]) -> str:
        return f"{min(values):.1f}-{max(values):.1f}" if values else "-"

    hit_rate = r["prompt_tokens_cached"] / r["prompt_tokens"] if r["prompt_tokens"] else 0.0
    lines = [
        f"{r['model']}: {r['requests']} requests of {r['prefix_tokens']} shared + "
        f"{r['own_tokens']} own prompt tokens, {r['output_tokens']} output tokens, "
        f"{r['threads']} torch threads, {report.placement(r)}",
        f"  TTFT alone, miss (no caching)   {r['ttft_miss_ms']:8.1f} ms  median of "
        f"{len(r['ttft_miss_ms_each'])}, range {spread(r['ttft_miss_ms_each'])}",
        f"  TTFT alone, hit (caching)       {r['ttft_hit_ms']:8.1f} ms  median of "
        f"{len(r['ttft_hit_ms_each'])}, range {spread(r['ttft_hit_ms_each'])}: "
        f"x{r['ttft_hit_speedup']:.2f} lower (best against best: "
        f"x{r['ttft_hit_speedup_best']:.2f})",
        f"  TTFT alone, first with caching  {r['ttft_first_with_caching_ms']:8.1f} ms  "
        "(a miss that fills the cache)",
        f"  batched (max {r['max_batch']}), no caching  "
        f"{r['batched_output_tokens_per_s_no_caching']:8.1f} tok/s, mean TTFT "
        f"{r['batched_ttft_mean_ms_no_caching']:.0f} ms; best of "
        f"{spread(r['batched_output_tokens_per_s_no_caching_each'])} tok/s",
        f"  batched (max {r['max_batch']}), caching     "
        f"{r['batched_output_tokens_per_s_caching']:8.1f} tok/s, mean TTFT "
        f"{r['batched_ttft_mean_ms_caching']:.0f} ms; best of "
        f"{spread(r['batched_output_tokens_per_s_caching_each'])} tok/s: "
        f"x{r['batched_speedup']:.2f} throughput",
        f"  prefix cache: {r['prompt_tokens_cached']} of {r['prompt_tokens']} prompt tokens "
        f"found cached ({hit_rate:.0%})",
        f"  greedy outputs identical with and without caching: {r['outputs_identical']}/"
        f"{r['outputs_compared']}",
    ]
    if r["load_average_1m_start"] > 0.5 * (r["cpu_count"] or 1):
        lines.append(f"  note: load average {r['load_average_1m_start']:.1f} on "
                     f"{r['cpu_count']} CPUs before the run: the times are noisy")
    return "\n".join(lines)
