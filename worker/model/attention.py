"""Paged KV cache and the attention that reads it, driven by explicit per-step metadata.

The cache is one preallocated tensor per layer of `num_blocks * block_size` token slots. A
request owns a list of blocks (its block table); token t of a request lives in slot
`block_table[t // block_size] * block_size + t % block_size`. Tokens of a step are laid out
decodes first (one token each, attended as one batch), then prefill chunks (each attended on
its own, causally, after the tokens already cached).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


class KVCache:
    """Keys and values of every layer in one preallocated tensor, in the op set's layout.

    The default layout (`head_major_shape`) is [layers, 2, kv_heads, slots, head_dim], so that
    gathering a batch's context gives [KVH, n, ctx, D] directly: attention then batches over
    (kv head, sequence) with no further copy of the keys or values. An op set with another
    layout passes its own `shape` and is the only code that reads or writes `data`; one whose
    kernels want a tensor per layer subclasses it (worker.model.npu_310p_ops.NzKVCache).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, *,
                 shape: tuple[int, ...] | None = None) -> None:
        self._geometry(num_blocks, block_size, kv_heads, device)
        if shape is None:
            shape = head_major_shape(num_layers, num_blocks, block_size, kv_heads, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)

    def _geometry(self, num_blocks: int, block_size: int, kv_heads: int,
                  device: torch.device) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_heads = kv_heads
        self.num_slots = num_blocks * block_size
        self.device = device

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def head_major_shape(num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                     head_dim: int) -> tuple[int, ...]:
    """[layers, 2 (keys, values), kv_heads, slots, head_dim]: the PyTorch and CPU-kernel layout."""
    return (num_layers, 2, kv_heads, num_blocks * block_size, head_dim)


@dataclass(slots=True)
class PrefillSegment:
    start: int
    """Index of the chunk's first token in the step's token layout."""
    end: int
    context: Any
    """How the chunk finds the tokens cached before it, in the form the model's op set asked
    for (`prefill_context`: slots to gather, or a block table to read in place); None when
    the chunk is the whole sequence so far (then the fresh keys are used directly)."""


@dataclass(slots=True)
class GatheredDecode:
    """The decodes' context as rows to gather, for the PyTorch decode attention."""

    rows: torch.Tensor
    """[2 * kv_heads * n * max_ctx] rows of a layer's [2 * kv_heads * slots, D] cache view
    holding each decode's keys then values, head-major, padded with row 0."""
    ctx: int
    """max_ctx: the padded context length of the decodes."""
    bias: torch.Tensor
    """[kv_heads * n, 1, max_ctx] 0 for real context positions, -inf for padding."""


@dataclass(slots=True)
class PagedDecode:
    """The decodes' block tables, for kernels that read the paged cache in place."""

    block_tables: torch.Tensor
    """[n, max_blocks] int32, padded with block 0."""
    context_lens: torch.Tensor
    """[n] int32: tokens cached for each decode, its new one included."""


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """[T] cache slot of every token of the step."""
    num_decodes: int
    """The first num_decodes tokens each belong to a different decoding request."""
    decode: GatheredDecode | PagedDecode | None
    """How the decodes find their context: the form the model's DecoderOps asked for."""
    prefills: list[PrefillSegment]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                    layer: int, meta: AttentionMetadata, ops: AttentionOps) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] for the step's tokens (already stored) -> [T, H, D].

    The decodes are attended as one batch, prefill chunks one by one, by the model's ops."""
    n = meta.num_decodes
    decoded = None
    if n:
        assert meta.decode is not None
        decoded = ops.decode_attention(q[:n], cache, layer, meta.decode)
        if not meta.prefills:
            return decoded
    out = torch.empty_like(q)
    if decoded is not None:
        out[:n] = decoded
    for seg in meta.prefills:
        s = slice(seg.start, seg.end)
        out[s] = ops.chunk_attention(q[s], k[s], v[s], cache, layer, seg.context)
    return out


class AttentionOps(Protocol):
    def decode_attention(self, q: torch.Tensor, cache: KVCache, layer: int,
                         decode: Any) -> torch.Tensor:
        """q [n, H, D], one query per decoding sequence -> [n, H, D]."""
        ...

    def chunk_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cache: KVCache, layer: int, context: Any) -> torch.Tensor:
        """q [chunk, H, D] and the chunk's own k, v [chunk, KVH, D] (already stored), after
        the cached context `context` describes -> [chunk, H, D], causal."""
        ...


def gathered_decode(tables: torch.Tensor, lens: torch.Tensor, kv_heads: int, num_slots: int,
                    block_size: int, dtype: torch.dtype, device: torch.device) -> GatheredDecode:
    """tables [n, max_blocks], lens [n] (CPU int64) -> the rows and mask to gather them."""
    ctx = int(lens.max())
    pos = torch.arange(ctx)
    slots = tables[:, pos // block_size] * block_size + pos % block_size  # [n, ctx]
    heads = torch.arange(2 * kv_heads)[:, None, None]  # keys' heads, then values'
    rows = (heads * num_slots + slots[None]).reshape(-1).to(device)
    pad = pos[None, :] >= lens[:, None]  # [n, ctx]
    bias = torch.zeros(pad.shape, dtype=dtype).masked_fill_(pad, -torch.inf)
    return GatheredDecode(rows, ctx, bias.repeat(kv_heads, 1)[:, None, :].to(device))


def paged_decode(tables: torch.Tensor, lens: torch.Tensor) -> PagedDecode:
    """tables [n, max_blocks], lens [n] (CPU int64) -> what the CPU kernels read."""
    return PagedDecode(tables.to(torch.int32).contiguous(), lens.to(torch.int32).contiguous())


def gathered_decode_attention(q: torch.Tensor, cache: KVCache, layer: int,
                              decode: GatheredDecode) -> torch.Tensor:
    """One query per sequence: two batched matmuls, which beat a flash kernel at q_len 1 on CPU.

    q: [n, H, D] -> [n, H, D]. One gather is the only copy of the context.
    """
    n, heads, dim = q.shape
    kv_cache = cache.data[layer]  # [2, KVH, slots, D]
    kv_heads = kv_cache.shape[1]
    group = heads // kv_heads
    ctx = decode.ctx
    kv = kv_cache.view(-1, dim).index_select(0, decode.rows).view(2, kv_heads * n, ctx, dim)
    qg = q.view(n, kv_heads, group, dim).transpose(0, 1).reshape(kv_heads * n, group, dim)
    scores = torch.baddbmm(decode.bias, qg, kv[0].transpose(1, 2), alpha=dim**-0.5)
    out = torch.bmm(scores.softmax(dim=-1), kv[1])  # [KVH*n, G, D]
    return out.view(kv_heads, n, group, dim).transpose(0, 1).reshape(n, heads, dim)
