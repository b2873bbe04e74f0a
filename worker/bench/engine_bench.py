"""`npuserve bench engine`: one seeded workload, run by npuserve and by two transformers baselines.

Everything runs in one process on one model with one torch thread count, so the ratios
between the phases are the result (absolute times on a shared machine drift):

1. bandwidth: best-of-N `dst.copy_(src)` of a 512 MiB buffer, read + write bytes counted;
2. npuserve: the whole workload submitted at once, continuous batching up to `max_batch`,
   then one request decoding alone, timed per step after warm-up, then 1, 2, 4 ... 32
   requests decoding together (an engine of batch 32), tokens/s per batch size;
3. transformers `generate`, one request at a time (all requests, or an evenly spread subset);
4. transformers `generate` in arrival-order static batches of `max_batch`, left-padded.

Throughput is requested output tokens / wall time of the phase, prompts included; model
loading and a short warm-up generate are not timed.

`decode_only` runs phases 1 and 2's decode measurements alone, on one engine: batch-1 decode
against the floor and tokens/s by batch size (for models too big to run the workload and the
transformers baselines in reasonable time on a CPU).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from worker.backends.torch_settings import TorchSettings
from worker.bench import bandwidth, hf_reference, npuserve_phase, quant_phase, report
from worker.bench.report import Results
from worker.bench.workload import (
    OUTPUT_LEN_RANGE,
    PROMPT_LEN_RANGE,
    PhaseResult,
    workload_for_model,
)

if TYPE_CHECKING:
    from worker.engine.engine import Engine


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Settings of one benchmark run; the CLI fills unset sizes from QUICK or FULL."""

    model_dir: str
    requests: int
    """Number of requests in the workload."""
    max_batch: int
    """npuserve's max_num_seqs and the static batch size of the transformers baseline; with
    decode_only, the largest batch of the decode-by-batch phase."""
    seed: int = 0
    """Seed of the workload (lengths and prompt tokens)."""
    backend: TorchSettings = field(default_factory=lambda: TorchSettings(kv_cache_gb=1.0))
    """npuserve's torch backend settings; its device, dtype and threads (torch's default
    when unset) serve every phase."""
    decode_warmup_tokens: int = 8
    """Batch-1 decode: outputs produced (prefill included) before the timer starts."""
    decode_tokens: int = 64
    """Batch-1 decode: outputs timed after the warm-up."""
    sequential_requests: int | None = None
    """transformers one-at-a-time runs this many requests, spread evenly over the workload
    (every k-th); None runs all. A request alone shares nothing with the others, so its
    tokens/s over a spread subset measures the same rate in a fraction of the time."""
    quick: bool = False
    quantized_dir: str | None = None
    """A quantized copy of the model: its batch-1 decode is timed against the float model's."""
    decode_only: bool = False
    """Only the bandwidth floor, batch-1 decode (and the quantized model's) and decode by
    batch size: no workload, no transformers."""


QUICK = {"requests": 32, "max_batch": 16, "decode_tokens": 32, "sequential_requests": 4}
"""Sizes for --quick: under 4 minutes for SmolLM2-135M fp32 on 2 idle cores (AVX2 Zen 3 at
2.45 GHz; transformers' phases are most of it). Two batches' worth of requests, so static
batching pays for its padding and tails; one-at-a-time on every 8th request, whose rate is
mostly decode steps and varies little with the request."""
FULL = {"requests": 64, "max_batch": 16, "decode_tokens": 64, "sequential_requests": None}
"""Default sizes: every phase runs every request."""


@contextmanager
def _bar(desc: str, total: int, unit: str = "tok") -> Iterator[tqdm]:
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar


def _matches(a: PhaseResult, b: PhaseResult, indices: list[int]) -> int:
    """How many of b's outputs (for the requests at `indices`) equal a's for the same ones."""
    return sum(a.outputs[i] == out for i, out in zip(indices, b.outputs, strict=True))


