"""A step of several prompts, run as two independent halves on two threads while other
processes keep cores busy.

Beside a busy process on a 2-core machine the thread governor (cpu_threads.py) leaves the
engine one thread: OpenMP's threads wait on each other at every parallel region, and one
descheduled for a time slice stalls the rest. But work with no barrier between its threads
takes the share of the machine the scheduler gives each thread: beside one busy loop, a GEMM
loop on two independent threads ran 1.38-1.45x faster than on one (Zen 4, 2 cores), where
the same GEMMs on two OpenMP threads ran 1.1-1.25x slower.

A step's prompts are independent of each other: each attends only to its own sequence, and
each writes its own cache blocks. So a step that prefills several of them, on the one thread
the governor left, splits in two: the decodes and some prompts on the engine's thread, the
other prompts on a second thread, each group through its own forward pass with one OpenMP
thread, balanced by tokens. Prefill is bound by arithmetic, so running a group's rows apart
from the other's costs the GEMMs nothing, and the decodes ride along with their group's
prompts, as they do in a whole step.

Only prompt tokens are split: a step of decodes alone streams every weight once for all its
rows, and halving its rows would stream them twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from worker.backends.base import SequenceChunk

MIN_GROUP_TOKENS = 32
"""Fewest prompt tokens the second thread's group takes (about a tenth of a second of
arithmetic on one core for a 135M-parameter model: many of the scheduler's time slices)."""


def split(chunks: Sequence[SequenceChunk], min_tokens: int = MIN_GROUP_TOKENS
          ) -> tuple[list[int], list[int]] | None:
    """Indices of the chunks for the engine's thread (every decode, some prompts) and for
    the second thread (prompts of at least min_tokens tokens together), balanced by tokens;
    None when the step has too little prompt work for two."""
    prompts = sorted((i for i, c in enumerate(chunks) if not c.is_decode),
                     key=lambda i: -len(chunks[i].token_ids))
    if len(prompts) < 2:
        return None
    first = [i for i, c in enumerate(chunks) if c.is_decode]
    second: list[int] = []
    load = [len(first), 0]
    for i in prompts:  # the largest first, each to the lighter group
        group = 0 if load[0] <= load[1] else 1
        (first if group == 0 else second).append(i)
        load[group] += len(chunks[i].token_ids)
    if load[1] < min_tokens:  # the first half always has a decode or the largest prompt
        return None
    return sorted(first), sorted(second)


class SecondThread:
    """The thread that runs the second half of split steps (started on first use)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="split-step")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
