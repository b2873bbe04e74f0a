"""A machine's dispatch choices, as `worker/kernels/dispatch.py` timed them: where the kernel
prefetches its weights, from how many rows int8 takes AMX tiles, how decode attention splits
contexts, and per projection shape and row bucket which GEMM serves it, with the timings that
chose each. The table answers a projection's route and the one-call step's rows, and prints
itself for a person (`npuserve bench engine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from worker.model.linear import BF16_ROUTE_BUCKETS, ROUTE_BUCKETS, Projection
from worker.quant.int8_linear import INT8_ROUTE_BUCKETS, W8A16Projection

Routable = Projection | W8A16Projection
INT8 = "w8a16:"
"""Key prefix of a w8a16 shape."""
BF16 = "bf16:"
"""Key prefix of a bfloat16 shape."""

BUCKETS = ROUTE_BUCKETS
"""Row counts timed; a call of m rows takes the choice of the smallest bucket >= m."""
PREFETCH_MODES = {"t0": 1, "l2": 2, "nta": 0}
"""The kernel's prefetch settings (kernels.h's PREFETCH_ALL_LEVELS, PREFETCH_L2, PREFETCH_NTA)
by the name the table keeps; the first is the kernel's default."""

PREFETCH_WHERE = {"t0": "every cache level", "l2": "L2 (not L1)",
                  "nta": "L1 only (non-temporal)"}

ATTENTION_PREFETCH = {"block": 0, "pages": 1}
"""Decode attention's prefetch settings (cpuk_set_attention_prefetch) by the name the table
keeps: the next block whole, or the first lines of the next few blocks; the first is the
kernel's default."""

ATTENTION_PREFETCH_WHAT = {"block": "the next block whole",
                           "pages": "the first lines of the next blocks"}

ATTENTION_TIMINGS = ("attention:", "attention-prefetch:")
"""Prefixes of the timings key of decode attention's settings, before an attention key."""

SETTINGS = ("prefetch", "row-stream", "row-stream-int8", "amx-int8")
"""Timings of the kernels' settings, which every model's table keeps."""

PLAN_SLACK = 1.1
"""The one-call decode step (worker/kernels/decode_plan.py) runs only the kernel, and saves
the Python and ctypes overhead of some ten calls per layer (a tenth of a batch-1 step): it
covers a bucket where the kernel is within this factor of the fastest for every layer shape."""


def attention_key(timings_key: str) -> str | None:
    """The attention key of a timing of decode attention's settings (None: another timing)."""
    for prefix in ATTENTION_TIMINGS:
        if timings_key.startswith(prefix):
            return timings_key.removeprefix(prefix)
    return None