def run(config: BenchConfig) -> Results:
    """Run every phase and return the flat results object that becomes the JSON file."""
    import torch

    if config.decode_only:
        return run_decode_only(config)
    settings = config.backend
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    load_start = os.getloadavg()[0]
    workload = workload_for_model(config.model_dir, config.requests, seed=config.seed)
    first_prompt = workload.requests[0].prompt_ids
    alone = workload.spread(config.sequential_requests)
    alone_workload = workload.subset(alone)

    gb_s = _bandwidth(settings.device)
    engine = npuserve_phase.load_engine(config.model_dir, settings, max_batch=config.max_batch)
    npuserve_phase.warm_up(engine, first_prompt)
    with _bar("npuserve", workload.total_output_tokens) as bar:
        ours = npuserve_phase.run_throughput(engine, workload, bar.update)
    decode_ms, gb_s, samples, quantized = _batch1(engine, config, first_prompt[:32], gb_s)
    engine_bytes = npuserve_phase.weight_bytes(engine)
    machine = npuserve_phase.machine(engine)
    del engine
    gc.collect()
    engine = npuserve_phase.load_engine(config.model_dir, settings,
                                        max_batch=npuserve_phase.DECODE_BATCHES[-1])
    by_batch = _by_batch(engine, [r.prompt_ids[:32] for r in workload.requests], config)
    del engine
    gc.collect()

    model = hf_reference.load_hf_model(config.model_dir,
                                       report.dtype_of(settings, config.model_dir),
                                       settings.device)
    hf_bytes = bandwidth.decode_weight_bytes(model)
    hf_reference.warm_up(model, first_prompt)
    with _bar("transformers sequential", alone_workload.total_output_tokens) as bar:
        sequential = hf_reference.run_sequential(model, alone_workload, bar.update)
    with _bar(f"transformers batch {config.max_batch}", workload.total_output_tokens) as bar:
        batched = hf_reference.run_static_batches(model, workload, config.max_batch, bar.update)
    del model
    gc.collect()

    weight_bytes = engine_bytes if engine_bytes is not None else hf_bytes
    return {
        **_decode_results(config, machine, load_start, gb_s, weight_bytes, decode_ms,
                          by_batch, quantized),
        **samples,
        "weight_bytes_source": "engine" if engine_bytes is not None else "transformers",
        "hf_weight_bytes_per_decode_step": hf_bytes,
        "transformers_version": _transformers_version(),
        "requests": config.requests,
        "max_batch": config.max_batch,
        "prompt_len_range": list(PROMPT_LEN_RANGE),
        "output_len_range": list(OUTPUT_LEN_RANGE),
        "total_prompt_tokens": workload.total_prompt_tokens,
        "total_output_tokens": workload.total_output_tokens,
        "npuserve_output_tokens_per_s": ours.tokens_per_s,
        "npuserve_wall_s": ours.wall_s,
        "hf_sequential_output_tokens_per_s": sequential.tokens_per_s,
        "hf_sequential_wall_s": sequential.wall_s,
        "hf_sequential_requests_measured": len(alone),
        "hf_batched_output_tokens_per_s": batched.tokens_per_s,
        "hf_batched_wall_s": batched.wall_s,
        "hf_batched_computed_tokens": batched.computed_tokens,
        "speedup_vs_hf_sequential": ours.tokens_per_s / sequential.tokens_per_s,
        "speedup_vs_hf_batched": ours.tokens_per_s / batched.tokens_per_s,
        "npuserve_outputs_matching_hf_sequential": _matches(ours, sequential, alone),
        "hf_batched_outputs_matching_hf_sequential": _matches(batched, sequential, alone),
    }


def run_decode_only(config: BenchConfig) -> Results:
    """The decode measurements alone, on one engine of batch `max_batch` (capped at the
    largest of DECODE_BATCHES): batch-1 decode against the floor, the quantized model's when
    given, and decode tokens/s by batch size. Prompts are the first 32 tokens of a seeded
    workload of `max_batch` requests; nothing needs a tokenizer."""
    import torch

    settings = config.backend
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    load_start = os.getloadavg()[0]
    largest = min(config.max_batch, npuserve_phase.DECODE_BATCHES[-1])
    workload = workload_for_model(config.model_dir, largest, seed=config.seed)
    prompts = [r.prompt_ids[:32] for r in workload.requests]

    gb_s = _bandwidth(settings.device)
    engine = npuserve_phase.load_engine(config.model_dir, settings, max_batch=largest)
    npuserve_phase.warm_up(engine, prompts[0])
    decode_ms, gb_s, samples, quantized = _batch1(engine, config, prompts[0], gb_s)
    gc.collect()
    by_batch = _by_batch(engine, prompts, config)
    weight_bytes = npuserve_phase.weight_bytes(engine)
    machine = npuserve_phase.machine(engine)
    del engine
    gc.collect()
    if weight_bytes is None:
        raise RuntimeError("--decode-only needs the engine's count of weight bytes per step")
    return {
        **_decode_results(config, machine, load_start, gb_s, weight_bytes, decode_ms,
                          by_batch, quantized),
        **samples,
        "decode_only": True,
        "weight_bytes_source": "engine",
        "max_batch": largest,
    }


