"""A SIMULATION of the torch_npu operators npuserve's NPU op set calls, on the CPU.

Same names, argument names and return conventions as torch_npu 2.x (tuples where torch_npu
returns tuples, `out=` filled in place, in-place rotary embedding, int32 slot indices,
block tables and context lengths, the 910B paged cache [blocks, 128, kv_heads, head_dim],
the 310P's NZ cache [blocks, kv_heads * head_dim / 16, block_size, 16] and NZ masks),
computed with plain reference arithmetic in float32. It checks what the real kernels would
reject (dtypes, shapes, layouts, the format a tensor was cast to, operators a 310P does not
have) so a call that passes here is at least well formed; it says nothing about the
kernels' own numerics or speed. No Ascend hardware or CANN is involved. The NZ layout is
read here by its own index arithmetic, not through npuserve's conversions.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch


class SocVersion:
    value = 223  # an Atlas 800I A2 (910B4); 202 is an Atlas 300I Duo (310P3)


npu = SimpleNamespace(get_soc_version=lambda: SocVersion.value)
calls: list[str] = []
NZ = 29  # ACL_FORMAT_FRACTAL_NZ


def _on_310p() -> bool:
    return 200 <= SocVersion.value <= 205


def _not_on_310p(op: str) -> None:
    assert not _on_310p(), f"{op} is not built for the 310P"


def npu_format_cast(x: torch.Tensor, acl_format: int) -> torch.Tensor:
    """A copy marked with the format (torch_npu keeps the format per tensor)."""
    calls.append("npu_format_cast")
    out = x.clone()
    out.npu_format = acl_format  # type: ignore[attr-defined]
    return out


def _is_nz(x: torch.Tensor) -> bool:
    return getattr(x, "npu_format", None) == NZ


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
    _not_on_310p("npu_swiglu")
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
    if _on_310p():
        assert _is_nz(cache) and cache.dim() == 4 and cache.shape[3] == 16, (
            f"310P paged caches are NZ [blocks, kv_heads * head_dim / 16, block_size, 16] cast "
            f"to format {NZ}, got {list(cache.shape)}")
        assert cache.shape[2] in (64, 128) and cache.dtype == torch.float16 or (
            cache.dtype == torch.float32), "310P caches are float16 (float32 in tests)"
    else:
        assert cache.dim() == 4 and cache.shape[1] == 128, (
            f"910B paged caches are [blocks, 128, kv_heads, head_dim], got {list(cache.shape)}")


def _block_size(cache: torch.Tensor) -> int:
    return cache.shape[2] if _is_nz(cache) else cache.shape[1]


def _npu_reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, slot_indices: torch.Tensor) -> None:
    calls.append("_npu_reshape_and_cache")
    _check_cache(key_cache)
    _check_cache(value_cache)
    assert slot_indices.dtype == torch.int32, "slot_indices are int32"
    slots = slot_indices.long()
    for x, cache in ((key, key_cache), (value, value_cache)):
        if _is_nz(cache):  # token t of block b, feature f at [b, f // 16, t, f % 16]
            bs = cache.shape[2]
            assert x.shape[1] * x.shape[2] == cache.shape[1] * 16, (x.shape, cache.shape)
            cache[slots // bs, :, slots % bs, :] = x.reshape(x.shape[0], -1, 16).to(cache.dtype)
        else:
            assert x.shape[1:] == cache.shape[2:], (x.shape, cache.shape)
            cache.view(-1, *cache.shape[2:])[slots] = x


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            bias: torch.Tensor) -> torch.Tensor:
    """q [n, H, D]; k, v [ctx, KVH, D]; bias [n, ctx] added to the scores."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.float().repeat_interleave(heads // kv_heads, dim=1)
    v = v.float().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q.float(), k) * scale + bias.float()[None]
    return torch.einsum("hnc,chd->nhd", scores.softmax(-1), v)


def _causal(n: int, ctx: int) -> torch.Tensor:
    """The bias of n queries at the last n of ctx positions."""
    allowed = torch.arange(ctx)[None, :] <= (ctx - n + torch.arange(n))[:, None]
    return torch.zeros(n, ctx).masked_fill(~allowed, float("-inf"))


