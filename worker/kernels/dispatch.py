"""Which GEMM serves each float32 or bfloat16 projection at each row count, timed once per
machine.

Which implementation of y = x W^T is fastest depends on the CPU far more than on the code:
on an AVX2 Zen 3 npuserve's small-GEMM kernel beat oneDNN up to 16 rows and MKL lost
everywhere; on an AVX-512 Xeon the same kernel, with non-temporal prefetches, ran 2-4x slower
than MKL at one row, and on a later Xeon prefetching into every cache level streamed 1.2x
slower than into L2 only. So the first time a model starts on a machine, `tune` times the
candidates on the model's own projections and picks per shape and row bucket:

- `kernel`: the compiled kernel (worker/kernels/csrc/linear.c), and before the per-shape
  timing its prefetch setting (into every cache level, into L2, or non-temporal), timed at
  one and four rows over every projection, then whether one row streams the weights row by
  row instead of reading tiles of rows side by side, timed at one row over the float
  projections and, apart, over the w8a16 ones;
- `onednn`: oneDNN's linear over the packed copy of the weight (when it is kept);
- `torch`: F.linear (MKL); for bfloat16 weights, in float32 on W widened for the call (x is
  float32, the kernels' op set's activations).

bfloat16 projections (a `--dtype bfloat16` model) are timed between the same three, with x
as serving passes it (float32, the kernels' op set's activations; oneDNN's candidate rounds
it to bfloat16 and widens its result),
over the float buckets and two prefill buckets (BF16_ROUTE_BUCKETS), the last
one's choice serving every larger call (the lm_head, which serving asks for a step's sampled
rows only, over the float buckets alone): where the kernel gives way to oneDNN depends on how
the CPU multiplies bfloat16 (on AMX tiles it tied oneDNN at 128 rows on a Xeon; with
AVX512-BF16 alone oneDNN took over from 16-128 rows, by shape, on a Zen 4; without native
bfloat16, where `torch` widens to float32, that took over from 128-512 rows on a Xeon).

w8a16 projections with per-channel scales are timed the same way between two candidates,
npuserve's int8 kernel (`kernel`) and F.linear on the weight widened to float32 for the call
(`torch`; the same products, so no route changes a result beyond float rounding), over the
float buckets and a 256-row prefill bucket whose choice serves every larger call. On a CPU
with AMX, before them, the int8 kernel's tiles are timed against its vector code at 1-8 rows
over every w8a16 projection, which sets the rows from which it takes the tiles.

Decode attention's settings (how many tasks per thread its contexts split into, how it
prefetches its KV blocks) are timed once per attention shape (`attention_tuning`).

Each candidate streams the projections of the shape in turn (a decode step reads them all
from memory, not one from cache; up to PASS_BYTES of them) and the candidates take turns,
repetition by repetition; the fastest repetition of each decides, since a noisy neighbour
only ever adds time. Rows past the last bucket (prefill)
keep the built-in rule: oneDNN packed, else F.linear.

The table is cached as JSON beside the compiled kernels, keyed by the CPU's model and
feature flags, the thread count, torch's version, the kernel library and TABLE_FORMAT, so a
restart does not time again and a model with new shapes times only those. The prefetch
setting is timed again when a model with more projection bytes than the one it was timed on
starts (a tiny test model's timing says nothing about streaming from memory); should that
change it, every shape is timed again as its model starts. `NPUSERVE_KERNEL_RETUNE=1` times
again regardless.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.config import env
from worker.kernels import attention_tuning
from worker.kernels.build import cache_dir, cpu_flags, cpu_model
from worker.kernels.dispatch_table import (
    ATTENTION_PREFETCH,
    BUCKETS,
    INT8,
    PREFETCH_MODES,
    PREFETCH_WHERE,
    SETTINGS,
    DispatchTable,
    Routable,
    attention_key,
    key_of,
    shape_of,
)
from worker.kernels.timing import PASS_BYTES, REPEATS, time_passes
from worker.model.linear import Projection
from worker.quant.int8_linear import INT8_ROUTE_BUCKETS, W8A16Projection

if TYPE_CHECKING:
    from worker.kernels.cpu import CpuKernels


log = logging.getLogger(__name__)

CANDIDATES = ("kernel", "onednn", "torch")
INT8_CANDIDATES = ("kernel", "torch")

ROW_STREAM = {"tiles": 0, "stream": 1}
"""cpuk_set_row_stream's and cpuk_set_row_stream_i8's values, by the name the timings keep."""

AMX_I8_ROWS = (1, 2, 4, 8)
"""Row counts at which int8 projections on AMX tiles are timed against the vector code."""

MAX_PASS_S = 0.25
"""A shape whose pass takes longer than this (a big model's lm_head) gets 3 passes."""
PREFILL_PROJECTIONS = 4
"""Projections a pass at the w8a16 prefill bucket runs."""
TABLE_FORMAT = "3"
"""Changes when what a cached timing means does (2: bfloat16 projections timed with float32 x
where the CPU lacks native bfloat16, as the kernels' op set then calls them; 3: with float32 x
on every CPU, as the op set now calls them everywhere)."""


def cache_path(kernels: CpuKernels, threads: int) -> Path:
    """Where this machine's table lives: one per CPU, thread count, torch and kernel build."""
    digest = hashlib.sha256()
    for part in (cpu_model(), cpu_flags(), str(threads), torch.__version__,
                 kernels.build_id, TABLE_FORMAT):
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


def tune(kernels: CpuKernels, projections: Sequence[Routable],
         attention: tuple[int, int, int] | None = None) -> DispatchTable:
    """This machine's table for these projections (float ones, and w8a16 ones that are
    `routable`) and for decode attention of (heads, kv heads, head dim), with their entries
    only: from the cache, with any shape it lacks timed now (and the cache updated).
    Workers starting together on one host take turns (a lock file beside the cache), so one's
    timing is not disturbed by another's and the later ones read its result."""
    threads = torch.get_num_threads()
    path = cache_path(kernels, threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = _tune_locked(kernels, projections, path, threads)
        keys = {key_of(p) for p in projections}
        if attention is not None:
            key = "x".join(map(str, attention))
            keys.add(key)
            if key not in table.attention_parts:
                parts, times = attention_tuning.tune_parts(kernels, attention)
                table.attention_parts[key] = parts
                table.timings_us[f"attention:{key}"] = times
                save(table, path)
            kernels.cpuk_set_attention_parts(table.attention_parts[key])
            if key not in table.attention_prefetch:
                prefetch, times = attention_tuning.tune_prefetch(kernels, attention)
                table.attention_prefetch[key] = prefetch
                table.timings_us[f"attention-prefetch:{key}"] = times
                save(table, path)
            kernels.cpuk_set_attention_prefetch(ATTENTION_PREFETCH[table.attention_prefetch[key]])
        return table.subset(keys)


def _tune_locked(kernels: CpuKernels, projections: Sequence[Routable], path: Path,
                 threads: int) -> DispatchTable:
    table = None if env("KERNEL_RETUNE", "") == "1" else load(path)
    by_shape: dict[str, list[Routable]] = {}
    for p in projections:
        by_shape.setdefault(key_of(p), []).append(p)
    if table is None:
        table = DispatchTable(cpu=cpu_model(), threads=threads)
    nbytes = sum(p.nbytes for p in projections)
    if nbytes > table.prefetch_bytes:
        before = table.prefetch, table.row_stream
        table.prefetch = _tune_prefetch(kernels, by_shape, table)
        kernels.cpuk_set_prefetch(PREFETCH_MODES[table.prefetch])
        table.row_stream = _tune_row_stream(kernels, by_shape, table)
        table.prefetch_bytes = nbytes
        if (table.prefetch, table.row_stream) != before:  # the kernel was timed otherwise
            table.choices.clear()
            table.timings_us = {k: v for k, v in table.timings_us.items()
                                if k in SETTINGS or attention_key(k) is not None}
            table.row_stream_i8_bytes = 0  # int8's tiles were timed with another prefetch
        save(table, path)
    kernels.cpuk_set_prefetch(PREFETCH_MODES[table.prefetch])
    kernels.cpuk_set_row_stream(int(table.row_stream))
    int8_bytes = sum(p.nbytes for p in projections if isinstance(p, W8A16Projection))
    if int8_bytes > table.row_stream_i8_bytes:
        before_stream = table.row_stream_i8
        table.row_stream_i8 = _tune_row_stream_i8(kernels, by_shape, table)
        table.row_stream_i8_bytes = int8_bytes
        if table.row_stream_i8 != before_stream:  # the int8 kernel was timed otherwise
            _forget_int8_shapes(table)
        save(table, path)
    kernels.cpuk_set_row_stream_i8(int(table.row_stream_i8))
    if int8_bytes > table.amx_i8_bytes and "amxint8" in kernels.isa.split():
        before_rows = table.amx_i8_rows
        table.amx_i8_rows = _tune_amx_i8(kernels, by_shape, table)
        table.amx_i8_bytes = int8_bytes
        if table.amx_i8_rows != before_rows:  # the int8 kernel was timed with other rows
            _forget_int8_shapes(table)
        save(table, path)
    if table.amx_i8_rows:
        kernels.cpuk_set_amx_i8_rows(table.amx_i8_rows)
    # a shape not timed yet, or timed over other buckets (an lm_head's route has no prefill
    # buckets)
    todo = [s for s in by_shape
            if len(table.choices.get(s, ())) != len(_buckets(by_shape[s][0]))]
    if todo:
        start = time.monotonic()
        log.info("timing the GEMM candidates for %d projection shapes on this CPU (%s, %d "
                 "threads), once: the choices are cached in %s", len(todo), table.cpu,
                 threads, path)
        for shape in todo:
            times, buckets = _time_shape(by_shape[shape])
            table.timings_us[shape] = times
            table.choices[shape] = [min(times, key=lambda c: times[c][b])
                                    for b in range(len(buckets))]
            log.info("  %s: %s", shape, " ".join(
                f"{bucket}:{c}" for bucket, c in zip(buckets, table.choices[shape], strict=True)))
        log.info("timed in %.1f s", time.monotonic() - start)
        save(table, path)
    return table


def _forget_int8_shapes(table: DispatchTable) -> None:
    """Drop the w8a16 shapes' choices and timings, to be timed again: a setting of the int8
    kernel changed under them."""
    table.choices = {k: v for k, v in table.choices.items() if not k.startswith(INT8)}
    table.timings_us = {k: v for k, v in table.timings_us.items() if not k.startswith(INT8)}


def _pass(fn: Callable[[torch.Tensor, Routable], object], projs: Sequence[Routable],
          x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for p in projs:
            fn(x, p)
    return run


def _time_setting(projs: Sequence[Routable], rows: Sequence[int],
                  get: Callable[[], int], put: Callable[[int], None],
                  values: dict[str, int]) -> dict[str, list[float]]:
    """Microseconds of a pass of the kernel over every one of projs at each of `rows`, with
    the kernels' setting (read by get, written by put) at each of `values` in turn, by name;
    the setting is restored afterwards."""
    before = get()
    widths = [shape_of(key_of(p))[1] for p in projs]
    results: dict[str, list[float]] = {name: [] for name in values}
    try:
        for count in rows:
            xs = [torch.randn(count, width, dtype=_input_dtype(p))
                  for p, width in zip(projs, widths, strict=True)]

            def run(value: int, xs: list[torch.Tensor] = xs) -> Callable[[], None]:
                def go() -> None:
                    put(value)
                    for p, x in zip(projs, xs, strict=True):
                        p.run("kernel", x)
                return go

            t = time_passes({name: run(value) for name, value in values.items()}, REPEATS)
            for name in results:
                results[name].append(t[name] * 1e6)
    finally:
        put(before)
    return results


def _tune_prefetch(kernels: CpuKernels, by_shape: dict[str, list[Routable]],
                   table: DispatchTable) -> str:
    """The fastest prefetch setting here (a PREFETCH_MODES name): the kernel over every
    projection at one and four rows, each setting in turn (one row in tiles)."""
    projs = [p for ps in by_shape.values() for p in ps]
    kernels.cpuk_set_row_stream(0)
    kernels.cpuk_set_row_stream_i8(0)
    results = _time_setting(projs, (1, 4), kernels.cpuk_get_prefetch,
                            kernels.cpuk_set_prefetch, PREFETCH_MODES)
    table.timings_us["prefetch"] = results
    best = min(PREFETCH_MODES, key=lambda name: sum(results[name]))
    log.info("kernel prefetch, us per pass at 1/4 rows: %s: %s",
             ", ".join(f"{PREFETCH_WHERE[n]} {t[0]:.0f}/{t[1]:.0f}" for n, t in results.items()),
             PREFETCH_WHERE[best])
    return best


def _tune_row_stream(kernels: CpuKernels, by_shape: dict[str, list[Routable]],
                     table: DispatchTable) -> bool:
    """Whether one row of x runs faster streaming the weights row by row than in tiles with
    the prefetch setting: the kernel over every float32 and bfloat16 projection at one row,
    each way in turn (w8a16 ones: _tune_row_stream_i8)."""
    projs = [p for key, ps in by_shape.items() if not key.startswith(INT8) for p in ps]
    return _tune_stream(projs, table, "row-stream", kernels.cpuk_get_row_stream,
                        kernels.cpuk_set_row_stream)


def _tune_row_stream_i8(kernels: CpuKernels, by_shape: dict[str, list[Routable]],
                        table: DispatchTable) -> bool:
    """As _tune_row_stream, over the model's w8a16 projections: int8 rows are a quarter of
    float32's bytes and sum in integers, so they may stream where float32 does not, or the
    other way round."""
    projs = [p for key, ps in by_shape.items() if key.startswith(INT8) for p in ps]
    return _tune_stream(projs, table, "row-stream-int8", kernels.cpuk_get_row_stream_i8,
                        kernels.cpuk_set_row_stream_i8)


def _tune_stream(projs: list[Routable], table: DispatchTable, name: str,
                 get: Callable[[], int], put: Callable[[int], None]) -> bool:
    """Whether these projections run faster at one row streamed than in tiles (timings kept
    under `name`)."""
    if not projs:
        return False
    results = _time_setting(projs, (1,), get, put, ROW_STREAM)
    table.timings_us[name] = results
    stream = results["stream"][0] < results["tiles"][0]
    log.info("%s: kernel at one row, us per pass in tiles / streamed: %.0f / %.0f: %s", name,
             results["tiles"][0], results["stream"][0], "streamed" if stream else "tiles")
    return stream


def first_winning(rows: Sequence[int], tiles: Sequence[float], vector: Sequence[float]
                   ) -> int:
    """The fewest of `rows` from which the tiles are no slower than the vector path at that
    count and every larger one timed (twice the last where they never are)."""
    for i, count in enumerate(rows):
        if all(t <= v for t, v in zip(tiles[i:], vector[i:], strict=True)):
            return count
    return 2 * rows[-1]


def _tune_amx_i8(kernels: CpuKernels, by_shape: dict[str, list[Routable]],
                 table: DispatchTable) -> int:
    """The rows from which int8 projections take AMX tiles here: the int8 kernel over every
    w8a16 projection of the model at each of AMX_I8_ROWS, tiles and vector code in turn. The
    model's own projections decide it, since whether they fit in cache does: on a Xeon the
    tiles lost to the vector path at 1-2 rows on SmolLM2's (in L3) and won on Qwen3-0.6B's."""
    projs = [p for key, ps in by_shape.items() if key.startswith(INT8) for p in ps]
    results = _time_setting(projs, AMX_I8_ROWS, kernels.cpuk_get_amx_i8_rows,
                            kernels.cpuk_set_amx_i8_rows,
                            {"tiles": 1, "vector": 2 * AMX_I8_ROWS[-1]})
    table.timings_us["amx-int8"] = results
    chosen = first_winning(AMX_I8_ROWS, results["tiles"], results["vector"])
    log.info("int8 on AMX tiles / vector code, us per pass at %s rows: %s / %s: tiles from %d "
             "rows", "/".join(map(str, AMX_I8_ROWS)),
             "/".join(f"{t:.0f}" for t in results["tiles"]),
             "/".join(f"{t:.0f}" for t in results["vector"]), chosen)
    return chosen


def _input_dtype(p: Routable) -> torch.dtype:
    """The dtype of x in a call of p (float32 on the kernels' op set, a bfloat16 model's
    included)."""
    return p.input_dtype if isinstance(p, Projection) else torch.float32


def _buckets(p: Routable) -> tuple[int, ...]:
    """The row buckets p's route takes a choice for."""
    return INT8_ROUTE_BUCKETS if isinstance(p, W8A16Projection) else p.route_buckets


def _time_shape(projs: Sequence[Routable]
                ) -> tuple[dict[str, list[float]], tuple[int, ...]]:
    """Microseconds per call for each candidate at each bucket (inf where a candidate
    cannot run), from passes over up to PASS_BYTES of projs; and the buckets."""
    int8 = isinstance(projs[0], W8A16Projection)
    names, buckets = INT8_CANDIDATES if int8 else CANDIDATES, _buckets(projs[0])
    out: dict[str, list[float]] = {c: [] for c in names}
    in_features = shape_of(key_of(projs[0]))[1]
    dtype = _input_dtype(projs[0])
    projs = projs[:max(1, PASS_BYTES // projs[0].nbytes)]
    repeats = REPEATS
    for bucket in buckets:
        x = torch.randn(bucket, in_features, dtype=dtype)
        # the prefill bucket is bound by arithmetic, not memory: a few projections will do
        some = projs if bucket <= BUCKETS[-1] else projs[:PREFILL_PROJECTIONS]
        candidates = {
            "kernel": _pass(lambda x, p: p.run("kernel", x), some, x),
            "torch": _pass(lambda x, p: p.run("torch", x), some, x),
        }
        if not int8 and projs[0].packed:  # type: ignore[union-attr]
            candidates["onednn"] = _pass(lambda x, p: p.run("onednn", x), some, x)
        t = time_passes(candidates, repeats)
        if max(t.values()) > MAX_PASS_S:
            repeats = 3
        for c in names:
            out[c].append(t[c] * 1e6 / len(some) if c in t else float("inf"))
    return out, buckets
