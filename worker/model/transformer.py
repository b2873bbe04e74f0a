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
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    qkv = layer.qkv(x)  # [T, q + 2kv]
    qk = qkv[:, :cfg.q_size + cfg.kv_size].view(t, heads + kv_heads, cfg.head_dim)
    v = qkv[:, cfg.q_size + cfg.kv_size:].view(t, kv_heads, cfg.head_dim)
    if layer.q_norm is not None and layer.k_norm is not None:
        qk = torch.cat([F.rms_norm(qk[:, :heads], (cfg.head_dim,), layer.q_norm, cfg.rms_norm_eps),
                        F.rms_norm(qk[:, heads:], (cfg.head_dim,), layer.k_norm, cfg.rms_norm_eps)],
                       dim=1)
    qk = apply_rope(qk, *cos_sin)  # q and k heads rotated together: [T, H + KVH, D]
    q, k = qk[:, :heads], qk[:, heads:]
    cache.store(index, k, v, meta.slot_mapping)
    o = paged_attention(q, k, v, cache, index, meta)  # [T, H, D]
    return layer.o_proj(o.reshape(t, cfg.q_size))


def compute_logits(weights: ModelWeights, hidden: torch.Tensor) -> torch.Tensor:
    """hidden: [B, hidden] of the positions to sample -> float32 logits [B, vocab]."""
    return weights.lm_head(hidden).float()
