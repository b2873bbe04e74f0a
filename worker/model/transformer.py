"""The decoder forward pass for Llama, Qwen2 and Qwen3: a function of weights and inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.model.attention import AttentionMetadata, KVCache, paged_attention
from worker.model.config import ModelConfig
from worker.model.rope import RotaryEmbedding, apply_rope
from worker.model.weights import LayerWeights, ModelWeights


def forward(
    cfg: ModelConfig,
    weights: ModelWeights,
    rope: RotaryEmbedding,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """input_ids, positions: [T] -> final hidden states [T, hidden] (after the last norm)."""
    h = F.embedding(input_ids, weights.embed)  # [T, hidden]
    cos_sin = rope.tables(positions)
    for i, layer in enumerate(weights.layers):
        x = F.rms_norm(h, (cfg.hidden_size,), layer.input_norm, cfg.rms_norm_eps)
        h = h + _attention(cfg, layer, x, cos_sin, cache, i, meta)
        x = F.rms_norm(h, (cfg.hidden_size,), layer.post_norm, cfg.rms_norm_eps)
        gate, up = layer.gate_up(x).chunk(2, dim=-1)  # [T, I] each
        h = h + layer.down(F.silu(gate) * up)
    return F.rms_norm(h, (cfg.hidden_size,), weights.norm, cfg.rms_norm_eps)


def _attention(cfg: ModelConfig, layer: LayerWeights, x: torch.Tensor,
               cos_sin: tuple[torch.Tensor, torch.Tensor], cache: KVCache, index: int,
               meta: AttentionMetadata) -> torch.Tensor:
    t = x.shape[0]
    qkv = layer.qkv(x)  # [T, q + 2kv]
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    q = q.view(t, cfg.num_attention_heads, cfg.head_dim)
    k = k.view(t, cfg.num_key_value_heads, cfg.head_dim)
    v = v.view(t, cfg.num_key_value_heads, cfg.head_dim)
    if layer.q_norm is not None and layer.k_norm is not None:
        q = F.rms_norm(q, (cfg.head_dim,), layer.q_norm, cfg.rms_norm_eps)
        k = F.rms_norm(k, (cfg.head_dim,), layer.k_norm, cfg.rms_norm_eps)
    q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
    cache.store(index, k, v, meta.slot_mapping)
    o = paged_attention(q, k, v, cache, index, meta)  # [T, H, D]
    return layer.o_proj(o.reshape(t, cfg.q_size))


def compute_logits(weights: ModelWeights, hidden: torch.Tensor) -> torch.Tensor:
    """hidden: [B, hidden] of the positions to sample -> float32 logits [B, vocab]."""
    return weights.lm_head(hidden).float()
