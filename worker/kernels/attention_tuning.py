"""How decode attention runs fastest on this machine, for one attention shape (heads, kv
heads, head dim), as `worker/kernels/dispatch.py` asks it:

- into how many tasks per thread it splits contexts when there are fewer (sequence, kv head)
  pairs than threads' tasks (0: no split, 1, 2, 4), over one and four sequences of 512 and
  2048 tokens with each sequence's blocks in order;
- how it prefetches its KV blocks (the next block whole, or the first lines of the next few for
  the hardware to fetch the rest of each page), over eight sequences of 512 tokens and four of
  2048 with the blocks scattered, as a serving cache's become.

Each candidate is judged by the sum of its times relative to the fastest, case by case.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from worker.kernels.dispatch_table import ATTENTION_PREFETCH
from worker.kernels.timing import PASS_BYTES, REPEATS, time_passes

if TYPE_CHECKING:
    from worker.kernels.cpu import CpuKernels

log = logging.getLogger(__name__)

Shape = tuple[int, int, int]
"""(heads, kv heads, head dim)."""
Cases = tuple[tuple[int, int], ...]
"""(sequences, context tokens) each candidate is timed on."""

PARTS = (0, 1, 2, 4)
"""Candidate tasks per thread (0: one task per sequence and kv head)."""
PARTS_CASES: Cases = ((1, 512), (1, 2048), (4, 2048))
PARTS_COPIES = 8
"""Most copies of a case's cache one pass of the split timing reads (up to PASS_BYTES)."""
BLOCK = 16
"""KV block size of the timed caches (the split works on tokens, not blocks)."""
PREFETCH_CASES: Cases = ((8, 512), (4, 2048))
PREFETCH_BYTES = 256 << 20
"""Keys and values a pass of the prefetch timing reads: from memory, past any L3 here."""


def tune_parts(kernels: CpuKernels, shape: Shape) -> tuple[int, dict[str, list[float]]]:
    """The fastest tasks per thread for this shape, and the timings."""
    before = kernels.cpuk_get_attention_parts()
    try:
        results = _time(kernels, shape, PARTS_CASES, {str(p): p for p in PARTS},
                        kernels.cpuk_set_attention_parts, PASS_BYTES, PARTS_COPIES,
                        scattered=False)
    finally:
        kernels.cpuk_set_attention_parts(before)
    parts = int(_fastest(results))
    log.info("decode attention (%d heads, %d kv heads, d %d), us per call at %s "
             "(sequences, tokens): %s: %s", *shape, PARTS_CASES, _listed(results),
             f"{parts} tasks per thread" if parts else "no split")
    return parts, results


def tune_prefetch(kernels: CpuKernels, shape: Shape) -> tuple[str, dict[str, list[float]]]:
    """How decode attention should prefetch its blocks (an ATTENTION_PREFETCH name), with the
    tasks per thread already chosen, and the timings."""
    before = kernels.cpuk_get_attention_prefetch()
    try:
        results = _time(kernels, shape, PREFETCH_CASES, ATTENTION_PREFETCH,
                        kernels.cpuk_set_attention_prefetch, PREFETCH_BYTES, None,
                        scattered=True)
    finally:
        kernels.cpuk_set_attention_prefetch(before)
    chosen = _fastest(results)
    log.info("decode attention (%d heads, %d kv heads, d %d) prefetching, us per call at %s "
             "(sequences, tokens), blocks scattered: %s: %s", *shape, PREFETCH_CASES,
             _listed(results), chosen)
    return chosen, results


def _time(kernels: CpuKernels, shape: Shape, cases: Cases, values: dict[str, int],
          put: Callable[[int], None], pass_bytes: int, max_copies: int | None,
          scattered: bool) -> dict[str, list[float]]:
    """Microseconds per call of decode attention with each of `values` put, per case. Each
    pass reads as many copies of the case's cache as fit in pass_bytes (at most max_copies),
    as a step reads every layer's from memory; scattered: each sequence's blocks anywhere in
    the cache (seeded)."""
    heads, kv_heads, head_dim = shape
    results: dict[str, list[float]] = {name: [] for name in values}
    order = random.Random(0)
    for n, context in cases:
        blocks = n * context // BLOCK
        layer_bytes = 2 * kv_heads * n * context * head_dim * 4
        copies = max(1, pass_bytes // layer_bytes)
        if max_copies is not None:
            copies = min(copies, max_copies)
        caches = [torch.full((2, kv_heads, n * context, head_dim), 0.01) for _ in range(copies)]
        slots = list(range(blocks))
        if scattered:
            order.shuffle(slots)
        tables = torch.tensor(slots, dtype=torch.int32).view(n, blocks // n)
        lens = torch.full((n,), context, dtype=torch.int32)
        q = torch.randn(n, heads, head_dim)

        def run(value: int, q: torch.Tensor = q, caches: list[torch.Tensor] = caches,
                tables: torch.Tensor = tables, lens: torch.Tensor = lens
                ) -> Callable[[], None]:
            def go() -> None:
                put(value)
                for cache in caches:
                    kernels.decode_attention(q, cache, BLOCK, tables, lens)
            return go

        t = time_passes({name: run(value) for name, value in values.items()}, REPEATS)
        for name in results:
            results[name].append(t[name] * 1e6 / copies)
    return results


def _fastest(results: dict[str, list[float]]) -> str:
    """The candidate whose times, each relative to its case's fastest, sum least."""
    cases = len(next(iter(results.values())))
    fastest = [min(ts[i] for ts in results.values()) for i in range(cases)]
    score = {name: sum(t / f for t, f in zip(ts, fastest, strict=True))
             for name, ts in results.items()}
    return min(score, key=lambda name: score[name])


def _listed(results: dict[str, list[float]]) -> str:
    return " ".join(f"{name}:{'/'.join(f'{t:.0f}' for t in ts)}" for name, ts in results.items())
