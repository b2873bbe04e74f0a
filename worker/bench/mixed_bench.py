"""`npuserve bench engine --mixed-load`: running streams' inter-token latency while new prompts
arrive, with the engine's prefill cap (`--max-prefill-stall`) and without it.

One engine, the same seeded load run twice, first with the cap off, then on (a fresh
estimate, learned during the run as a worker would), after a short warm-up load each way:

- `streams` requests of `stream_prompt_tokens` random tokens start together and decode
  greedy tokens (EOS ignored): at least `stream_output_tokens` each, and on until every
  arrival has its first token (then they are stopped), so that every arrival meets running
  streams however fast the machine decodes (within what the KV cache holds beside the
  arrivals);
- once every stream has its first token, `arrivals` prompts of `arrival_prompt_tokens` arrive
  one by one, the gaps drawn uniformly from 0.5-1.5 times `arrival_interval_s` (seeded, the
  same in both runs), each asking `arrival_output_tokens`.

Inter-token latency is the time between two consecutive tokens of one stream, at the end of
the engine step that made each; the streams' first tokens (their prefill) are not counted.
Throughput is every output token of the run over its wall time. Prefix caching is off, so
the second run computes everything the first did.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from common.config import LATENCY_PREFILL_STALL, EngineConfig
from common.sampling_params import SamplingParams
from worker.backends.torch_settings import TorchSettings
from worker.bench import report
from worker.bench.report import Results
from worker.bench.workload import BenchRequest, Workload, make_workload, usable_vocab
from worker.engine.prefill_budget import PrefillBudget

if TYPE_CHECKING:
    from worker.engine.engine import Engine

@dataclass(frozen=True, slots=True)
class MixedLoadConfig:
    model_dir: str
    streams: int = 8
    """Requests decoding while the prompts arrive; their inter-token gaps are measured."""
    stream_prompt_tokens: int = 128
    stream_output_tokens: int = 256
    arrivals: int = 6
    """Prompts arriving while the streams decode."""
    arrival_prompt_tokens: int = 512
    arrival_output_tokens: int = 16
    arrival_interval_s: float = 3.0
    """Mean gap between arrivals."""
    max_prefill_stall: float = LATENCY_PREFILL_STALL
    """The capped run's setting (the other runs with 0)."""
    max_batched_tokens: int = 512
    seed: int = 0
    backend: TorchSettings = field(default_factory=lambda: TorchSettings(kv_cache_gb=1.0))

    def __post_init__(self) -> None:
        if min(self.streams, self.stream_prompt_tokens, self.stream_output_tokens,
               self.arrival_prompt_tokens, self.arrival_output_tokens) < 1:
            raise ValueError("streams and every token count must be >= 1")
        if self.stream_output_tokens < 2:
            raise ValueError("stream_output_tokens must be >= 2: one gap at least")
        if self.arrivals < 0 or not self.arrival_interval_s >= 0:
            raise ValueError("arrivals and arrival_interval_s must be >= 0")
        if not self.max_prefill_stall > 0:
            raise ValueError("max_prefill_stall must be > 0: the capped run needs a cap")


@dataclass(slots=True)
class LoadRun:
    """One run of the load: what the streams saw and what the engine did."""

    wall_s: float = 0.0
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    """Every gap between two consecutive tokens of one stream."""
    itl_at_s: list[float] = field(default_factory=list)
    """When each gap ended, in seconds since the run began (for the plot)."""
    arrival_ttft_s: list[float] = field(default_factory=list)
    """Each arrival's time from its add_request to its first token."""
    arrival_spans_s: list[tuple[float, float]] = field(default_factory=list)
    """Each arrival's (add_request, first token), in seconds since the run began."""
    steps: int = 0
    mixed_steps: int = 0
    """Steps that decoded and prefilled."""
    mixed_prefill_tokens: list[int] = field(default_factory=list)
    """Each prefill token count a step carried beside decodes."""
    decode_step_s: list[float] = field(default_factory=list)
    """Each decode-only step's time."""
    mixed_step_s: list[float] = field(default_factory=list)
    """Each time of a step that decoded and prefilled: the cap aims its mean at
    (1 + stall) decode steps."""


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def arrival_offsets(config: MixedLoadConfig) -> list[float]:
    """Seconds after the streams' first tokens at which each prompt arrives."""
    rng = random.Random(config.seed)
    at, out = 0.0, []
    for _ in range(config.arrivals):
        at += config.arrival_interval_s * rng.uniform(0.5, 1.5)
        out.append(at)
    return out