def _bandwidth(device: str) -> float:
    with _bar("copy bandwidth", 1, unit="run") as bar:
        gb_s = bandwidth.measure_copy_bandwidth(device=device)
        bar.update(1)
    return gb_s


BATCH1_ROUNDS = 3
"""Batch-1 decode runs, each right after a copy-bandwidth measurement of its own (the first
after the run's opening one): the round whose decode is closest to its own floor decides the
ratio. Pairing each decode with the bandwidth of the same moment keeps a busy or a lucky
moment (a shared VM's copy bandwidth swings by 1.5x within minutes) from landing on one side
only."""


def _batch1(engine: Engine, config: BenchConfig, prompt: list[int], gb_s: float
            ) -> tuple[float, float, Results, Results]:
    """Batch-1 decode ms/token of `engine` and the copy bandwidth measured just before it, of
    the best of BATCH1_ROUNDS rounds (gb_s is the first round's), with every sample; then the
    quantized phase when configured."""
    decode: list[float] = []
    copies = [gb_s]
    per_round = config.decode_warmup_tokens + config.decode_tokens
    with _bar("npuserve batch-1 decode", BATCH1_ROUNDS * per_round) as bar:
        for r in range(BATCH1_ROUNDS):
            if r:
                copies.append(bandwidth.measure_copy_bandwidth(device=config.backend.device))
            decode.append(npuserve_phase.decode_ms_per_token(
                engine,
                prompt,
                warmup_tokens=config.decode_warmup_tokens,
                measured_tokens=config.decode_tokens,
                on_tokens=bar.update,
            ))
    samples: Results = {"decode_ms_per_token_batch1_samples": decode,
                        "bandwidth_gb_s_samples": copies}
    quantized: Results = {}
    if config.quantized_dir is not None:
        total = quant_phase.total_tokens(config.decode_warmup_tokens, config.decode_tokens)
        with _bar("quantized vs float batch-1 decode", total) as bar:
            quantized = quant_phase.run(
                engine, config.quantized_dir, prompt, config.backend,
                max_batch=engine.scheduler.capacity.max_batch,
                warmup_tokens=config.decode_warmup_tokens,
                measured_tokens=config.decode_tokens, on_tokens=bar.update)
    best = bandwidth.closest_to_floor(decode, copies)
    return decode[best], copies[best], samples, quantized


def _by_batch(engine: Engine, prompts: list[list[int]], config: BenchConfig) -> dict[int, float]:
    steps = {"warmup_steps": 4, "measured_steps": 12 if config.quick else 24}
    largest = engine.scheduler.capacity.max_batch
    total = sum(b * (steps["warmup_steps"] + steps["measured_steps"])
                for b in npuserve_phase.DECODE_BATCHES if b <= min(len(prompts), largest))
    with _bar("npuserve decode by batch size", total) as bar:
        return npuserve_phase.decode_tokens_per_s_by_batch(engine, prompts, **steps,
                                                           on_tokens=bar.update)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _decode_results(config: BenchConfig, machine: dict[str, object], load_start: float,
                    gb_s: float, weight_bytes: int, decode_ms: float,
                    by_batch: dict[int, float], quantized: Results) -> Results:
    """The keys both modes write: the machine, the run's settings and the decode figures."""
    import torch

    settings = config.backend
    floor_ms = bandwidth.floor_ms_per_token(weight_bytes, gb_s)
    return {
        **machine,
        "model": Path(config.model_dir).resolve().name,
        "model_dir": str(config.model_dir),
        "quick": config.quick,
        "seed": config.seed,
        **report.environment(settings, config.model_dir, load_start),
        "torch_version": torch.__version__,
        "decode_ms_per_token_batch1": decode_ms,
        "decode_tokens_per_s_by_batch": by_batch,
        "decode_tokens_measured": config.decode_tokens,
        "bandwidth_gb_s": gb_s,
        "weight_bytes_per_decode_step": weight_bytes,
        "bandwidth_floor_ms_per_token": floor_ms,
        "decode_vs_floor": decode_ms / floor_ms,
        **quantized,
    }
