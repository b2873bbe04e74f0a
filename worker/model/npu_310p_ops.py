"""The decoder's op set on Ascend 310P cards (Atlas 300I Duo / 300V, SoC 200-205): float16,
the KV cache in the FRACTAL_NZ layout, and the 310P's own attention kernels (vllm-ascend's
310P choices, with their signatures).

What differs from the 910B set (`worker.model.npu_ops.NpuOps`):
- dtype float16 by default; the 310P has no bfloat16 arithmetic, so bfloat16 is refused.
- KV cache: per layer, keys and values each their own tensor
  [blocks, kv_heads * head_dim / 16, block_size, 16] marked NZ with
  `npu_format_cast(t, ACL_FORMAT_FRACTAL_NZ)` (torch_npu keeps the format per tensor, so the
  layers cannot be views of one tensor); block size 128 (or 64); written by the same
  `_npu_reshape_and_cache`, which follows the cache's format.
- Prefill of a fresh prompt: `_npu_flash_attention(query, key, value, mask, seq_len,
  scale_value, num_heads, num_kv_heads, out)` on [T, heads, head_dim] rows padded to a
  multiple of 16 (the padding rows go to the end of the sequence, where the causal mask
  keeps them from every real row), with an additive float16 causal mask in NZ.
- A chunk after cached context: `_npu_paged_attention_splitfuse(query, key_cache,
  value_cache, mask, block_table, seq_len, context_lens, num_kv_heads, num_heads,
  scale_value, out)`, with the additive mask rows of the chunk's positions in NZ.
- Decode: `_npu_paged_attention` over the NZ caches (context lengths on the device).
- SwiGLU in PyTorch (`npu_swiglu` is not built for the 310P).
- int8: W8A8 with a calibrated activation scale through `npu_quantize` +
  `npu_quant_matmul` (float16 output takes the dequantization scale as int64 bits); no
  W8A16 or per-token W8A8 kernel is used there, so those checkpoints are dequantized to
  float16 on load (a warning says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from common.errors import ModelConfigError
from worker.model.attention import KVCache, PagedDecode
from worker.model.config import ModelConfig
from worker.model.npu_ops import NpuOps
from worker.model.nz_layout import ACL_FORMAT_FRACTAL_NZ, FRACTAL, nd_to_nz, round_up
from worker.quant.int8_linear import Int8Projection
from worker.quant.scheme import Scheme

BLOCK_SIZES = (128, 64)
"""Block sizes the 310P paged-attention kernels take."""


class NzKVCache(KVCache):
    """Every layer's keys and values as separate NZ tensors [blocks, kvh * d / 16, bs, 16]."""

    def __init__(self, npu: ModuleType, num_layers: int, num_blocks: int, block_size: int,
                 kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self._geometry(num_blocks, block_size, kv_heads, device)
        shape = (num_blocks, kv_heads * head_dim // FRACTAL, block_size, FRACTAL)
        self.layers = [
            (npu.npu_format_cast(torch.zeros(shape, dtype=dtype, device=device),
                                 ACL_FORMAT_FRACTAL_NZ),
             npu.npu_format_cast(torch.zeros(shape, dtype=dtype, device=device),
                                 ACL_FORMAT_FRACTAL_NZ))
            for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


@dataclass(slots=True)
class SplitFuseContext:
    """A chunk after cached context: its block table, the context length (the chunk's own
    tokens included), and its NZ mask rows, built by the first layer and read by the rest."""

    block_table: torch.Tensor
    context_len: int
    mask: torch.Tensor | None = None


class Npu310POps(NpuOps):
    name = "torch_npu-310p"
    default_dtype = torch.float16

    def __init__(self, torch_npu: ModuleType) -> None:
        super().__init__(torch_npu)
        self._flash_mask: torch.Tensor | None = None

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype is torch.bfloat16:
            raise ModelConfigError("Ascend 310P cards have no bfloat16 arithmetic: serve with "
                                   "--dtype float16 (their default)")

    def int8_projection(self, scheme: Scheme, qweight: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None, input_scale: float | None,
                        dtype: torch.dtype) -> Int8Projection | None:
        """W8A8 with a static activation scale through npu_quant_matmul; None otherwise (the
        loader dequantizes)."""
        from worker.quant.npu_int8 import NpuW8A8Projection

        if scheme is Scheme.W8A8 and input_scale is not None and scale.shape[-1] == 1:
            return NpuW8A8Projection(self.npu, qweight, scale, bias, input_scale, dtype)
        return None

    def kv_cache_shape(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        if block_size not in BLOCK_SIZES:
            raise ModelConfigError(f"the 310P attention kernels take KV blocks of "
                                   f"{' or '.join(map(str, BLOCK_SIZES))} tokens, not "
                                   f"{block_size}")
        if kv_heads * head_dim % FRACTAL:
            raise ModelConfigError(f"the 310P's NZ KV cache needs kv_heads * head_dim "
                                   f"({kv_heads} * {head_dim}) to be a multiple of {FRACTAL}")
        return (num_layers, 2, num_blocks, kv_heads * head_dim // FRACTAL, block_size, FRACTAL)

    def allocate_kv_cache(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                          dtype: torch.dtype, device: torch.device) -> KVCache:
        self.kv_cache_shape(cfg.num_hidden_layers, num_blocks, block_size,
                            cfg.num_key_value_heads, cfg.head_dim)  # refuses what cannot run
        return NzKVCache(self.npu, cfg.num_hidden_layers, num_blocks, block_size,
                         cfg.num_key_value_heads, cfg.head_dim, dtype, device)

    def layer_cache(self, cache: KVCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(cache, NzKVCache)
        return cache.layers[layer]

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    def decode_metadata(self, tables: torch.Tensor, lens: torch.Tensor, cache: KVCache
                        ) -> PagedDecode:
        return PagedDecode(tables.to(torch.int32).to(cache.device),
                           lens.to(torch.int32).to(cache.device))

    def prefill_context(self, block_table: list[int], context_len: int, cache: KVCache) -> Any:
        return SplitFuseContext(torch.tensor([block_table], dtype=torch.int32), context_len)

    def chunk_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cache: KVCache, layer: int, context: Any) -> torch.Tensor:
        if context is None:
            return self._flash_attention(q, k, v, cache.kv_heads)
        chunk, heads, d = q.shape
        if context.mask is None:
            context.mask = self._splitfuse_mask(chunk, context.context_len, q.dtype, q.device)
        key_cache, value_cache = self.layer_cache(cache, layer)
        out = torch.empty_like(q)
        self.npu._npu_paged_attention_splitfuse(
            query=q.contiguous(), key_cache=key_cache, value_cache=value_cache,
            mask=context.mask, block_table=context.block_table.to(q.device),
            seq_len=torch.tensor([chunk], dtype=torch.int32),
            context_lens=torch.tensor([context.context_len], dtype=torch.int32),
            num_kv_heads=cache.kv_heads, num_heads=heads, scale_value=d ** -0.5, out=out)
        return out

    def _flash_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         kv_heads: int) -> torch.Tensor:
        """A whole prompt: rows padded to 16 at the end, where causality hides them."""
        chunk, heads, d = q.shape
        padded = round_up(chunk)

        def pad(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, padded - chunk)).contiguous()

        qp = pad(q)
        out = torch.empty_like(qp)
        self.npu._npu_flash_attention(
            query=qp, key=pad(k), value=pad(v), mask=self._causal_nz_mask(padded, q),
            seq_len=torch.tensor([padded], dtype=torch.int32), scale_value=d ** -0.5,
            num_heads=heads, num_kv_heads=kv_heads, out=out)
        return out[:chunk]

    def _causal_nz_mask(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """The additive causal mask [1, M / 16, M, 16] (NZ) with M >= rows, kept and grown
        in powers of two from 128."""
        mask = self._flash_mask
        if mask is None or mask.shape[2] < rows or mask.dtype != like.dtype:
            size = max(128, 1 << (rows - 1).bit_length())
            nd = additive_causal_mask(torch.arange(size), size, like.dtype)
            mask = self.npu.npu_format_cast(nd_to_nz(nd).unsqueeze(0).to(like.device),
                                            ACL_FORMAT_FRACTAL_NZ)
            self._flash_mask = mask
        return mask

    def _splitfuse_mask(self, chunk: int, context_len: int, dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
        """The additive mask rows of the chunk's positions over the context, in NZ:
        [1, round_up(context) / 16, round_up(chunk), 16]."""
        nd = additive_causal_mask(torch.arange(context_len - chunk, context_len), context_len,
                                  dtype)
        mask: torch.Tensor = self.npu.npu_format_cast(nd_to_nz(nd).unsqueeze(0).to(device),
                                                      ACL_FORMAT_FRACTAL_NZ)
        return mask


def additive_causal_mask(positions: torch.Tensor, width: int, dtype: torch.dtype
                         ) -> torch.Tensor:
    """[len(positions), width]: 0 where a column is at or before the row's position, -inf
    after it."""
    future = torch.arange(width)[None, :] > positions[:, None]
    return torch.zeros(future.shape, dtype=dtype).masked_fill_(future, float("-inf"))
