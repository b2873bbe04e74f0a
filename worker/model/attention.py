"""Paged KV cache and the attention that reads it, driven by explicit per-step metadata.

The cache is one preallocated tensor per layer of `num_blocks * block_size` token slots. A
request owns a list of blocks (its block table); token t of a request lives in slot
`block_table[t // block_size] * block_size + t % block_size`. Tokens of a step are laid out
decodes first (one token each, attended as one padded batch), then prefill chunks (each
attended on its own with a causal mask offset by the tokens already cached).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of every layer: [layers, 2, kv_heads, slots, head_dim].

    Head-major, so that gathering a batch's context gives [KVH, n, ctx, D] directly: attention
    then batches over (kv head, sequence) with no further copy of the keys or values.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_slots = num_blocks * block_size
        self.data = torch.zeros(
            num_layers, 2, kv_heads, num_blocks * block_size, head_dim, dtype=dtype, device=device
        )

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * kv_heads * head_dim * dtype.itemsize

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v: [T, kv_heads, D] written at slots [T]."""
        self.data[layer, 0].index_copy_(1, slots, k.transpose(0, 1))
        self.data[layer, 1].index_copy_(1, slots, v.transpose(0, 1))


@dataclass(slots=True)
class PrefillSegment:
    start: int
    """Index of the chunk's first token in the step's token layout."""
    end: int
    context_slots: torch.Tensor | None
    """Slots of every cached token before and including this chunk [ctx]; None when the chunk
    is the whole sequence so far (then the fresh keys are used directly)."""
    mask: torch.Tensor | None
    """[chunk, ctx] True where attention is allowed; None together with context_slots."""


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """[T] cache slot of every token of the step."""
    num_decodes: int
    """The first num_decodes tokens each belong to a different decoding request."""
    decode_rows: torch.Tensor | None
    """[2 * kv_heads * num_decodes * max_ctx] rows of a layer's [2 * kv_heads * slots, D] cache
    view holding each decode's keys then values, head-major, padded with row 0."""
    decode_ctx: int
    """max_ctx: the padded context length of the decodes."""
    decode_bias: torch.Tensor | None
    """[kv_heads * num_decodes, 1, max_ctx] 0 for real context positions, -inf for padding."""
    prefills: list[PrefillSegment]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                    layer: int, meta: AttentionMetadata) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] for the step's tokens (already stored) -> [T, H, D]."""
    n = meta.num_decodes
    decoded = None
    if n:
        assert meta.decode_rows is not None and meta.decode_bias is not None
        decoded = _decode_attention(q[:n], cache.data[layer], meta.decode_rows, meta.decode_ctx,
                                    meta.decode_bias)
        if not meta.prefills:
            return decoded
    out = torch.empty_like(q)
    if decoded is not None:
        out[:n] = decoded
    keys, values = cache.data[layer, 0], cache.data[layer, 1]  # [KVH, slots, D]
    for seg in meta.prefills:
        sq = q[seg.start:seg.end].transpose(0, 1)  # [H, chunk, D]
        if seg.context_slots is None:
            sk = k[seg.start:seg.end].transpose(0, 1)  # [KVH, chunk, D]
            sv = v[seg.start:seg.end].transpose(0, 1)
            o = F.scaled_dot_product_attention(sq, sk, sv, is_causal=True, enable_gqa=True)
        else:
            sk = keys.index_select(1, seg.context_slots)  # [KVH, ctx, D]
            sv = values.index_select(1, seg.context_slots)
            o = F.scaled_dot_product_attention(sq, sk, sv, attn_mask=seg.mask, enable_gqa=True)
        out[seg.start:seg.end] = o.transpose(0, 1)
    return out


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, rows: torch.Tensor, ctx: int,
                      bias: torch.Tensor) -> torch.Tensor:
    """One query per sequence: two batched matmuls, which beat a flash kernel at q_len 1 on CPU.

    q: [n, H, D]; kv_cache: [2, KVH, slots, D]; rows: [2 * KVH * n * ctx]; bias:
    [KVH * n, 1, ctx] (0 or -inf) -> [n, H, D]. One gather is the only copy of the context.
    """
    n, heads, dim = q.shape
    kv_heads = kv_cache.shape[1]
    group = heads // kv_heads
    kv = kv_cache.view(-1, dim).index_select(0, rows).view(2, kv_heads * n, ctx, dim)
    qg = q.view(n, kv_heads, group, dim).transpose(0, 1).reshape(kv_heads * n, group, dim)
    scores = torch.baddbmm(bias, qg, kv[0].transpose(1, 2), alpha=dim**-0.5)  # [KVH*n, G, ctx]
    out = torch.bmm(scores.softmax(dim=-1), kv[1])  # [KVH*n, G, D]
    return out.view(kv_heads, n, group, dim).transpose(0, 1).reshape(n, heads, dim)