@dataclass
class DispatchTable:
    """The machine's choices: the kernel's prefetch setting and, per projection shape, one
    candidate per bucket, with the timings (microseconds per pass) that chose them."""

    cpu: str
    threads: int
    prefetch: str = "t0"
    """Where the kernel prefetches weights, a PREFETCH_MODES name."""
    prefetch_bytes: int = 0
    """Bytes of the projections the prefetch setting was timed over: a bigger model times it
    again (a tiny model's few kilobytes say nothing about streaming from memory)."""
    row_stream: bool = False
    """Whether one row of x over float32 or bfloat16 weights streams them row by row
    (cpuk_set_row_stream) rather than in tiles, timed with the prefetch setting."""
    row_stream_i8: bool = False
    """The same for int8 weights (cpuk_set_row_stream_i8)."""
    row_stream_i8_bytes: int = 0
    """Bytes of the w8a16 projections row_stream_i8 was timed over (as prefetch_bytes)."""
    amx_i8_rows: int = 0
    """Rows from which int8 projections take AMX tiles (0: not timed, the kernel's default)."""
    amx_i8_bytes: int = 0
    """Bytes of the w8a16 projections amx_i8_rows was timed over (as prefetch_bytes)."""
    choices: dict[str, list[str]] = field(default_factory=dict)
    """Shape key ("OUTxIN", "w8a16:OUTxIN", "bf16:OUTxIN", see key_of) -> a candidate per
    bucket (BUCKETS, INT8_ROUTE_BUCKETS for w8a16, BF16_ROUTE_BUCKETS for bfloat16)."""
    timings_us: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Shape key -> candidate -> microseconds per call, per bucket; "prefetch" -> a
    PREFETCH_MODES name -> microseconds of a pass over every projection at one and four rows;
    "row-stream" -> "tiles"/"stream" -> microseconds of a pass over every float projection at
    one row; "row-stream-int8" the same over every w8a16 projection; "amx-int8" ->
    "tiles"/"vector" -> microseconds of a pass over every w8a16 projection at AMX_I8_ROWS
    rows; "attention:" and an attention key -> tasks per thread -> microseconds per call, per
    attention_tuning.PARTS_CASES; "attention-prefetch:" and an attention key -> an
    ATTENTION_PREFETCH name -> microseconds per call, per attention_tuning.PREFETCH_CASES."""
    attention_parts: dict[str, int] = field(default_factory=dict)
    """"HEADSxKV_HEADSxHEAD_DIM" -> decode attention's tasks per thread (0: no split)."""
    attention_prefetch: dict[str, str] = field(default_factory=dict)
    """The same key -> how decode attention prefetches its blocks, an ATTENTION_PREFETCH name."""

    def routes(self, key: str, packed: bool) -> tuple[str, ...] | None:
        """The choice per bucket for a projection of this shape key (None: not timed);
        without its packed copy, the faster of the other two where oneDNN was chosen."""
        chosen = self.choices.get(key)
        if chosen is None:
            return None
        if packed:
            return tuple(chosen)
        times = self.timings_us[key]
        return tuple(c if c != "onednn" else min(("kernel", "torch"), key=lambda o: times[o][b])
                     for b, c in enumerate(chosen))

    def plan_rows(self, shapes: dict[str, int]) -> int:
        """Most rows the one-call decode step should cover for a model whose layers have
        projections of these shape keys (and this many of each): the last bucket up to which
        the kernel's time over all of them stays within PLAN_SLACK of the fastest choices'."""
        rows = 0
        for b, bucket in enumerate(BUCKETS):
            kernel = best = 0.0
            for shape, count in shapes.items():
                times = self.timings_us.get(shape)
                if times is None:
                    return rows
                kernel += count * times["kernel"][b]
                best += count * min(t[b] for t in times.values())
            if kernel > PLAN_SLACK * best:
                return rows
            rows = bucket
        return rows

    def subset(self, keys: set[str]) -> DispatchTable:
        """The table of these shape and attention keys only (one model's)."""
        return DispatchTable(
            cpu=self.cpu, threads=self.threads, prefetch=self.prefetch,
            prefetch_bytes=self.prefetch_bytes, row_stream=self.row_stream,
            row_stream_i8=self.row_stream_i8, row_stream_i8_bytes=self.row_stream_i8_bytes,
            amx_i8_rows=self.amx_i8_rows,
            amx_i8_bytes=self.amx_i8_bytes,
            choices={k: v for k, v in self.choices.items() if k in keys},
            timings_us={k: v for k, v in self.timings_us.items()
                        if k in SETTINGS or (attention_key(k) or k) in keys},
            attention_parts={k: v for k, v in self.attention_parts.items() if k in keys},
            attention_prefetch={k: v for k, v in self.attention_prefetch.items()
                                if k in keys})

    def describe(self) -> str:
        """The table as a person reads it: one line per shape, the choice per bucket (w8a16
        and bfloat16 shapes in blocks of their own, with their prefill buckets)."""
        lines = [f"kernel prefetch into {PREFETCH_WHERE[self.prefetch]}"]
        streamed = [kind for kind, on in (("float", self.row_stream),
                                          ("int8", self.row_stream_i8)) if on]
        if streamed:
            lines.append(f"one row streams {' and '.join(streamed)} weights row by row")
        if self.amx_i8_rows:
            lines.append(f"int8 projections on AMX tiles from {self.amx_i8_rows} rows")
        for key, parts in sorted(self.attention_parts.items()):
            heads, kv_heads, d = key.split("x")
            split = f"{parts} tasks per thread" if parts else "no split"
            prefetch = self.attention_prefetch.get(key)
            fetches = f", prefetching {ATTENTION_PREFETCH_WHAT[prefetch]}" if prefetch else ""
            lines.append(f"decode attention ({heads} heads, {kv_heads} kv heads, d {d}): "
                         f"{split}{fetches}")
        for prefix, buckets in (("", BUCKETS), (INT8, INT8_ROUTE_BUCKETS),
                                (BF16, BF16_ROUTE_BUCKETS)):
            keys = sorted((k for k in self.choices if prefix_of(k) == prefix), key=shape_of)
            if keys:
                width = max(14, *(len(k) + 2 for k in keys))
                lines.append("rows".ljust(width) + "".join(f"{b:>8}" for b in buckets))
                lines += [k.ljust(width) + "".join(f"{c:>8}" for c in self.choices[k])
                          for k in keys]
        return "\n".join(lines)


def key_of(p: Routable) -> str:
    """A projection's shape key: "OUTxIN" (float32), "w8a16:OUTxIN" (int8 weights),
    "bf16:OUTxIN" (bfloat16)."""
    if isinstance(p, W8A16Projection):
        return f"{INT8}{p.qweight.shape[0]}x{p.qweight.shape[1]}"
    prefix = BF16 if p.weight.dtype == torch.bfloat16 else ""
    return f"{prefix}{p.weight.shape[0]}x{p.weight.shape[1]}"


def prefix_of(key: str) -> str:
    """The key's kind: "" (float32), INT8 or BF16."""
    head, colon, _ = key.rpartition(":")
    return head + colon


def shape_of(key: str) -> tuple[int, int]:
    """(out, in) of a shape key."""
    out, _, inp = key.rpartition(":")[2].partition("x")
    return int(out), int(inp)
