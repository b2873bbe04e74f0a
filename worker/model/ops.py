"""The steps of a decoder layer around its projections, as one swappable set.

`DecoderOps` implements them with PyTorch operators, on any device and dtype.
`worker.kernels.cpu_ops.KernelOps` replaces them on a CPU in float32 with fused C kernels
(a decode step there is hundreds of tiny operators, and their dispatch costs more than the
arithmetic). Projections are not part of the set: they pick their kernel by the number of
rows (`worker.model.linear`).

The set also owns the KV cache: its layout (`kv_cache_shape`, as vllm-ascend's attention
backends' `get_kv_cache_shape`), its default block size, the write of each step's keys and
values, and how attention finds a request's cached context, so a device whose kernels want
another layout brings its own set and nothing else changes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from worker.model.attention import (
    GatheredDecode,
    KVCache,
    PagedDecode,
    gathered_decode,
    gathered_decode_attention,
    head_major_shape,
)
from worker.model.config import ModelConfig
from worker.model.rope import RotaryEmbedding, apply_rope
from worker.model.weights import LayerWeights

if TYPE_CHECKING:
    from worker.quant.int8_linear import Int8Projection
    from worker.quant.scheme import Scheme


class DecoderOps:
    name = "torch"
    default_block_size = 16
    """Tokens per KV block when the settings leave it open."""
    default_dtype = torch.float32
    """Compute and weight dtype when the settings leave it open."""
    activation_dtype: torch.dtype | None = None
    """The dtype of the residual stream and every activation between projections, and of the
    norms' weights and rotary tables that meet them; None: the model's."""

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Refuse, with what to set instead, a dtype the device cannot compute in."""

    def int8_projection(self, scheme: Scheme, qweight: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None, input_scale: float | None,
                        dtype: torch.dtype) -> Int8Projection | None:
        """The device's own int8 projection for these tensors, or None: then the loader's
        (the CPU kernels', PyTorch's int8 matmuls, or dequantized weights)."""
        return None

    def kv_cache_shape(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        """Shape of the tensor holding every layer's keys and values."""
        return head_major_shape(num_layers, num_blocks, block_size, kv_heads, head_dim)

    def kv_cache_bytes_per_block(self, cfg: ModelConfig, block_size: int,
                                 dtype: torch.dtype) -> int:
        """Bytes one KV block takes across all layers, to size the cache."""
        shape = self.kv_cache_shape(cfg.num_hidden_layers, 1, block_size,
                                    cfg.num_key_value_heads, cfg.head_dim)
        return math.prod(shape) * dtype.itemsize

    def allocate_kv_cache(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                          dtype: torch.dtype, device: torch.device) -> KVCache:
        layers, kv_heads, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        return KVCache(layers, num_blocks, block_size, kv_heads, d, dtype, device,
                       shape=self.kv_cache_shape(layers, num_blocks, block_size, kv_heads, d))

    def store_kv(self, cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
        """k, v [T, KVH, D] written at cache slots [T]."""
        cache.data[layer, 0].index_copy_(1, slots, k.transpose(0, 1))
        cache.data[layer, 1].index_copy_(1, slots, v.transpose(0, 1))

    def rope_tables(self, rope: RotaryEmbedding, positions: torch.Tensor) -> Any:
        """Whatever qk_rope_store needs for the step's positions [T], computed once a step."""
        return rope.tables(positions)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def add_rms_norm(self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """residual += delta, in place; returns rms_norm(residual)."""
        residual.add_(delta)
        return self.rms_norm(residual, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] (gate columns, then up) -> silu(gate) * up [T, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def qk_rope_store(self, cfg: ModelConfig, layer: LayerWeights, qkv: torch.Tensor,
                      tables: Any, cache: KVCache, index: int, slot_mapping: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """qkv [T, q + 2kv] -> rotated q [T, H, D] and k [T, KVH, D]; k and v are stored."""
        t = qkv.shape[0]
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        qk = qkv[:, :cfg.q_size + cfg.kv_size].view(t, heads + kv_heads, cfg.head_dim)
        v = qkv[:, cfg.q_size + cfg.kv_size:].view(t, kv_heads, cfg.head_dim)
        if layer.q_norm is not None and layer.k_norm is not None:
            qk = torch.cat([self.rms_norm(qk[:, :heads], layer.q_norm, cfg.rms_norm_eps),
                            self.rms_norm(qk[:, heads:], layer.k_norm, cfg.rms_norm_eps)], dim=1)
        qk = apply_rope(qk, *tables)  # q and k heads rotated together: [T, H + KVH, D]
        q, k = qk[:, :heads], qk[:, heads:]
        self.store_kv(cache, index, k, v, slot_mapping)
        return q, k

    def decode_metadata(self, tables: torch.Tensor, lens: torch.Tensor, cache: KVCache
                        ) -> GatheredDecode | PagedDecode:
        """tables [n, max_blocks], lens [n] (CPU int64) -> what decode_attention reads."""
        return gathered_decode(tables, lens, cache.kv_heads, cache.num_slots, cache.block_size,
                               cache.data.dtype, cache.data.device)

    def decode_attention(self, q: torch.Tensor, cache: KVCache, layer: int,
                         decode: Any) -> torch.Tensor:
        """q [n, H, D], one query per decoding sequence -> [n, H, D]."""
        return gathered_decode_attention(q, cache, layer, decode)

    def prefill_context(self, block_table: list[int], context_len: int, cache: KVCache) -> Any:
        """What chunk_attention reads to find a request's first `context_len` cached tokens
        (the chunk's own included): here the slots to gather [ctx]."""
        bs = cache.block_size
        pos = torch.arange(context_len)
        table = torch.tensor(block_table)
        return (table[pos // bs] * bs + pos % bs).to(cache.data.device)

    def chunk_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cache: KVCache, layer: int, context: Any) -> torch.Tensor:
        """q [chunk, H, D] and the chunk's own k, v [chunk, KVH, D] (already stored), the
        last positions of a context described by `context` (None: the chunk is the whole
        context) -> [chunk, H, D], causal. Here the context is gathered from the cache and
        handed to prefill_attention; an op set with a paged prefill kernel reads it in place."""
        if context is None:
            return self.prefill_attention(q, k.transpose(0, 1), v.transpose(0, 1))
        keys = cache.data[layer, 0].index_select(1, context)  # [KVH, ctx, D]
        values = cache.data[layer, 1].index_select(1, context)
        return self.prefill_attention(q, keys, values)

    def prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                          ) -> torch.Tensor:
        """q [chunk, H, D], the last `chunk` positions of a context whose keys and values are
        k, v [KVH, ctx, D] -> [chunk, H, D], causal."""
        chunk, ctx = q.shape[0], k.shape[1]
        sq = q.transpose(0, 1)  # [H, chunk, D]
        if chunk == ctx:
            o = F.scaled_dot_product_attention(sq, k, v, is_causal=True, enable_gqa=True)
        else:
            mask = torch.arange(ctx, device=q.device) <= torch.arange(
                ctx - chunk, ctx, device=q.device)[:, None]  # [chunk, ctx]
            o = F.scaled_dot_product_attention(sq, k, v, attn_mask=mask, enable_gqa=True)
        return o.transpose(0, 1)
