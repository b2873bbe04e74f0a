"""The decoder's op set on Ascend NPUs: torch_npu's fused inference operators over the paged
KV layout their attention kernels read (vllm-ascend's choices, with their signatures).

- KV cache per layer: keys and values each [blocks, 128, kv_heads, head_dim] (the 910B
  kernels take block size 128 only); written by `_npu_reshape_and_cache` at slot indices.
- Norms: `npu_rms_norm(x, gamma, eps) -> (y, rstd)`; the residual add fused with the next
  norm: `npu_add_rms_norm(x1, x2, gamma, eps) -> (y, rstd, x1 + x2)` (not in place).
- SwiGLU: `npu_swiglu(x, dim=-1)` over [gate, up].
- RoPE: `_npu_rotary_embedding(positions, query, key, head_size, cos_sin_cache,
  is_neox_style)`, in place on [T, heads * head_dim] rows, with a [positions, head_dim]
  cache of cos then sin halves (Llama and Qwen are neox style: rotate-half).
- Decode attention: `_npu_paged_attention(query, key_cache, value_cache, num_kv_heads,
  num_heads, scale_value, block_table, context_lens, out)`.
- Prefill chunks: `npu_fused_infer_attention_score`, input_layout "TND", sparse_mode 3
  (causal, aligned to the end of the context) with its compressed 2048 x 2048 mask, over
  the chunk's own keys and values (a fresh prompt) or the paged cache through the chunk's
  block table (a chunk after cached context).

The op set is given the torch_npu module to call, so tests drive it with a simulation of
that module (same signatures and return conventions, reference arithmetic) on the CPU;
on a device it is `import torch_npu`. 310P cards have their own set
(`worker.model.npu_310p_ops`): float16, the NZ cache layout and their own attention kernels.
The dtype follows the SoC unless --dtype says otherwise: bfloat16 here.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from common.errors import ModelConfigError
from worker.model.attention import KVCache, PagedDecode
from worker.model.config import ModelConfig
from worker.model.ops import DecoderOps
from worker.model.rope import RotaryEmbedding
from worker.model.weights import LayerWeights
from worker.quant.int8_linear import Int8Projection
from worker.quant.scheme import Scheme

BLOCK_SIZE = 128
"""The only block size the 910B paged-attention kernels take."""
MASK_SIZE = 2048
"""sparse_mode 3 reads a compressed causal mask of this fixed size."""


def soc_family(soc_version: int) -> str:
    """torch_npu.npu.get_soc_version() -> "910b" (A2, 220-225), "a3" (250-255) or "310p"
    (200-205); anything else is refused."""
    if 220 <= soc_version <= 225:
        return "910b"
    if 250 <= soc_version <= 255:
        return "a3"
    if 200 <= soc_version <= 205:
        return "310p"
    raise ModelConfigError(f"Ascend SoC version {soc_version} is not one npuserve knows "
                           "(910B/A2: 220-225, A3: 250-255, 310P: 200-205)")


def npu_ops_for(torch_npu: ModuleType) -> NpuOps:
    """The op set for the SoC torch_npu reports."""
    if soc_family(int(torch_npu.npu.get_soc_version())) == "310p":
        from worker.model.npu_310p_ops import Npu310POps

        return Npu310POps(torch_npu)
    return NpuOps(torch_npu)


class NpuOps(DecoderOps):
    name = "torch_npu"
    default_block_size = BLOCK_SIZE
    default_dtype = torch.bfloat16

    def __init__(self, torch_npu: ModuleType) -> None:
        self.npu = torch_npu
        self._cos_sin: dict[int, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None

    def int8_projection(self, scheme: Scheme, qweight: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None, input_scale: float | None,
                        dtype: torch.dtype) -> Int8Projection | None:
        """w8a16 through npu_weight_quant_batchmatmul, w8a8 through npu_quant_matmul."""
        from worker.quant.npu_int8 import NpuW8A8Projection, NpuW8A16Projection

        if scheme is Scheme.W8A8:
            return NpuW8A8Projection(self.npu, qweight, scale, bias, input_scale, dtype)
        return NpuW8A16Projection(self.npu, qweight, scale, bias, dtype)

    def kv_cache_shape(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        if block_size != BLOCK_SIZE:
            raise ModelConfigError(f"the NPU attention kernels take KV blocks of {BLOCK_SIZE} "
                                   f"tokens, not {block_size}; leave --block-size unset")
        return (num_layers, 2, num_blocks, block_size, kv_heads, head_dim)

    def store_kv(self, cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
        key_cache, value_cache = self.layer_cache(cache, layer)
        self.npu._npu_reshape_and_cache(key=k, value=v, key_cache=key_cache,
                                        value_cache=value_cache,
                                        slot_indices=slots.to(torch.int32))

    def layer_cache(self, cache: KVCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key cache and value cache, as the kernels take them."""
        return cache.data[layer, 0], cache.data[layer, 1]

    def rope_tables(self, rope: RotaryEmbedding, positions: torch.Tensor) -> Any:
        cache = self._cos_sin.get(id(rope))
        if cache is None:
            half = rope.cos.shape[-1] // 2
            cache = torch.cat([rope.cos[:, :half], rope.sin[:, :half]], dim=-1).contiguous()
            self._cos_sin[id(rope)] = cache
        return positions, cache

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, _ = self.npu.npu_rms_norm(x, weight, eps)
        return y  # type: ignore[no-any-return]

    def add_rms_norm(self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        y, _, summed = self.npu.npu_add_rms_norm(residual, delta, weight, eps)
        residual.copy_(summed)
        return y  # type: ignore[no-any-return]

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.npu.npu_swiglu(gate_up, dim=-1)  # type: ignore[no-any-return]

    def qk_rope_store(self, cfg: ModelConfig, layer: LayerWeights, qkv: torch.Tensor,
                      tables: Any, cache: KVCache, index: int, slot_mapping: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        t, d = qkv.shape[0], cfg.head_dim
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        q = qkv[:, :cfg.q_size].reshape(t, heads, d)
        k = qkv[:, cfg.q_size:cfg.q_size + cfg.kv_size].reshape(t, kv_heads, d)
        v = qkv[:, cfg.q_size + cfg.kv_size:].reshape(t, kv_heads, d)
        if layer.q_norm is not None and layer.k_norm is not None:
            q = self.rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = self.rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        positions, cos_sin = tables
        q2, k2 = q.reshape(t, heads * d).contiguous(), k.reshape(t, kv_heads * d).contiguous()
        self.npu._npu_rotary_embedding(positions, q2, k2, d, cos_sin, True)
        q, k = q2.view(t, heads, d), k2.view(t, kv_heads, d)
        self.store_kv(cache, index, k, v.contiguous(), slot_mapping)
        return q, k

    def decode_metadata(self, tables: torch.Tensor, lens: torch.Tensor, cache: KVCache
                        ) -> PagedDecode:
        return PagedDecode(tables.to(torch.int32).to(cache.device), lens.to(torch.int32))

    def decode_attention(self, q: torch.Tensor, cache: KVCache, layer: int,
                         decode: Any) -> torch.Tensor:
        n, heads, d = q.shape
        out = torch.empty_like(q)
        key_cache, value_cache = self.layer_cache(cache, layer)
        self.npu._npu_paged_attention(
            query=q.contiguous(), key_cache=key_cache,
            value_cache=value_cache, num_kv_heads=cache.kv_heads, num_heads=heads,
            scale_value=d ** -0.5, block_table=decode.block_tables,
            context_lens=decode.context_lens, out=out)
        return out

    def prefill_context(self, block_table: list[int], context_len: int, cache: KVCache) -> Any:
        """The chunk's block table and context length: the kernel reads the cache in place."""
        return torch.tensor([block_table], dtype=torch.int32), context_len

    def chunk_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cache: KVCache, layer: int, context: Any) -> torch.Tensor:
        """One chunk through the fused kernel over the paged cache (its keys are stored)."""
        chunk, heads, d = q.shape
        if context is None:  # the chunk is the whole sequence: its own keys and values
            out, _ = self.npu.npu_fused_infer_attention_score(
                q.contiguous(), k.contiguous(), v.contiguous(),
                atten_mask=self._causal_mask(q.device), input_layout="TND",
                actual_seq_lengths=[chunk], actual_seq_lengths_kv=[chunk],
                num_key_value_heads=cache.kv_heads, num_heads=heads, scale=d ** -0.5,
                sparse_mode=3)
            return out  # type: ignore[no-any-return]
        table, context_len = context
        key_cache, value_cache = self.layer_cache(cache, layer)
        blocks, bs = key_cache.shape[:2]
        out, _ = self.npu.npu_fused_infer_attention_score(
            q.contiguous(), key_cache.view(blocks, bs, -1),
            value_cache.view(blocks, bs, -1), atten_mask=self._causal_mask(q.device),
            block_table=table.to(q.device), input_layout="TND", block_size=bs,
            actual_seq_lengths=[chunk], actual_seq_lengths_kv=[context_len],
            num_key_value_heads=cache.kv_heads, num_heads=heads, scale=d ** -0.5,
            sparse_mode=3)
        return out  # type: ignore[no-any-return]

    def _causal_mask(self, device: torch.device) -> torch.Tensor:
        if self._mask is None:
            self._mask = torch.triu(torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool),
                                    diagonal=1).to(device)
        return self._mask
