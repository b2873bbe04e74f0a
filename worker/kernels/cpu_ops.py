"""DecoderOps on the compiled CPU kernels: float32 activations on the CPU, one C call per step
of a layer.

Per layer a decode step makes one call for the q/k norm, rotary embedding and cache write,
one for attention over the paged cache in place (no gathered copy of the context), and one
per fused residual-add + RMSNorm and SiLU * up, where PyTorch's ops take about thirty.

They run float32 models, and bfloat16 models with their weights and KV cache in bfloat16 and
their activations in float32, as the one-call decode step carries them, on every CPU: without
native bfloat16, PyTorch's bfloat16 operators widen and round around every step; with it,
their per-operator cost still weighed on every step that prefills: on a Zen 4 with
AVX512-BF16, SmolLM2's `bench engine --quick` ran 247.7-265.8 tok/s on this op set against
202.3-214.0 on PyTorch's operators (the projections on the kernel and oneDNN's bfloat16 GEMM
either way).
"""

from __future__ import annotations

from typing import Any

import torch

from worker.kernels.cpu import MAX_HEAD_DIM, CpuKernels
from worker.model.attention import KVCache, PagedDecode, paged_decode
from worker.model.config import ModelConfig
from worker.model.ops import DecoderOps
from worker.model.rope import RotaryEmbedding
from worker.model.weights import LayerWeights

PREFILL_BLOCK = 128
"""Queries per block of prefill attention: smaller skips more masked scores, larger makes
fewer, bigger GEMMs."""


def supports(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernels cannot run this model here, or None when they can."""
    if device.type != "cpu" or dtype != torch.float32:
        return f"they are for float32 (or bfloat16) on the CPU, not {dtype} on {device}"
    return heads_fit(cfg)


def heads_fit(cfg: ModelConfig) -> str | None:
    """Why the kernels' attention cannot take this model's heads, or None when it can."""
    if cfg.head_dim % 8 or cfg.head_dim > MAX_HEAD_DIM:
        return f"head_dim {cfg.head_dim} is not a multiple of 8 up to {MAX_HEAD_DIM}"
    return None


class KernelOps(DecoderOps):
    name = "cpu-kernels"
    activation_dtype = torch.float32

    def __init__(self, kernels: CpuKernels) -> None:
        self.k = kernels

    def rope_tables(self, rope: RotaryEmbedding, positions: torch.Tensor) -> Any:
        return rope.cos, rope.sin, positions

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.k.rms_norm(x, weight, eps)

    def add_rms_norm(self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        return self.k.add_rms_norm(residual, delta.contiguous(), weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.k.silu_mul(gate_up)

    def qk_rope_store(self, cfg: ModelConfig, layer: LayerWeights, qkv: torch.Tensor,
                      tables: Any, cache: KVCache, index: int, slot_mapping: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin, positions = tables
        t = qkv.shape[0]
        heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = torch.empty(t, heads, d)
        k = torch.empty(t, kv_heads, d)
        q_norm, k_norm = layer.q_norm, layer.k_norm
        self.k.cpuk_qk_rope_store(
            qkv.data_ptr(), t, heads, kv_heads, d, positions.data_ptr(), cos.data_ptr(),
            sin.data_ptr(), q_norm.data_ptr() if q_norm is not None else None,
            k_norm.data_ptr() if k_norm is not None else None, cfg.rms_norm_eps, q.data_ptr(),
            k.data_ptr(), cache.data[index].data_ptr(), cache.data.dtype == torch.bfloat16,
            cache.num_slots, slot_mapping.data_ptr())
        return q, k

    def decode_metadata(self, tables: torch.Tensor, lens: torch.Tensor, cache: KVCache
                        ) -> PagedDecode:
        return paged_decode(tables, lens)

    def decode_attention(self, q: torch.Tensor, cache: KVCache, layer: int,
                         decode: Any) -> torch.Tensor:
        return self.k.decode_attention(q.contiguous(), cache.data[layer], cache.block_size,
                                       decode.block_tables, decode.context_lens)

    def chunk_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cache: KVCache, layer: int, context: Any) -> torch.Tensor:
        """As DecoderOps', a chunk that is the whole context attending to its keys and values
        as the cache holds them (rounded to a bfloat16 cache), as the chunks after it and the
        decodes read them: a prompt gets the same result whether its prefix was cached or
        not."""
        if context is None and k.dtype != cache.data.dtype:
            k, v = k.to(cache.data.dtype), v.to(cache.data.dtype)
        return super().chunk_attention(q, k, v, cache, layer, context)

    def prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                          ) -> torch.Tensor:
        """The fused kernel (csrc/prefill_attention.c: each query reads only the keys it can
        see, the scores never leave registers) where it takes the head_dim; elsewhere two
        batched GEMMs around the causal softmax kernel, the GQA group's query heads stacked
        as rows, so keys and values are never repeated per head (PyTorch's CPU SDPA takes its
        unfused path for GQA and masks, at about half this speed), queries in blocks, each
        against only the context it can see. Keys and values gathered from a bfloat16 cache
        are widened first."""
        fused = self.k.prefill_attention(q, k, v)
        if fused is not None:
            return fused
        k, v = k.float(), v.float()
        chunk, ctx = q.shape[0], k.shape[1]
        if chunk <= PREFILL_BLOCK:
            return self._attend_block(q, k, v)
        out = torch.empty_like(q)
        for start in range(0, chunk, PREFILL_BLOCK):
            end = min(start + PREFILL_BLOCK, chunk)
            visible = ctx - chunk + end
            out[start:end] = self._attend_block(q[start:end], k[:, :visible], v[:, :visible])
        return out

    def _attend_block(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        chunk, heads, d = q.shape
        kv_heads, ctx = k.shape[0], k.shape[1]
        rows = heads // kv_heads * chunk
        qg = q.transpose(0, 1).reshape(kv_heads, rows, d)  # [KVH, G * chunk, D]
        scores = torch.bmm(qg, k.transpose(1, 2))  # [KVH, G * chunk, ctx]
        self.k.cpuk_causal_softmax(scores.data_ptr(), kv_heads * rows, ctx, chunk, d**-0.5)
        out = torch.bmm(scores, v)  # [KVH, G * chunk, D]
        return out.view(heads, chunk, d).transpose(0, 1)
