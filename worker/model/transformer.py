"""The decoder forward pass for Llama, Qwen2 and Qwen3: a function of weights and inputs."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from worker.model.attention import AttentionMetadata, KVCache, paged_attention
from worker.model.config import ModelConfig
from worker.model.ops import DecoderOps
from worker.model.rope import RotaryEmbedding
from worker.model.weights import ModelWeights


def forward(
    cfg: ModelConfig,
    weights: ModelWeights,
    rope: RotaryEmbedding,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache,
    meta: AttentionMetadata,
    ops: DecoderOps,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """input_ids, positions: [T] -> final hidden states [T, hidden] (after the last norm).

    The residual stream `h` is updated in place; each residual add is fused with the norm
    that follows it. Under tensor parallelism `cfg` and `weights` are one rank's shard and
    `all_reduce` sums, in place, the partial outputs of the row-parallel o_proj and down.
    """
    eps = cfg.rms_norm_eps
    h = embed(weights, input_ids, all_reduce)  # [T, hidden], a fresh tensor
    if ops.activation_dtype is not None:
        h = h.to(ops.activation_dtype)
    tables = ops.rope_tables(rope, positions)
    layers = weights.layers
    x = ops.rms_norm(h, layers[0].input_norm, eps)
    for i, layer in enumerate(layers):
        qkv = layer.qkv(x)  # [T, q + 2kv]
        q, k = ops.qk_rope_store(cfg, layer, qkv, tables, cache, i, meta.slot_mapping)
        v = qkv[:, cfg.q_size + cfg.kv_size:].view(-1, cfg.num_key_value_heads, cfg.head_dim)
        o = paged_attention(q, k, v, cache, i, meta, ops)  # [T, H, D]
        attn = layer.o_proj(o.reshape(-1, cfg.q_size))
        if all_reduce is not None:
            all_reduce(attn)
        x = ops.add_rms_norm(h, attn, layer.post_norm, eps)
        mlp = layer.down(ops.silu_mul(layer.gate_up(x)))
        if all_reduce is not None:
            all_reduce(mlp)
        next_norm = layers[i + 1].input_norm if i + 1 < len(layers) else weights.norm
        x = ops.add_rms_norm(h, mlp, next_norm, eps)
    return x


def embed(weights: ModelWeights, ids: torch.Tensor,
          all_reduce: Callable[[torch.Tensor], None] | None) -> torch.Tensor:
    """ids [T] -> [T, hidden]. A rank holding some vocabulary rows looks up its own ids and
    gives zeros for the rest; the ranks' rows sum to the lookup."""
    rows = weights.vocab_rows
    if rows is None or all_reduce is None:
        return F.embedding(ids, weights.embed)
    local = ids - rows.start
    mine = (local >= 0) & (local < rows.stop - rows.start)
    h = F.embedding(local.clamp(0, rows.stop - rows.start - 1), weights.embed)
    h.mul_(mine.unsqueeze(1).to(h.dtype))
    all_reduce(h)
    return h


def compute_logits(weights: ModelWeights, hidden: torch.Tensor) -> torch.Tensor:
    """hidden: [B, hidden] of the positions to sample -> float32 logits [B, vocab]."""
    return weights.lm_head(hidden).float()
