"""The attention kernels against PyTorch's: decode attention over the paged cache in place,
in every setting the machine's tuning may choose, and prefill attention, fused or not."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.worker.kernels.conftest import gen
from worker.kernels.cpu import CpuKernels
from worker.kernels.cpu_ops import KernelOps
from worker.model.attention import KVCache, gathered_decode, gathered_decode_attention
from worker.model.ops import DecoderOps


@pytest.fixture(params=[2, 0, 4], ids=["parts-2", "no-split", "parts-4"])
def attention_parts(k: CpuKernels, request: pytest.FixtureRequest) -> Iterator[int]:
    """Decode attention's tasks per thread the machine's tuning may choose."""
    before = k.cpuk_get_attention_parts()
    k.cpuk_set_attention_parts(request.param)
    yield request.param
    k.cpuk_set_attention_parts(before)


@pytest.fixture(params=[0, 1], ids=["prefetch-block", "prefetch-pages"])
def attention_prefetch(k: CpuKernels, request: pytest.FixtureRequest) -> Iterator[int]:
    """Decode attention's prefetch settings the machine's tuning may choose."""
    before = k.cpuk_get_attention_prefetch()
    k.cpuk_set_attention_prefetch(request.param)
    yield request.param
    k.cpuk_set_attention_prefetch(before)


def test_decode_attention_gets_the_same_bits_whatever_it_prefetches(k: CpuKernels) -> None:
    g = gen(11)
    block, lens = 16, [300, 17, 1, 96]
    cache = torch.randn(2, 3, 80 * block, 64, generator=g)
    width = max(-(-x // block) for x in lens)
    tables = torch.randperm(80, generator=g)[:len(lens) * width].view(len(lens), width)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), 9, 64, generator=g)
    before = k.cpuk_get_attention_prefetch()
    try:
        outs = []
        for mode in (0, 1):
            k.cpuk_set_attention_prefetch(mode)
            assert k.cpuk_get_attention_prefetch() == mode
            outs.append(k.decode_attention(q, cache, block, tables.to(torch.int32), lens_t))
    finally:
        k.cpuk_set_attention_prefetch(before)
    assert torch.equal(outs[0], outs[1])


def assert_paged_attention_matches(k: CpuKernels, lens: list[int], *, heads: int,
                                   kv_heads: int, d: int, block: int, blocks: int,
                                   g: torch.Generator) -> None:
    """The kernels' decode attention over a float32 cache of `blocks` random blocks, each
    sequence's blocks scattered, equals attention over the gathered contexts."""
    cache = KVCache(2, blocks, block, kv_heads, d, torch.float32, torch.device("cpu"))
    cache.data.copy_(torch.randn(cache.data.shape, generator=g))
    n = len(lens)
    width = max(-(-x // block) for x in lens)
    tables = torch.randperm(blocks, generator=g)[:n * width].view(n, width)
    lens_t = torch.tensor(lens)
    q = torch.randn(n, heads, d, generator=g)
    ref = gathered_decode_attention(
        q, cache, 1, gathered_decode(tables, lens_t, kv_heads, cache.num_slots, block,
                                     torch.float32, torch.device("cpu")))
    ops = KernelOps(k)
    ours = ops.decode_attention(q, cache, 1, ops.decode_metadata(tables, lens_t, cache))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [16, 64, 128])  # 64 and 128 have code of their own
@pytest.mark.parametrize("lens", [[1], [17, 1, 40], [33, 5, 8, 64], [300], [200, 7]])
def test_decode_attention_reads_the_paged_cache_like_the_gathered_reference(
    k: CpuKernels, attention_parts: int, attention_prefetch: int, lens: list[int], d: int
) -> None:
    """Short batches split each context into parts merged afterwards ([300], [200, 7]),
    unless the setting says not to."""
    assert_paged_attention_matches(k, lens, heads=6, kv_heads=2, d=d, block=8, blocks=80,
                                   g=gen(sum(lens)))


@pytest.mark.parametrize(("heads", "kv_heads"), [(2, 2), (4, 2), (8, 2), (10, 2), (14, 2)])
@pytest.mark.parametrize("d", [24, 48, 80, 128])
def test_decode_attention_for_every_group_size_and_head_dim(
    k: CpuKernels, heads: int, kv_heads: int, d: int
) -> None:
    """Groups of one to seven query heads (taken four at a time on sixteen lanes, so five
    and seven leave a remainder), head_dim off the 16-lane width (24), a multiple of it that
    takes no code of its own (48, 80) and one that does (128); a last block part full."""
    assert_paged_attention_matches(k, [70, 16, 1, 33], heads=heads, kv_heads=kv_heads, d=d,
                                   block=16, blocks=40, g=gen(heads * d))


@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (4, 4), (10, 2)])
@pytest.mark.parametrize("d", [16, 64, 80, 128])
@pytest.mark.parametrize("lens", [[1], [17, 1, 40], [300]])
def test_decode_attention_on_a_bfloat16_cache_is_the_float32_one_widened(
    k: CpuKernels, attention_parts: int, attention_prefetch: int, lens: list[int], d: int,
    heads: int, kv_heads: int
) -> None:
    """Keys and values widened as they are read (exact), then the float32 arithmetic: bit
    for bit the result on a float32 copy of the cache, for groups of three, one and five
    query heads."""
    block = 8
    g = gen(len(lens))
    cache = torch.randn(2, kv_heads, 60 * block, d, generator=g).bfloat16()
    n = len(lens)
    width = max(-(-x // block) for x in lens)
    tables = torch.randperm(60, generator=g)[:n * width].view(n, width).to(torch.int32)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(n, heads, d, generator=g)
    ours = k.decode_attention(q, cache, block, tables, lens_t)
    assert torch.equal(ours, k.decode_attention(q, cache.float(), block, tables, lens_t))


@pytest.mark.parametrize(("heads", "kv_heads", "d"),
                         [(6, 2, 16), (9, 3, 64), (16, 8, 128), (7, 1, 64), (4, 4, 24)])
@pytest.mark.parametrize(("chunk", "ctx"),
                         [(1, 1), (13, 13), (7, 30), (64, 64), (300, 300), (200, 333)])
def test_prefill_attention_matches_torch_sdpa(k: CpuKernels, chunk: int, ctx: int, heads: int,
                                              kv_heads: int, d: int) -> None:
    """The fused kernel where it takes the head_dim (24 is not a multiple of AVX-512's sixteen
    lanes: the GEMMs then), across query groups of 1-7 heads and chunks that are or follow a
    context."""
    g = gen(chunk * 100 + ctx + d)
    q = torch.randn(chunk, heads, d, generator=g)
    keys = torch.randn(kv_heads, ctx, d, generator=g)
    values = torch.randn(kv_heads, ctx, d, generator=g)
    ref = DecoderOps().prefill_attention(q, keys, values)
    ours = KernelOps(k).prefill_attention(q, keys, values)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # keys and values of a bfloat16 cache, widened
    k16, v16 = keys.bfloat16(), values.bfloat16()
    ours16 = KernelOps(k).prefill_attention(q, k16, v16)
    assert ours16.dtype == torch.float32
    exact = DecoderOps().prefill_attention(q, k16.float(), v16.float())
    torch.testing.assert_close(ours16, exact, rtol=1e-5, atol=1e-5)


def test_prefill_attention_is_fused_for_the_usual_head_dims(k: CpuKernels) -> None:
    """With AVX-512, 64 and 128 (every Qwen and Llama) take the fused kernel, whose rows each
    see exactly the keys up to their own position: a query's output does not change when
    later keys do. Without it the GEMMs serve (the fused kernel was slower on eight lanes)."""
    if "avx512f" not in k.isa.split():
        assert not k.cpuk_prefill_attention_takes(64)
        assert k.prefill_attention(torch.zeros(1, 2, 64), torch.zeros(1, 1, 64),
                                   torch.zeros(1, 1, 64)) is None
        return
    for d in (64, 128):
        assert k.cpuk_prefill_attention_takes(d)
    g = gen(5)
    q = torch.randn(40, 8, 64, generator=g)
    keys, values = torch.randn(2, 90, 64, generator=g), torch.randn(2, 90, 64, generator=g)
    out = k.prefill_attention(q, keys, values)
    assert out is not None
    keys[:, 70:], values[:, 70:] = 1e4, -1e4  # seen only by the queries at positions 70-89
    changed = k.prefill_attention(q, keys, values)
    assert changed is not None
    assert torch.equal(out[:20], changed[:20])
    assert not torch.equal(out[20:], changed[20:])
