"""How the dispatch tables time their candidates: passes that stream from memory, the
candidates taking turns, the fastest repetition deciding (a noisy neighbour only ever adds
time)."""

from __future__ import annotations

import time
from collections.abc import Callable

REPEATS = 5
"""Timed passes per candidate, shape and bucket (after one untimed)."""
PASS_BYTES = 64 << 20
"""Weights one pass streams, at least one projection: more than any L2, and enough of the
shape's projections that they do not all sit in L3 either."""


def time_passes(candidates: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Fastest seconds of one call of each candidate in `repeats`, the candidates taking
    turns."""
    samples: dict[str, list[float]] = {c: [] for c in candidates}
    for fn in candidates.values():
        fn()  # warm: first-touch, oneDNN's primitive cache
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: min(s) for name, s in samples.items()}