def stream_token_limit(engine: Engine, streams: Workload, arrivals: Workload) -> int:
    """Most tokens a stream may decode while it waits for the arrivals: what the KV cache
    holds beside the arrivals' own tokens, shared by the streams, within the model's length."""
    capacity = engine.backend.capacity
    free = capacity.num_blocks * capacity.block_size - sum(
        len(r.prompt_ids) + r.max_new_tokens + capacity.block_size for r in arrivals.requests)
    longest = max(len(r.prompt_ids) for r in streams.requests)
    share = free // max(len(streams.requests), 1) - longest - capacity.block_size
    return max(min(share, engine.max_len - longest), 1)


def run_load(engine: Engine, streams: Workload, arrivals: Workload,
             offsets: list[float]) -> LoadRun:
    """Start the streams, feed the arrivals on schedule, step until the arrivals finished and
    the streams have their tokens (those still running then are stopped)."""
    run = LoadRun()
    limit = stream_token_limit(engine, streams, arrivals)
    start = time.perf_counter()
    wanted = {engine.add_request(r.prompt_ids, _greedy(max(limit, r.max_new_tokens))):
              r.max_new_tokens for r in streams.requests}
    stream_ids = set(wanted)
    produced = dict.fromkeys(stream_ids, 0)
    pending = deque(zip(offsets, arrivals.requests, strict=True))
    last: dict[str, float] = {}  # stream -> when its latest token came
    arrived: dict[str, float] = {}  # arrival waiting for its first token -> when it came
    clock: float | None = None  # when every stream had its first token
    while engine.has_unfinished() or pending:
        if clock is not None:
            while pending and clock + pending[0][0] <= time.perf_counter():
                request = pending.popleft()[1]
                rid = engine.add_request(request.prompt_ids, _greedy(request.max_new_tokens))
                arrived[rid] = time.perf_counter()
            if not engine.has_unfinished():
                if pending:
                    time.sleep(max(0.0, clock + pending[0][0] - time.perf_counter()))
                continue
        began = time.perf_counter()
        events = engine.step()
        now = time.perf_counter()
        step = engine.last_step
        run.steps += 1
        if step.decode_seqs and step.prompt_tokens:
            run.mixed_steps += 1
            run.mixed_prefill_tokens.append(step.prompt_tokens)
            run.mixed_step_s.append(now - began)
        elif step.decode_seqs:
            run.decode_step_s.append(now - began)
        run.output_tokens += len(events)
        for event in events:
            rid = event.request_id
            if rid in stream_ids:
                if rid in last:
                    run.itl_s.append(now - last[rid])
                    run.itl_at_s.append(now - start)
                last[rid] = now
                produced[rid] += 1
            elif rid in arrived:
                came = arrived.pop(rid)
                run.arrival_ttft_s.append(now - came)
                run.arrival_spans_s.append((came - start, now - start))
        if clock is None and (len(last) == len(stream_ids) or not engine.has_unfinished()):
            clock = now
        if wanted and not (pending or arrived) and all(
                produced[r] >= n for r, n in wanted.items()):
            for rid in wanted:
                engine.abort(rid)  # False for those already finished
            wanted = {}  # stopped once
    run.wall_s = time.perf_counter() - start
    return run