def _gather(cache: torch.Tensor, table: torch.Tensor, length: int,
            kv_heads: int) -> torch.Tensor:
    """A sequence's first `length` keys (or values) [length, KVH, D]."""
    bs = _block_size(cache)
    pos = torch.arange(length)
    blocks, offsets = table[pos // bs].long(), pos % bs
    if _is_nz(cache):
        return cache[blocks, :, offsets, :].reshape(length, kv_heads, -1)
    return cache[blocks, offsets]


def _nz_mask(mask: torch.Tensor) -> torch.Tensor:
    """An NZ mask [1, cols / 16, rows, 16] read back as [rows, cols]."""
    assert _is_nz(mask) and mask.dim() == 4 and mask.shape[0] == 1 and mask.shape[3] == 16, (
        f"310P masks are NZ [1, cols / 16, rows, 16] cast to format {NZ}")
    return mask[0].permute(1, 0, 2).reshape(mask.shape[2], -1)


def _npu_paged_attention(query: torch.Tensor, key_cache: torch.Tensor,
                         value_cache: torch.Tensor, num_kv_heads: int, num_heads: int,
                         scale_value: float, block_table: torch.Tensor,
                         context_lens: torch.Tensor, out: torch.Tensor) -> None:
    calls.append("_npu_paged_attention")
    _check_cache(key_cache)
    _check_cache(value_cache)
    assert block_table.dtype == torch.int32 and context_lens.dtype == torch.int32
    assert query.shape == out.shape and query.shape[1] == num_heads
    if not _is_nz(key_cache):
        assert key_cache.shape[2] == num_kv_heads
    for i, n in enumerate(context_lens.tolist()):
        k = _gather(key_cache, block_table[i], n, num_kv_heads)
        v = _gather(value_cache, block_table[i], n, num_kv_heads)
        out[i] = _attend(query[i:i + 1], k, v, scale_value, _causal(1, n))[0].to(out.dtype)


def _npu_flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         mask: torch.Tensor, seq_len: torch.Tensor, scale_value: float,
                         num_heads: int, num_kv_heads: int, out: torch.Tensor) -> None:
    """310P prefill: [T, H, D] rows of the sequences one after the other, T a multiple of 16,
    the additive mask [M, M] in NZ added to each sequence's scores."""
    calls.append("_npu_flash_attention")
    assert _on_310p(), "npuserve calls _npu_flash_attention on the 310P only"
    assert query.shape[0] % 16 == 0, "the 310P takes token rows aligned to 16"
    assert seq_len.dtype == torch.int32 and int(seq_len.sum()) == query.shape[0]
    assert query.shape == out.shape and query.shape[1] == num_heads
    assert key.shape[1] == value.shape[1] == num_kv_heads
    bias = _nz_mask(mask)
    start = 0
    for n in seq_len.tolist():
        assert bias.shape[0] >= n and bias.shape[1] >= n, "the mask is smaller than a sequence"
        s = slice(start, start + n)
        out[s] = _attend(query[s], key[s], value[s], scale_value, bias[:n, :n]).to(out.dtype)
        start += n


def _npu_paged_attention_splitfuse(query: torch.Tensor, key_cache: torch.Tensor,
                                   value_cache: torch.Tensor, mask: torch.Tensor,
                                   block_table: torch.Tensor, seq_len: torch.Tensor,
                                   context_lens: torch.Tensor, num_kv_heads: int,
                                   num_heads: int, scale_value: float,
                                   out: torch.Tensor) -> None:
    """310P chunked prefill over the paged cache: sequence i's seq_len[i] query rows are the
    last of its context_lens[i] positions; mask row j (NZ) is query row j's additive bias."""
    calls.append("_npu_paged_attention_splitfuse")
    assert _on_310p(), "npuserve calls the splitfuse kernel on the 310P only"
    _check_cache(key_cache)
    _check_cache(value_cache)
    assert block_table.dtype == torch.int32 and seq_len.dtype == torch.int32
    assert context_lens.dtype == torch.int32 and int(seq_len.sum()) == query.shape[0]
    bias = _nz_mask(mask)
    start = 0
    for i, (n, ctx) in enumerate(zip(seq_len.tolist(), context_lens.tolist(), strict=True)):
        k = _gather(key_cache, block_table[i], ctx, num_kv_heads)
        v = _gather(value_cache, block_table[i], ctx, num_kv_heads)
        s = slice(start, start + n)
        out[s] = _attend(query[s], k, v, scale_value, bias[s, :ctx]).to(out.dtype)
        start += n


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
    _not_on_310p("npu_fused_infer_attention_score")
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
            k = _gather(key, block_table[i], kv_len, num_key_value_heads).view(
                kv_len, num_key_value_heads, d)
            v = _gather(value, block_table[i], kv_len, num_key_value_heads).view(
                kv_len, num_key_value_heads, d)
        out[start:q_end] = _attend(q, k, v, scale, _causal(q.shape[0], kv_len)).to(out.dtype)
        start = q_end
    return out, torch.zeros(query.shape[0], num_heads, 1)


def npu_weight_quant_batchmatmul(x: torch.Tensor, weight: torch.Tensor,
                                 antiquant_scale: torch.Tensor,
                                 antiquant_offset: torch.Tensor | None = None,
                                 quant_scale: Any = None, quant_offset: Any = None,
                                 bias: torch.Tensor | None = None,
                                 antiquant_group_size: int = 0) -> torch.Tensor:
    calls.append("npu_weight_quant_batchmatmul")
    _not_on_310p("npu_weight_quant_batchmatmul")
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
    _not_on_310p("npu_dynamic_quant")
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
    if output_dtype == torch.float16 and pertoken_scale is None:
        assert scale.dtype == torch.int64, "a float16 output takes the scale's bits in int64"
        scale = (scale & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    else:
        assert scale.dtype == torch.float32, scale.dtype
    y = (x1.long() @ x2.long()).double() * scale.double()[None, :]
    if pertoken_scale is not None:
        y = y * pertoken_scale.double()[:, None]
    if bias is not None:
        y = y + bias.double()
    return y.to(output_dtype)
