"""A SIMULATION of the torch_npu operators npuserve's NPU op set calls, on the CPU.

Same names, argument names and return conventions as torch_npu 2.x (tuples where torch_npu
returns tuples, `out=` filled in place, in-place rotary embedding, int32 slot indices,
block tables and context lengths, the 910B paged cache [blocks, 128, kv_heads, head_dim]),
computed with plain reference arithmetic in float32. It checks what the real kernels would
reject (dtypes, shapes, layouts) so a call that passes here is at least well formed; it says
nothing about the kernels' own numerics or speed. No Ascend hardware or CANN is involved.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch


class SocVersion:
    value = 223  # an Atlas 800I A2 (910B4)


npu = SimpleNamespace(get_soc_version=lambda: SocVersion.value)
calls: list[str] = []


def _rms(x: torch.Tensor, gamma: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def npu_rms_norm(x: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    calls.append("npu_rms_norm")
    assert gamma.shape == x.shape[-1:], (gamma.shape, x.shape)
    return _rms(x, gamma, epsilon)


def npu_add_rms_norm(x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor,
                     epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    calls.append("npu_add_rms_norm")
    assert x1.shape == x2.shape and x1.dtype == x2.dtype
    x = x1 + x2  # a new tensor: the operator does not add in place
    y, rstd = _rms(x, gamma, epsilon)
    return y, rstd, x


def npu_swiglu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    calls.append("npu_swiglu")
    a, b = x.chunk(2, dim=dim)
    return (torch.nn.functional.silu(a.float()) * b.float()).to(x.dtype)


def _npu_rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                          head_size: int, cos_sin_cache: torch.Tensor,
                          is_neox_style: bool) -> None:
    calls.append("_npu_rotary_embedding")
    assert query.dim() == 2 and key.dim() == 2, "query/key are [T, heads * head_size]"
    assert query.is_contiguous() and key.is_contiguous()
    assert cos_sin_cache.shape[-1] == head_size and is_neox_style
    half = head_size // 2
    cos = cos_sin_cache[positions, :half].float().unsqueeze(1)
    sin = cos_sin_cache[positions, half:].float().unsqueeze(1)
    for x in (query, key):
        v = x.view(x.shape[0], -1, head_size).float()
        a, b = v[..., :half], v[..., half:]
        rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
        x.copy_(rotated.reshape(x.shape).to(x.dtype))


def _check_cache(cache: torch.Tensor) -> None:
    assert cache.dim() == 4 and cache.shape[1] == 128, (
        f"910B paged caches are [blocks, 128, kv_heads, head_dim], got {list(cache.shape)}")


def _npu_reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, slot_indices: torch.Tensor) -> None:
    calls.append("_npu_reshape_and_cache")
    _check_cache(key_cache)
    _check_cache(value_cache)
    assert slot_indices.dtype == torch.int32, "slot_indices are int32"
    assert key.shape[1:] == key_cache.shape[2:], (key.shape, key_cache.shape)
    slots = slot_indices.long()
    key_cache.view(-1, *key_cache.shape[2:])[slots] = key
    value_cache.view(-1, *value_cache.shape[2:])[slots] = value


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            offset: int) -> torch.Tensor:
    """q [n, H, D] at the last n of ctx positions; k, v [ctx, KVH, D]; causal."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.float().repeat_interleave(heads // kv_heads, dim=1)
    v = v.float().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q.float(), k) * scale
    ctx = k.shape[0]
    allowed = torch.arange(ctx)[None, :] <= (offset + torch.arange(q.shape[0]))[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnc,chd->nhd", scores.softmax(-1), v)


def _gather(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    bs = cache.shape[1]
    pos = torch.arange(length)
    return cache[table[pos // bs].long(), pos % bs]


def _npu_paged_attention(query: torch.Tensor, key_cache: torch.Tensor,
                         value_cache: torch.Tensor, num_kv_heads: int, num_heads: int,
                         scale_value: float, block_table: torch.Tensor,
                         context_lens: torch.Tensor, out: torch.Tensor) -> None:
    calls.append("_npu_paged_attention")
    _check_cache(key_cache)
    assert block_table.dtype == torch.int32 and context_lens.dtype == torch.int32
    assert context_lens.device.type == "cpu", "context_lens stay on the host"
    assert query.shape == out.shape and query.shape[1] == num_heads
    assert key_cache.shape[2] == num_kv_heads
    for i, n in enumerate(context_lens.tolist()):
        k = _gather(key_cache, block_table[i], n)
        v = _gather(value_cache, block_table[i], n)
        out[i] = _attend(query[i:i + 1], k, v, scale_value, n - 1)[0].to(out.dtype)


def npu_fused_infer_attention_score(query: torch.Tensor, key: torch.Tensor,
                                    value: torch.Tensor, *, atten_mask: Any = None,
                                    block_table: torch.Tensor | None = None,
                                    input_layout: str = "BSH", block_size: int = 0,
                                    actual_seq_lengths: list[int] | None = None,
                                    actual_seq_lengths_kv: list[int] | None = None,
                                    num_key_value_heads: int = 0, num_heads: int = 1,
                                    scale: float = 1.0, sparse_mode: int = 0,
                                    **unused: Any) -> tuple[torch.Tensor, torch.Tensor]:
    calls.append("npu_fused_infer_attention_score")
    assert input_layout == "TND", "npuserve calls it with TND only"
    assert sparse_mode == 3 and atten_mask is not None and atten_mask.shape == (2048, 2048)
    assert actual_seq_lengths is not None and actual_seq_lengths_kv is not None
    assert query.shape[1] == num_heads
    out = torch.empty_like(query)
    start = 0
    for i, (q_end, kv_len) in enumerate(zip(actual_seq_lengths, actual_seq_lengths_kv,
                                            strict=True)):
        q = query[start:q_end]
        if block_table is None:  # key, value: [T, KVH, D] in the same TND layout
            k, v = key[start:q_end], value[start:q_end]
        else:  # key, value: the paged cache [blocks, block_size, KVH * D]
            assert block_table.dtype == torch.int32 and key.shape[1] == block_size
            d = query.shape[2]
            k = _gather(key, block_table[i], kv_len).view(kv_len, num_key_value_heads, d)
            v = _gather(value, block_table[i], kv_len).view(kv_len, num_key_value_heads, d)
        out[start:q_end] = _attend(q, k, v, scale, kv_len - q.shape[0]).to(out.dtype)
        start = q_end
    return out, torch.zeros(query.shape[0], num_heads, 1)


def npu_weight_quant_batchmatmul(x: torch.Tensor, weight: torch.Tensor,
                                 antiquant_scale: torch.Tensor,
                                 antiquant_offset: torch.Tensor | None = None,
                                 quant_scale: Any = None, quant_offset: Any = None,
                                 bias: torch.Tensor | None = None,
                                 antiquant_group_size: int = 0) -> torch.Tensor:
    calls.append("npu_weight_quant_batchmatmul")
    assert weight.dtype == torch.int8 and weight.shape[0] == x.shape[-1], "weight is [in, out]"
    assert antiquant_offset is None and quant_scale is None
    k, n = weight.shape
    if antiquant_group_size:
        assert antiquant_scale.shape == (k // antiquant_group_size, n)
        scale = antiquant_scale.float().repeat_interleave(antiquant_group_size, dim=0)
    else:
        assert antiquant_scale.shape == (n,)
        scale = antiquant_scale.float()[None, :]
    y = x.float() @ (weight.float() * scale)
    return (y + bias.float() if bias is not None else y).to(x.dtype)


def npu_dynamic_quant(x: torch.Tensor, smooth_scales: Any = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    calls.append("npu_dynamic_quant")
    scale = x.float().abs().amax(dim=-1).clamp_min(1e-30) / 127  # [M]
    return (x.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def npu_quantize(x: torch.Tensor, scales: torch.Tensor, zero_points: Any, dtype: Any,
                 axis: int = -1, div_mode: bool = True) -> torch.Tensor:
    calls.append("npu_quantize")
    assert dtype == torch.qint8 and not div_mode, "npuserve multiplies by 1 / scale"
    return (x.float() * scales.float()).round().clamp(-128, 127).to(torch.int8)


def npu_quant_matmul(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *,
                     offset: Any = None, pertoken_scale: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, output_dtype: Any = None) -> torch.Tensor:
    calls.append("npu_quant_matmul")
    assert x1.dtype == torch.int8 and x2.dtype == torch.int8 and x2.shape[0] == x1.shape[1]
    y = (x1.long() @ x2.long()).double() * scale.double()[None, :]
    if pertoken_scale is not None:
        y = y * pertoken_scale.double()[:, None]
    if bias is not None:
        y = y + bias.double()
    return y.to(output_dtype)