def _percentiles_ms(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 \
        else [values[0]] * 99
    p50, p90, p99 = cuts[49] * 1e3, cuts[89] * 1e3, cuts[98] * 1e3
    return {"itl_p50_ms": p50, "itl_p90_ms": p90, "itl_p99_ms": p99,
            "itl_max_ms": max(values) * 1e3, "itl_p99_over_p50": p99 / p50 if p50 else 0.0}


def _mean_ms(values: list[float]) -> float:
    return statistics.fmean(values) * 1e3 if values else 0.0


def summarize(run: LoadRun, suffix: str) -> Results:
    """A run's numbers, each key ending in `suffix` ("_no_cap" or "_cap")."""
    ttft = run.arrival_ttft_s
    values: Results = {
        **_percentiles_ms(run.itl_s),
        "itl_count": len(run.itl_s),
        "output_tokens_per_s": run.output_tokens / run.wall_s if run.wall_s else 0.0,
        "output_tokens": run.output_tokens,
        "wall_s": run.wall_s,
        "arrival_ttft_mean_ms": _mean_ms(ttft),
        "arrival_ttft_max_ms": max(ttft) * 1e3 if ttft else 0.0,
        "steps": run.steps,
        "mixed_steps": run.mixed_steps,
        "max_mixed_prefill_tokens": max(run.mixed_prefill_tokens, default=0),
        "mean_mixed_prefill_tokens": statistics.fmean(run.mixed_prefill_tokens or [0]),
        "decode_step_ms_mean": _mean_ms(run.decode_step_s),
        "mixed_step_ms_mean": _mean_ms(run.mixed_step_s),
        "series": {  # for the plot: every gap, and when each arrival came and was answered
            "itl_at_s": [round(t, 4) for t in run.itl_at_s],
            "itl_ms": [round(t * 1e3, 2) for t in run.itl_s],
            "arrivals_s": [[round(a, 4), round(b, 4)] for a, b in run.arrival_spans_s],
        },
    }
    return {key + suffix: value for key, value in values.items()}


def load_engine(config: MixedLoadConfig) -> Engine:
    from worker.engine.engine import Engine

    engine_config = EngineConfig(
        max_num_seqs=config.streams + config.arrivals,
        max_num_batched_tokens=config.max_batched_tokens,
        max_prefill_stall=config.max_prefill_stall, enable_prefix_caching=False)
    return Engine.from_model_dir(config.model_dir, engine_config, backend="torch",
                                 settings=config.backend)


def run(config: MixedLoadConfig) -> Results:
    import torch

    settings = config.backend
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    load_start = os.getloadavg()[0]
    vocab, excluded = usable_vocab(config.model_dir)

    def workload(n: int, prompt: int, output: int, seed: int) -> Workload:
        return make_workload(n, vocab, excluded, seed=seed, prompt_len_range=(prompt, prompt),
                             output_len_range=(output, output))

    streams = workload(config.streams, config.stream_prompt_tokens,
                       config.stream_output_tokens, config.seed)
    arrivals = workload(max(config.arrivals, 1), config.arrival_prompt_tokens,
                        config.arrival_output_tokens, config.seed + 1)
    offsets = arrival_offsets(config)
    engine = load_engine(config)
    stalls = {"_no_cap": 0.0, "_cap": config.max_prefill_stall}
    # warm-up: a short load each way, so neither run pays the first calls of its step shapes
    short = Workload([BenchRequest(r.prompt_ids, 4) for r in streams.requests], streams.seed)
    for stall in stalls.values():
        engine.prefill_budget = PrefillBudget(stall)
        run_load(engine, short, Workload(arrivals.requests[:1], arrivals.seed), [0.0])
    runs: dict[str, LoadRun] = {}
    for suffix, stall in stalls.items():
        engine.prefill_budget = PrefillBudget(stall)
        runs[suffix] = run_load(engine, streams, Workload(arrivals.requests[:config.arrivals],
                                                          arrivals.seed), offsets)
    budget = engine.prefill_budget
    results: Results = {
        "workload": "mixed-load",
        "model": Path(config.model_dir).resolve().name,
        "model_dir": str(config.model_dir),
        "streams": config.streams,
        "stream_prompt_tokens": config.stream_prompt_tokens,
        "stream_output_tokens": config.stream_output_tokens,
        "arrivals": config.arrivals,
        "arrival_prompt_tokens": config.arrival_prompt_tokens,
        "arrival_output_tokens": config.arrival_output_tokens,
        "arrival_interval_s": config.arrival_interval_s,
        "max_prefill_stall": config.max_prefill_stall,
        "max_batched_tokens": config.max_batched_tokens,
        "seed": config.seed,
        **report.environment(settings, config.model_dir, load_start),
        "block_size": engine.backend.capacity.block_size,
        "prefill_cap_tokens_end": budget.tokens(config.streams, refresh=False),
        "decode_step_ms_estimate_end": (budget.decode_s(config.streams) or 0.0) * 1e3,
        "prefill_ms_per_token_estimate_end": (budget.per_token_s or 0.0) * 1e3,
    }
    for suffix, load in runs.items():
        results.update(summarize(load, suffix))
    no_cap, cap = results["itl_p99_ms_no_cap"], results["itl_p99_ms_cap"]
    results["itl_p99_reduction"] = no_cap / cap if cap else 0.0
    results["throughput_ratio"] = (results["output_tokens_per_s_cap"]
                                   / results["output_tokens_per_s_no_cap"])
    return results


def format_table(r: Results) -> str:
    """Both runs side by side; the p99 / p50 ratio is the number the cap is for."""
    rows: list[tuple[str, Callable[[str], str]]] = [
        ("inter-token latency p50", lambda s: f"{r['itl_p50_ms' + s]:.1f} ms"),
        ("inter-token latency p90", lambda s: f"{r['itl_p90_ms' + s]:.1f} ms"),
        ("inter-token latency p99", lambda s: f"{r['itl_p99_ms' + s]:.1f} ms"),
        ("inter-token latency max", lambda s: f"{r['itl_max_ms' + s]:.1f} ms"),
        ("p99 / p50", lambda s: f"{r['itl_p99_over_p50' + s]:.2f}"),
        ("output tokens/s (all requests)", lambda s: f"{r['output_tokens_per_s' + s]:.1f}"),
        ("wall time", lambda s: f"{r['wall_s' + s]:.1f} s"),
        ("arrivals' time to first token, mean",
         lambda s: f"{r['arrival_ttft_mean_ms' + s]:.0f} ms"),
        ("arrivals' time to first token, max",
         lambda s: f"{r['arrival_ttft_max_ms' + s]:.0f} ms"),
        ("steps (prefill beside decodes)", lambda s: f"{r['steps' + s]} ({r['mixed_steps' + s]})"),
        ("mean step: decodes alone / beside prefill",
         lambda s: f"{r['decode_step_ms_mean' + s]:.0f} / {r['mixed_step_ms_mean' + s]:.0f} ms"),
        ("prefill tokens beside decodes, mean / most",
         lambda s: f"{r['mean_mixed_prefill_tokens' + s]:.0f} / "
                   f"{r['max_mixed_prefill_tokens' + s]}"),
    ]
    capped = f"cap (stall {r['max_prefill_stall']:g})"
    lines = [
        f"{r['model']}: {r['streams']} streams of {r['stream_prompt_tokens']} + "
        f"{r['stream_output_tokens']}+ tokens; {r['arrivals']} prompts of "
        f"{r['arrival_prompt_tokens']} tokens (+{r['arrival_output_tokens']} out) arriving "
        f"every ~{r['arrival_interval_s']:g} s; budget {r['max_batched_tokens']} tokens a "
        f"step, {r['threads']} torch threads, {report.placement(r)}",
        f"  {'':<38}  {'no cap':>12}  {capped:>18}",
    ]
    lines += [f"  {name:<38}  {cell('_no_cap'):>12}  {cell('_cap'):>18}" for name, cell in rows]
    lines.append(
        f"  p99 x{r['itl_p99_reduction']:.2f} lower with the cap, throughput "
        f"x{r['throughput_ratio']:.2f}; at the end the cap beside {r['streams']} decodes was "
        f"{r['prefill_cap_tokens_end']} tokens (estimates: their decode step "
        f"{r['decode_step_ms_estimate_end']:.1f} ms, prefill "
        f"{r['prefill_ms_per_token_estimate_end']:.2f} ms a token beside decodes)")
    if r["load_average_1m_start"] > 0.5 * (r["cpu_count"] or 1):
        lines.append(f"  note: load average {r['load_average_1m_start']:.1f} on "
                     f"{r['cpu_count']} CPUs before the run: the times are noisy")
    return "\n".join(lines)
