"""Which GEMM serves each float32 projection at each row count, timed once per machine.

Which implementation of y = x W^T is fastest depends on the CPU far more than on the code:
on an AVX2 Zen 3 npuserve's small-GEMM kernel beat oneDNN up to 16 rows and MKL lost
everywhere; on an AVX-512 Xeon the same kernel, with non-temporal prefetches, ran 2-4x slower
than MKL at one row. So the first time a model starts on a machine, `tune` times the
candidates on the model's own projections and picks per shape and row bucket:

- `kernel`: the compiled kernel (worker/kernels/csrc/linear.c), and before the per-shape
  timing its prefetch setting (into every cache level, or non-temporal), timed at one and
  four rows over every projection;
- `onednn`: oneDNN's linear over the packed copy of the weight (when it is kept);
- `torch`: F.linear (MKL).

Each candidate streams the projections of the shape in turn (a decode step reads them all
from memory, not one from cache; up to PASS_BYTES of them) and the candidates take turns,
repetition by repetition; the fastest repetition of each decides, since a noisy neighbour
only ever adds time. Rows past the last bucket (prefill)
keep the built-in rule: oneDNN packed, else F.linear.

The table is cached as JSON beside the compiled kernels, keyed by the CPU's model and
feature flags, the thread count, torch's version and the kernel library, so a restart does
not time again and a model with new shapes times only those. `NPUSERVE_KERNEL_RETUNE=1`
times again regardless.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.config import env
from worker.kernels.build import cache_dir, cpu_flags, cpu_model
from worker.model.linear import ROUTE_BUCKETS

if TYPE_CHECKING:
    from worker.kernels.cpu import CpuKernels
    from worker.model.linear import Projection

log = logging.getLogger(__name__)

BUCKETS = ROUTE_BUCKETS
"""Row counts timed; a call of m rows takes the choice of the smallest bucket >= m."""
CANDIDATES = ("kernel", "onednn", "torch")
PLAN_SLACK = 1.1
"""The one-call decode step (worker/kernels/decode_plan.py) runs only the kernel, and saves
the Python and ctypes overhead of some ten calls per layer (a tenth of a batch-1 step): it
covers a bucket where the kernel is within this factor of the fastest for every layer shape."""
REPEATS = 5
"""Timed passes per candidate, shape and bucket (after one untimed)."""
MAX_PASS_S = 0.25
"""A shape whose pass takes longer than this (a big model's lm_head) gets 3 passes."""
PASS_BYTES = 64 << 20
"""Weights one pass streams, at least one projection: more than any L2, and enough of the
shape's projections that they do not all sit in L3 either."""


@dataclass
class DispatchTable:
    """The machine's choices: the kernel's prefetch setting and, per projection shape, one
    candidate per bucket, with the timings (microseconds per pass) that chose them."""

    cpu: str
    threads: int
    prefetch_all_levels: bool = True
    choices: dict[str, list[str]] = field(default_factory=dict)
    """"OUTxIN" -> one of CANDIDATES per bucket."""
    timings_us: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """"OUTxIN" -> candidate -> microseconds per call, per bucket; "prefetch" -> "t0"/"nta"
    -> microseconds of a pass over every projection at one and four rows."""

    def routes(self, shape: tuple[int, int], packed: bool) -> tuple[str, ...] | None:
        """The choice per bucket for a projection of this shape (None: not timed); without
        its packed copy, the faster of the other two where oneDNN was chosen."""
        chosen = self.choices.get(_key(shape))
        if chosen is None:
            return None
        if packed:
            return tuple(chosen)
        times = self.timings_us[_key(shape)]
        return tuple(c if c != "onednn" else min(("kernel", "torch"), key=lambda o: times[o][b])
                     for b, c in enumerate(chosen))

    def plan_rows(self, shapes: dict[tuple[int, int], int]) -> int:
        """Most rows the one-call decode step should cover for a model whose layers have
        these projection shapes (and this many of each): the last bucket up to which the
        kernel's time over all of them stays within PLAN_SLACK of the fastest choices'."""
        rows = 0
        for b, bucket in enumerate(BUCKETS):
            kernel = best = 0.0
            for shape, count in shapes.items():
                times = self.timings_us.get(_key(shape))
                if times is None:
                    return rows
                kernel += count * times["kernel"][b]
                best += count * min(t[b] for t in times.values())
            if kernel > PLAN_SLACK * best:
                return rows
            rows = bucket
        return rows

    def describe(self) -> str:
        """The table as a person reads it: one line per shape, the choice per bucket."""
        head = "rows".ljust(14) + "".join(f"{b:>8}" for b in BUCKETS)
        where = ("every cache level" if self.prefetch_all_levels
                 else "L1 only (non-temporal)")
        lines = [f"kernel prefetch into {where}", head]
        for key, chosen in sorted(self.choices.items(), key=lambda kv: _shape(kv[0])):
            lines.append(key.ljust(14) + "".join(f"{c:>8}" for c in chosen))
        return "\n".join(lines)


def _key(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _shape(key: str) -> tuple[int, int]:
    out, _, inp = key.partition("x")
    return int(out), int(inp)


def cache_path(kernels: CpuKernels, threads: int) -> Path:
    """Where this machine's table lives: one per CPU, thread count, torch and kernel build."""
    digest = hashlib.sha256()
    for part in (cpu_model(), cpu_flags(), str(threads), torch.__version__,
                 kernels.build_id):
        digest.update(part.encode() + b"\0")
    return cache_dir() / f"dispatch-{digest.hexdigest()[:16]}.json"


def load(path: Path) -> DispatchTable | None:
    """The cached table, or None when there is none (or it cannot be read: timed again)."""
    try:
        return DispatchTable(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("ignoring the unreadable dispatch table %s (%s): timing again", path, exc)
        return None


def save(table: DispatchTable, path: Path) -> None:
    """Write atomically (workers starting together race harmlessly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table.__dict__, indent=1))
    os.replace(tmp, path)


def tune(kernels: CpuKernels, projections: Sequence[Projection]) -> DispatchTable:
    """This machine's table for these projections: from the cache, with any shape it lacks
    timed now (and the cache updated). Workers starting together on one host take turns
    (a lock file beside the cache), so one's timing is not disturbed by another's and the
    later ones read its result."""
    threads = torch.get_num_threads()
    path = cache_path(kernels, threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _tune_locked(kernels, projections, path, threads)


def _tune_locked(kernels: CpuKernels, projections: Sequence[Projection], path: Path,
                 threads: int) -> DispatchTable:
    table = None if env("KERNEL_RETUNE", "") == "1" else load(path)
    by_shape: dict[tuple[int, int], list[Projection]] = {}
    for p in projections:
        by_shape.setdefault(tuple(p.weight.shape), []).append(p)  # type: ignore[arg-type]
    if table is None:
        table = DispatchTable(cpu=cpu_model(), threads=threads)
        table.prefetch_all_levels = _tune_prefetch(kernels, by_shape, table)
    kernels.cpuk_set_prefetch(int(table.prefetch_all_levels))
    todo = [s for s in by_shape if _key(s) not in table.choices]
    if todo:
        start = time.monotonic()
        log.info("timing the GEMM candidates for %d projection shapes on this CPU (%s, %d "
                 "threads), once: the choices are cached in %s", len(todo), table.cpu,
                 threads, path)
        for shape in todo:
            times = _time_shape(kernels, by_shape[shape])
            table.timings_us[_key(shape)] = times
            table.choices[_key(shape)] = [min(times, key=lambda c: times[c][b])
                                          for b in range(len(BUCKETS))]
            log.info("  %s: %s", _key(shape), " ".join(
                f"{bucket}:{c}" for bucket, c in zip(BUCKETS, table.choices[_key(shape)],
                                                     strict=True)))
        log.info("timed in %.1f s", time.monotonic() - start)
        save(table, path)
    return table


def _time_passes(candidates: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
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


def _pass(fn: Callable[[torch.Tensor, Projection], object], projs: Sequence[Projection],
          x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for p in projs:
            fn(x, p)
    return run


def _tune_prefetch(kernels: CpuKernels, by_shape: dict[tuple[int, int], list[Projection]],
                   table: DispatchTable) -> bool:
    """Whether prefetching into every cache level beats non-temporal prefetches here: the
    kernel over every projection at one and four rows, each setting in turn."""
    before = kernels.cpuk_get_prefetch()
    projs = [p for ps in by_shape.values() for p in ps]
    results: dict[str, list[float]] = {"t0": [], "nta": []}
    try:
        for rows in (1, 4):
            x = torch.randn(rows, max(p.weight.shape[1] for p in projs))

            def run(all_levels: int, rows: int = rows, x: torch.Tensor = x) -> Callable[[], None]:
                def go() -> None:
                    kernels.cpuk_set_prefetch(all_levels)
                    for p in projs:
                        kernels.linear(x[:, :p.weight.shape[1]].contiguous(), p.weight, p.bias)
                return go

            t = _time_passes({"t0": run(1), "nta": run(0)}, REPEATS)
            for name in results:
                results[name].append(t[name] * 1e6)
    finally:
        kernels.cpuk_set_prefetch(before)
    table.timings_us["prefetch"] = results
    all_levels = sum(results["t0"]) <= sum(results["nta"])
    log.info("kernel prefetch: into every level %.0f/%.0f us, non-temporal %.0f/%.0f us per "
             "pass at 1/4 rows: %s", *results["t0"], *results["nta"],
             "every level" if all_levels else "non-temporal")
    return all_levels


def _time_shape(kernels: CpuKernels, projs: Sequence[Projection]) -> dict[str, list[float]]:
    """Microseconds per call for each candidate at each bucket (inf where a candidate
    cannot run), from passes over up to PASS_BYTES of projs."""
    out: dict[str, list[float]] = {c: [] for c in CANDIDATES}
    in_features = projs[0].weight.shape[1]
    projs = projs[:max(1, PASS_BYTES // projs[0].weight.nbytes)]
    repeats = REPEATS
    for bucket in BUCKETS:
        x = torch.randn(bucket, in_features)
        candidates = {
            "kernel": _pass(lambda x, p: kernels.linear(x, p.weight, p.bias), projs, x),
            "torch": _pass(lambda x, p: p.run("torch", x), projs, x),
        }
        if projs[0].packed:
            candidates["onednn"] = _pass(lambda x, p: p.run("onednn", x), projs, x)
        t = _time_passes(candidates, repeats)
        if max(t.values()) > MAX_PASS_S:
            repeats = 3
        for c in CANDIDATES:
            out[c].append(t[c] * 1e6 / len(projs) if c in t else float("inf"))
    return out
