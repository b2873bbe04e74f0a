"""Each compiled CPU kernel against the PyTorch operators it replaces, on awkward shapes
(attention: test_attention_kernels.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from tests.worker.kernels.conftest import gen
from worker.kernels.cpu import CpuKernels, cpu_kernels
from worker.kernels.cpu_ops import KernelOps
from worker.model.attention import KVCache
from worker.model.config import ModelConfig
from worker.model.ops import DecoderOps
from worker.model.rope import RotaryEmbedding
from worker.model.weights import LayerWeights
from worker.quant.int8_linear import dequantize


def _amx() -> bool:
    kernels = cpu_kernels()
    return kernels is not None and "amxbf16" in kernels.isa.split()


@pytest.fixture(params=[(1, 0), (2, 0), (0, 0), (2, 1)],
                ids=["prefetch-t0", "prefetch-l2", "prefetch-nta", "row-stream"])
def prefetch(k: CpuKernels, request: pytest.FixtureRequest) -> Iterator[int]:
    """Each prefetch setting the machine's tuning may choose, and one row of x streaming the
    weights row by row, float and int8 (the results are the same)."""
    before = k.cpuk_get_prefetch(), k.cpuk_get_row_stream(), k.cpuk_get_row_stream_i8()
    mode, stream = request.param
    k.cpuk_set_prefetch(mode)
    k.cpuk_set_row_stream(stream)
    k.cpuk_set_row_stream_i8(stream)
    yield mode
    k.cpuk_set_prefetch(before[0])
    k.cpuk_set_row_stream(before[1])
    k.cpuk_set_row_stream_i8(before[2])


@pytest.mark.parametrize("m", [2, 3, 7, 11])
@pytest.mark.parametrize("in_features", [13, 576])
def test_a_row_of_x_gets_the_same_bits_whatever_rows_share_its_call(
        k: CpuKernels, prefetch: int, m: int, in_features: int) -> None:
    """A decode's output must not depend on how many others share its step: each row of
    x is summed in one order whatever pass of a tile it falls in (a tile meets x four rows
    at a time, the last pass one to three), and a row alone in its call whether it streams
    the weights or reads them in tiles."""
    g = gen(m)
    x, w = torch.randn(m, in_features, generator=g), torch.randn(97, in_features, generator=g)
    together = k.linear(x, w, None)
    for r in range(m):
        assert torch.equal(k.linear(x[r:r + 1].contiguous(), w, None)[0], together[r])


@pytest.mark.parametrize("m", [3, 7, 11])
def test_bfloat16_and_int8_rows_get_the_same_bits_whatever_rows_share_their_call(
        k: CpuKernels, m: int) -> None:
    """As float32's, for bfloat16 weights under float32 x and int8 weights: every pass of a
    tile over x reduces its sums in one order (off AMX, whose tiles start at a number of
    rows)."""
    before = k.cpuk_get_amx()
    k.cpuk_set_amx(0)
    try:
        g = gen(m)
        x, w = torch.randn(m, 576, generator=g), torch.randn(96, 576, generator=g).bfloat16()
        q = torch.randint(-127, 128, (96, 576), dtype=torch.int8, generator=g)
        scale = torch.rand(96, 1, generator=g) / 50
        together = k.linear_f32_wbf16(x, w, None), k.linear_int8(x, q, scale, 576, None)
        for r in range(m):
            pair = x[[r, (r + 1) % m]]  # two rows: the several-row path, a pass of two
            assert torch.equal(k.linear_f32_wbf16(pair, w, None)[0], together[0][r])
            assert torch.equal(k.linear_int8(pair, q, scale, 576, None)[0], together[1][r])
            alone, xh = x[r:r + 1].contiguous(), x[r:r + 1].bfloat16()
            tiled = (k.linear_f32_wbf16(alone, w, None), k.linear_bf16(xh, w, None),
                     k.linear_int8(alone, q, scale, 576, None))
            k.cpuk_set_row_stream(1)  # a row alone the same, streaming the weights
            k.cpuk_set_row_stream_i8(1)
            streamed = (k.linear_f32_wbf16(alone, w, None), k.linear_bf16(xh, w, None),
                        k.linear_int8(alone, q, scale, 576, None))
            k.cpuk_set_row_stream(0)
            k.cpuk_set_row_stream_i8(0)
            assert all(torch.equal(a, b) for a, b in zip(streamed, tiled, strict=True))
            assert torch.equal(tiled[2][0], together[1][r])
    finally:
        k.cpuk_set_amx(before)
        k.cpuk_set_row_stream(0)
        k.cpuk_set_row_stream_i8(0)


@pytest.mark.parametrize(("n", "in_features", "group"), [
    (962, 576, 64), (5, 48, 16), (130, 2064, 48), (7, 80, 80), (3073, 1536, 1536)])
def test_a_streamed_int8_row_gets_the_tiles_bits(k: CpuKernels, n: int, in_features: int,
                                                 group: int) -> None:
    """Streaming sums each FLUSH block in two int32 accumulators where the tiles use one:
    integer sums, so the same bits, with groups, a half vector at the end (2064, 80) and
    rows past the last whole tile."""
    g = gen(n)
    x = torch.randn(1, in_features, generator=g) * 3
    q = torch.randint(-127, 128, (n, in_features), dtype=torch.int8, generator=g)
    scale, b = torch.rand(n, in_features // group, generator=g), torch.randn(n, generator=g)
    before = k.cpuk_get_row_stream_i8()
    try:
        k.cpuk_set_row_stream_i8(0)
        tiled = k.linear_int8(x, q, scale, group, b)
        k.cpuk_set_row_stream_i8(1)
        streamed = k.linear_int8(x, q, scale, group, b)
    finally:
        k.cpuk_set_row_stream_i8(before)
    assert torch.equal(streamed, tiled)


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("n", [13, 97, 1001])
def test_one_row_streams_cover_every_tile_whatever_the_threads(k: CpuKernels, threads: int,
                                                               n: int) -> None:
    """Threads take over each other's shares of tiles: with more threads than cores, or than
    tiles (13 rows are four tiles for eight shares), every output is computed once, and the
    same as one thread computes it."""
    g = gen(n)
    kk = 8192  # n * k past the size from which a projection runs in parallel
    x, w = torch.randn(1, kk, generator=g), torch.randn(n, kk, generator=g)
    q = torch.randint(-127, 128, (n, kk), dtype=torch.int8, generator=g)
    scale = torch.rand(n, 1, generator=g) / 50
    before = torch.get_num_threads(), k.cpuk_get_row_stream(), k.cpuk_get_row_stream_i8()
    k.cpuk_set_row_stream(1)
    k.cpuk_set_row_stream_i8(1)
    try:
        torch.set_num_threads(1)
        alone = k.linear(x, w, None), k.linear_int8(x, q, scale, kk, None)
        torch.set_num_threads(threads)
        shared = k.linear(x, w, None), k.linear_int8(x, q, scale, kk, None)
    finally:
        torch.set_num_threads(before[0])
        k.cpuk_set_row_stream(before[1])
        k.cpuk_set_row_stream_i8(before[2])
    assert torch.equal(shared[0], alone[0]) and torch.equal(shared[1], alone[1])
    torch.testing.assert_close(alone[0], F.linear(x, w), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 70])
@pytest.mark.parametrize(("n", "in_features"), [(1, 8), (7, 13), (13, 576), (64, 40),
                                                (301, 584)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(k: CpuKernels, prefetch: int, m: int, n: int,
                                 in_features: int, bias: bool) -> None:
    """Widths that are not a multiple of the vector (16 lanes with AVX-512, 8 otherwise),
    rows past the x block and weights big enough to run on every thread."""
    g = gen(m * 1000 + n)
    x, w = torch.randn(m, in_features, generator=g), torch.randn(n, in_features, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    # sums of in_features products in another order: rounding grows with their square root
    torch.testing.assert_close(k.linear(x, w, b), F.linear(x, w, b), rtol=1e-5,
                               atol=1e-5 * in_features**0.5)


AMX_SHAPES = [(301, 576), (40, 64), (16, 32)]
"""Widths in whole AMX tiles (32 columns), with W blocks of 16 and 32 rows and a short one."""


WIDE_SHAPE = (9, 8208)
"""More columns than a tile of bfloat16 weights keeps widened (linear.c's WIDEN_MAX_K)."""


@pytest.mark.parametrize("m", [1, 3, 17, 70])
@pytest.mark.parametrize(("n", "in_features"), [(7, 13), (301, 584), (64, 40), *AMX_SHAPES,
                                                WIDE_SHAPE])
def test_bfloat16_linear_is_the_float32_product_rounded_once(k: CpuKernels, prefetch: int,
                                                             m: int, n: int,
                                                             in_features: int) -> None:
    """Widened in registers (exact), summed in float32 and rounded to bfloat16 once: within
    half a bfloat16 step of the float32 product of the same values, plus summation order."""
    g = gen(m * 100 + n)
    x = torch.randn(m, in_features, generator=g).bfloat16()
    w = torch.randn(n, in_features, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    y = k.linear_bf16(x, w, b)
    ref = F.linear(x.float(), w.float(), b.float())
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    torch.testing.assert_close(y.float(), ref, rtol=2**-8, atol=1e-5 * in_features**0.5)


@pytest.mark.parametrize("m", [1, 2, 3, 16, 33, 70])
@pytest.mark.parametrize(("n", "in_features"), [(7, 13), (301, 584), (64, 40), *AMX_SHAPES,
                                                WIDE_SHAPE])
def test_bfloat16_weights_under_float32_x(k: CpuKernels, prefetch: int, m: int, n: int,
                                          in_features: int) -> None:
    """A bfloat16 model's projection in the one-call decode step: float32 x and y, the weight
    widened in registers (exact), so the float32 product; x is rounded to bfloat16 first where
    AMX tiles (widths of whole tiles) or, for several rows, AVX512-BF16's vdpbf16ps take it
    (their products of bfloat16 are exact too)."""
    g = gen(m * 10 + n)
    x, b = torch.randn(m, in_features, generator=g), torch.randn(n, generator=g)
    w = torch.randn(n, in_features, generator=g).bfloat16()
    isa = k.isa.split()
    rounded = "avx512bf16" in isa and (m > 1 or ("amxbf16" in isa and in_features % 32 == 0))
    ref = F.linear(x.bfloat16().float() if rounded else x, w.float(), b)
    torch.testing.assert_close(k.linear_f32_wbf16(x, w, b), ref, rtol=1e-5,
                               atol=1e-5 * in_features**0.5)


@pytest.mark.skipif(not _amx(), reason="this CPU or OS gives no AMX tiles")
@pytest.mark.parametrize("m", [1, 2, 15, 16, 31, 32, 33, 64, 130])
@pytest.mark.parametrize(("n", "in_features"), [*AMX_SHAPES, (1000, 1536)])
def test_amx_tiles_agree_with_the_vector_path(k: CpuKernels, m: int, n: int,
                                              in_features: int) -> None:
    """Every split of x and W into the tiles' blocks of 16 and 32 rows, against the vector
    path's vdpbf16ps on the same bfloat16 values: both sum exact products in float32, in
    another order."""
    g = gen(m * 7 + n)
    xh = torch.randn(m, in_features, generator=g).bfloat16()
    x, b = xh.float(), torch.randn(n, generator=g)  # x already bfloat16's: no path rounds it
    w = torch.randn(n, in_features, generator=g).bfloat16()
    bh = b.bfloat16()
    assert k.cpuk_get_amx() == 1
    tiles = k.linear_f32_wbf16(x, w, b), k.linear_bf16(xh, w, bh)
    k.cpuk_set_amx(0)
    try:
        assert k.cpuk_get_amx() == 0
        vector = k.linear_f32_wbf16(x, w, b), k.linear_bf16(xh, w, bh)
    finally:
        k.cpuk_set_amx(1)
    torch.testing.assert_close(tiles[0], vector[0], rtol=1e-5, atol=1e-5 * in_features**0.5)
    torch.testing.assert_close(tiles[1].float(), vector[1].float(), rtol=2**-7, atol=1e-2)


@pytest.mark.skipif(not _amx(), reason="this CPU or OS gives no AMX tiles")
@pytest.mark.parametrize("m", [1, 2, 4, 16, 17, 33, 70])
@pytest.mark.parametrize(("n", "in_features", "group"), [(301, 576, 576), (40, 1536, 128),
                                                         (16, 128, 64)])
def test_amx_int8_tiles_agree_with_the_vector_path(k: CpuKernels, m: int, n: int,
                                                   in_features: int, group: int) -> None:
    """x rounded to int16 on both, split into two bytes for the tiles: the same int32 sums per
    group, scaled and summed in float32 in another order. Tiles from one row (the dispatch
    table may choose any count), against the vector code by a count no call reaches."""
    g = gen(m * 11 + n)
    x, b = torch.randn(m, in_features, generator=g), torch.randn(n, generator=g)
    qweight = torch.randint(-127, 128, (n, in_features), dtype=torch.int8, generator=g)
    scale = torch.rand(n, in_features // group, generator=g) / 64
    before = k.cpuk_get_amx_i8_rows()
    try:
        k.cpuk_set_amx_i8_rows(1)
        tiles = k.linear_int8(x, qweight, scale, group, b)
        k.cpuk_set_amx_i8_rows(1 << 30)
        vector = k.linear_int8(x, qweight, scale, group, b)
    finally:
        k.cpuk_set_amx_i8_rows(before)
    torch.testing.assert_close(tiles, vector, rtol=1e-5, atol=1e-5 * in_features**0.5)
    ref = F.linear(x, dequantize(qweight, scale), b)
    torch.testing.assert_close(tiles, ref, rtol=1e-3, atol=1e-3 * in_features**0.5)


@pytest.mark.parametrize(("in_features", "group"), [(64, 0), (64, 32), (64, 8), (40, 0), (48, 0),
                                                    (96, 48), (2096, 0), (2080, 1040)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 70])
def test_int8_linear_matches_the_dequantized_float_product(k: CpuKernels, prefetch: int,
                                                           in_features: int, group: int,
                                                           m: int) -> None:
    """Widths and groups in multiples of 16 take the integer path on AVX2 and AVX-512 (x
    rounded to 15 bits per row; on AVX-512 an odd multiple ends in a half vector, and past
    1024 columns the int32 sums are flushed to float); others widen the weights to float32
    and match to float rounding."""
    n = 11
    g = gen(in_features + group + m)
    q = torch.randint(-127, 128, (n, in_features), dtype=torch.int8, generator=g)
    groups = in_features // group if group else 1
    scale = torch.rand(n, groups, generator=g) / 50
    x, b = torch.randn(m, in_features, generator=g), torch.randn(n, generator=g)
    ref = F.linear(x, dequantize(q, scale), b)
    y = k.linear_int8(x, q, scale, group or in_features, b)
    integer = in_features % 16 == 0 and (group or in_features) % 16 == 0
    atol = float(ref.abs().max()) * 2**-11 if integer else 1e-5
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=atol)


def test_norms_and_silu_match_torch(k: CpuKernels) -> None:
    g = gen(3)
    x, w = torch.randn(5, 67, generator=g) * 3, torch.randn(67, generator=g)
    torch.testing.assert_close(k.rms_norm(x, w, 1e-6), F.rms_norm(x, (67,), w, 1e-6))
    residual, delta = x.clone(), torch.randn(5, 67, generator=g)
    out = k.add_rms_norm(residual, delta, w, 1e-5)
    torch.testing.assert_close(residual, x + delta)  # updated in place
    torch.testing.assert_close(out, F.rms_norm(x + delta, (67,), w, 1e-5))
    # far into both tails of the exponential, and a width that is not a multiple of 8
    gate_up = torch.cat([torch.linspace(-120, 120, 3 * 2 * 45).view(3, 90)], 0)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(k.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)


def _config(qk_norm: bool) -> ModelConfig:
    return ModelConfig.from_dict({
        "model_type": "qwen3" if qk_norm else "llama", "vocab_size": 50, "hidden_size": 48,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 6,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
    })


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_rope_store_matches_torch_ops(k: CpuKernels, qk_norm: bool) -> None:
    cfg = _config(qk_norm)
    g = gen(4)
    d = cfg.head_dim
    norm = (torch.rand(d, generator=g) + 0.5) if qk_norm else None
    layer = LayerWeights(torch.ones(48), None, norm, None if norm is None else norm * 0.7,  # type: ignore[arg-type]
                         None, torch.ones(48), None, None)  # type: ignore[arg-type]
    rope = RotaryEmbedding(cfg, 256, torch.device("cpu"), torch.float32)
    t = 5
    qkv = torch.randn(t, cfg.q_size + 2 * cfg.kv_size, generator=g)
    positions = torch.tensor([0, 3, 4, 100, 255])
    slots = torch.tensor([7, 2, 30, 11, 0])
    results = []
    for ops in (DecoderOps(), KernelOps(k)):
        cache = KVCache(1, 4, 8, cfg.num_key_value_heads, d, torch.float32, torch.device("cpu"))
        q, key = ops.qk_rope_store(cfg, layer, qkv, ops.rope_tables(rope, positions), cache, 0,
                                   slots)
        results.append((q.reshape(t, -1, d), key.reshape(t, -1, d), cache.data.clone()))
    for ours, ref in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_qk_rope_store_rounds_once_into_a_bfloat16_cache(k: CpuKernels) -> None:
    """The same queries and keys; the cache holds the float32 one's values rounded to
    bfloat16 (to nearest even, as torch rounds)."""
    cfg = _config(qk_norm=True)
    g = gen(5)
    d, kv_heads, t = cfg.head_dim, cfg.num_key_value_heads, 4
    q_norm = torch.rand(d, generator=g) + 0.5
    k_norm = q_norm * 0.7
    rope = RotaryEmbedding(cfg, 256, torch.device("cpu"), torch.float32)
    qkv = torch.randn(t, cfg.q_size + 2 * cfg.kv_size, generator=g) * 3
    positions, slots = torch.tensor([0, 9, 50, 255]), torch.tensor([3, 30, 0, 17])
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        cache = torch.zeros(2, kv_heads, 32, d, dtype=dtype)
        q = torch.empty(t, cfg.num_attention_heads, d)
        key = torch.empty(t, kv_heads, d)
        k.cpuk_qk_rope_store(qkv.data_ptr(), t, cfg.num_attention_heads, kv_heads, d,
                             positions.data_ptr(), rope.cos.data_ptr(), rope.sin.data_ptr(),
                             q_norm.data_ptr(), k_norm.data_ptr(), 1e-6, q.data_ptr(),
                             key.data_ptr(), cache.data_ptr(), dtype == torch.bfloat16, 32,
                             slots.data_ptr())
        results.append((q, key, cache))
    (q32, k32, cache32), (q16, k16, cache16) = results
    assert torch.equal(q16, q32) and torch.equal(k16, k32)
    assert torch.equal(cache16, cache32.bfloat16())


def test_hugepage_copy_is_an_equal_tensor_in_new_memory(k: CpuKernels) -> None:
    t = torch.randn(2048, 1024)  # 8 MiB: large enough to be moved
    moved = k.on_hugepages(t)
    assert moved.data_ptr() != t.data_ptr()
    assert torch.equal(moved, t)
    small = torch.randn(10)
    assert k.on_hugepages(small) is small
