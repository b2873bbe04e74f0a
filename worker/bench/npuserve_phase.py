"""The npuserve side of the benchmark: continuous-batching throughput and batch-1 decode time."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from common.sampling_params import SamplingParams
from worker.bench.workload import PhaseResult, Workload

if TYPE_CHECKING:
    from worker.backends.torch_settings import TorchSettings
    from worker.engine.engine import Engine

OnTokens = Callable[[int], None]
"""Called with the number of new output tokens after each engine step."""


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def load_engine(model_dir: str, settings: TorchSettings, *, max_batch: int,
                prefix_caching: bool = True) -> Engine:
    """npuserve's engine for the checkpoint on the torch backend, sized for `max_batch`
    concurrent requests."""
    from common.config import EngineConfig
    from worker.engine.engine import Engine

    config = EngineConfig(max_num_seqs=max_batch, max_num_batched_tokens=512,
                          enable_prefix_caching=prefix_caching)
    return Engine.from_model_dir(model_dir, config, backend="torch", settings=settings)


def warm_up(engine: Engine, prompt: Sequence[int]) -> None:
    """One short request, so lazy initialisation is not charged to the timed phases."""
    engine.generate([list(prompt[:16])], _greedy(4))


def run_throughput(
    engine: Engine, workload: Workload, on_tokens: OnTokens | None = None
) -> PhaseResult:
    """Submit the whole workload at once and let continuous batching schedule it."""
    prompts = [r.prompt_ids for r in workload.requests]
    params = [_greedy(r.max_new_tokens) for r in workload.requests]
    start = time.perf_counter()
    completions = engine.generate(prompts, params, progress=on_tokens)
    wall = time.perf_counter() - start
    outputs = [list(c.token_ids) for c in completions]
    produced = sum(len(o) for o in outputs)
    if produced != workload.total_output_tokens:
        raise RuntimeError(
            f"npuserve produced {produced} tokens, the workload asked for "
            f"{workload.total_output_tokens}: ignore_eos or max_tokens was not honoured"
        )
    total = workload.total_output_tokens
    return PhaseResult("npuserve", wall, total, total, outputs)


def _stamped_generate(engine: Engine, prompts: Sequence[Sequence[int]], max_tokens: int,
                      on_tokens: OnTokens | None) -> list[tuple[float, int]]:
    """Generate greedily; (time, outputs so far) after each step."""
    stamps: list[tuple[float, int]] = []

    def progress(n: int) -> None:
        stamps.append((time.perf_counter(), (stamps[-1][1] if stamps else 0) + n))
        if on_tokens is not None:
            on_tokens(n)

    engine.generate([list(p) for p in prompts], _greedy(max_tokens), progress=progress)
    return stamps


def decode_ms_per_token(
    engine: Engine,
    prompt: Sequence[int],
    *,
    warmup_tokens: int,
    measured_tokens: int,
    on_tokens: OnTokens | None = None,
) -> float:
    """Milliseconds per output token of one request decoding alone, prefill excluded.

    The engine's progress callback fires after every step, so the time between the step that
    completed the first `warmup_tokens` outputs (prefill and the first decode steps) and the
    last step, divided by the tokens produced in between, is the steady decode cost.
    """
    stamps = _stamped_generate(engine, [prompt], warmup_tokens + measured_tokens, on_tokens)
    start = next((s for s in stamps if s[1] >= warmup_tokens), None)
    end = stamps[-1]
    if start is None or end[1] <= start[1]:
        raise RuntimeError(f"batch-1 run produced {end[1]} tokens, too few to time decode")
    return (end[0] - start[0]) / (end[1] - start[1]) * 1e3


DECODE_BATCHES = (1, 2, 4, 8, 16, 32)
"""Batch sizes of the decode scaling phase."""


def decode_tokens_per_s_by_batch(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    *,
    warmup_steps: int,
    measured_steps: int,
    on_tokens: OnTokens | None = None,
) -> dict[int, float]:
    """Steady decode throughput (output tokens/s, prefill excluded) of b requests decoding
    together, for each b in DECODE_BATCHES up to len(prompts) and the engine's batch: the
    requests start together, and the steps after the first `warmup_steps` decode steps of
    every request are timed."""
    out: dict[int, float] = {}
    for b in DECODE_BATCHES:
        if b > len(prompts) or b > engine.scheduler.capacity.max_batch:
            break
        stamps = _stamped_generate(engine, prompts[:b], warmup_steps + measured_steps,
                                   on_tokens)
        start = next((s for s in stamps if s[1] >= b * warmup_steps), None)
        end = stamps[-1]
        if start is None or end[1] <= start[1]:
            raise RuntimeError(f"batch-{b} run produced {end[1]} tokens, too few to time")
        out[b] = (end[1] - start[1]) / (end[0] - start[0])
    return out


def weight_bytes(engine: Engine) -> int | None:
    """The engine's own count of weight bytes read per decode step, if it offers one."""
    count = getattr(engine, "weight_bytes", None)
    return int(count()) if callable(count) else None


def machine(engine: Engine) -> dict[str, object]:
    """The CPU, the vector extensions the kernels use and the GEMM dispatch table the engine
    chose on it (empty values off the CPU kernels)."""
    from worker.kernels.build import cpu_model
    from worker.kernels.cpu import cpu_kernels

    runner = getattr(engine.backend, "runner", None)
    table = getattr(runner, "dispatch", None)
    plan = getattr(runner, "plan", None)
    device = getattr(runner, "device", None)
    on_cpu = (getattr(device, "type", None) == "cpu"
              and getattr(getattr(runner, "settings", None), "cpu_kernels", False))
    kernels = cpu_kernels() if on_cpu else None
    return {
        "cpu_model": cpu_model(),
        "kernel_isa": kernels.isa if kernels is not None else "",
        "dispatch": table.describe() if table is not None else "",
        "dispatch_choices": table.choices if table is not None else {},
        "dispatch_timings_us": table.timings_us if table is not None else {},
        "one_call_decode_rows": plan.max_rows if plan is not None else 0,
    }
