"""`npuserve bench engine --contention`: the engine on cores it shares, against itself idle.

One seeded workload (prompts of 32-512 tokens, greedy outputs of 16-256 with EOS ignored),
run four ways on the same model and settings:

1. idle: npuserve's engine alone;
2. beside one busy process (a Python busy loop, as a neighbour's job would be): npuserve,
   then transformers' static batches of `max_batch` and transformers one request at a time
   (on `sequential_requests` of them, spread over the workload) under the same neighbour;
3. two engines side by side, each a process of its own with the whole workload, started
   together once both have loaded (two workers on one host): their output tokens together
   over the longer wall time.

The ratios are the result: contended / idle (a fair share of 2 cores with a neighbour is
0.5), the pair's total / one idle engine (1.0: sharing loses nothing), and npuserve /
transformers (both ways) under the same neighbour. The engines run as `npuserve worker`
would: threads unset (its CPUs, fewer while others keep cores busy) unless --threads is
given, and libgomp's spin count as the npuserve command sets it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.backends.torch_settings import TorchSettings
from worker.bench import hf_reference, npuserve_phase, report
from worker.bench.report import Results
from worker.bench.workload import PhaseResult, Workload, workload_for_model

BUSY_LOOP = "while True: pass"


@dataclass(frozen=True, slots=True)
class ContentionConfig:
    model_dir: str
    requests: int = 16
    max_batch: int = 16
    seed: int = 0
    sequential_requests: int = 4
    """transformers one at a time runs this many of the requests (every k-th): a request
    alone shares nothing with the others, so a spread subset measures the same rate."""
    backend: TorchSettings = field(default_factory=lambda: TorchSettings(kv_cache_gb=1.0))


@contextmanager
def busy_neighbour() -> Iterator[None]:
    """One process spinning on a core for as long as the block runs."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(0.5)  # running, and seen by the thread governor's next look
        yield
    finally:
        proc.kill()
        proc.wait()


def _npuserve(config: ContentionConfig, workload: Workload) -> PhaseResult:
    engine = npuserve_phase.load_engine(config.model_dir, config.backend,
                                        max_batch=config.max_batch)
    npuserve_phase.warm_up(engine, workload.requests[0].prompt_ids)
    return npuserve_phase.run_throughput(engine, workload, lambda n: None)


def _side_by_side_child(config: ContentionConfig, workload: Workload, ready: Any,
                        results: Any) -> None:
    """One of the pair: load, wait for the other, run the workload, report."""
    engine = npuserve_phase.load_engine(config.model_dir, config.backend,
                                        max_batch=config.max_batch)
    npuserve_phase.warm_up(engine, workload.requests[0].prompt_ids)
    ready.wait()
    start = time.perf_counter()
    phase = npuserve_phase.run_throughput(engine, workload, lambda n: None)
    results.put((phase.output_tokens, start, time.perf_counter()))


def _side_by_side(config: ContentionConfig, workload: Workload) -> tuple[int, float]:
    """Two engine processes started together: (their output tokens, wall seconds from the
    first start to the last finish)."""
    ctx = mp.get_context("spawn")
    ready, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_side_by_side_child, args=(config, workload, ready, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a side-by-side engine exited with status {p.exitcode}")
    tokens = sum(g[0] for g in got)
    return tokens, max(g[2] for g in got) - min(g[1] for g in got)


def run(config: ContentionConfig, progress: Any = print) -> Results:
    import torch

    workload = workload_for_model(config.model_dir, config.requests, seed=config.seed)
    progress("npuserve idle")
    idle = _npuserve(config, workload)
    progress(f"  {idle.tokens_per_s:.1f} tok/s; npuserve beside a busy process")
    with busy_neighbour():
        contended = _npuserve(config, workload)
    progress(f"  {contended.tokens_per_s:.1f} tok/s; two npuserve engines side by side")
    pair_tokens, pair_wall = _side_by_side(config, workload)
    pair = pair_tokens / pair_wall
    progress(f"  {pair:.1f} tok/s together; transformers static batches beside a busy process")
    threads = config.backend.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    model = hf_reference.load_hf_model(config.model_dir,
                                       report.dtype_of(config.backend, config.model_dir),
                                       config.backend.device)
    hf_reference.warm_up(model, workload.requests[0].prompt_ids)
    with busy_neighbour():
        hf = hf_reference.run_static_batches(model, workload, config.max_batch, lambda n: None)
    progress(f"  {hf.tokens_per_s:.1f} tok/s; transformers one at a time beside a busy process")
    alone = workload.subset(workload.spread(config.sequential_requests))
    with busy_neighbour():
        hf_alone = hf_reference.run_sequential(model, alone, lambda n: None)
    progress(f"  {hf_alone.tokens_per_s:.1f} tok/s ({len(alone.requests)} requests)")
    return {
        "model": Path(config.model_dir).resolve().name,
        "requests": config.requests,
        "max_batch": config.max_batch,
        "total_output_tokens": workload.total_output_tokens,
        "threads": config.backend.threads,
        "cpu_count": os.cpu_count(),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "npuserve_idle_tokens_per_s": idle.tokens_per_s,
        "npuserve_contended_tokens_per_s": contended.tokens_per_s,
        "npuserve_pair_tokens_per_s": pair,
        "hf_batched_contended_tokens_per_s": hf.tokens_per_s,
        "hf_sequential_requests": len(alone.requests),
        "hf_sequential_contended_tokens_per_s": hf_alone.tokens_per_s,
        "contended_over_idle": contended.tokens_per_s / idle.tokens_per_s,
        "pair_over_idle": pair / idle.tokens_per_s,
        "contended_speedup_vs_hf_batched": contended.tokens_per_s / hf.tokens_per_s,
        "contended_speedup_vs_hf_sequential": contended.tokens_per_s / hf_alone.tokens_per_s,
        "outputs_equal_idle_and_contended": idle.outputs == contended.outputs,
    }


def format_table(r: Results) -> str:
    threads = f"{r['threads']} threads" if r["threads"] else "threads as a worker sets them"
    return "\n".join([
        f"{r['model']}: {r['requests']} requests, {r['total_output_tokens']} output tokens, "
        f"max batch {r['max_batch']}, {threads}, {r['cpu_count']} CPUs",
        f"  npuserve idle                        {r['npuserve_idle_tokens_per_s']:7.1f} tok/s",
        f"  npuserve beside a busy process       {r['npuserve_contended_tokens_per_s']:7.1f} "
        f"tok/s  x{r['contended_over_idle']:.2f} of idle",
        f"  two npuserve engines side by side    {r['npuserve_pair_tokens_per_s']:7.1f} "
        f"tok/s  x{r['pair_over_idle']:.2f} of one idle",
        f"  transformers batches beside it       {r['hf_batched_contended_tokens_per_s']:7.1f} "
        f"tok/s  npuserve x{r['contended_speedup_vs_hf_batched']:.2f}",
        f"  transformers one at a time beside it {r['hf_sequential_contended_tokens_per_s']:7.1f} "
        f"tok/s  npuserve x{r['contended_speedup_vs_hf_sequential']:.2f} "
        f"({r['hf_sequential_requests']} requests)",
        f"  greedy outputs equal idle and contended: {r['outputs_equal_idle_and_contended']}",
    ])
