"""The int8 projections against float references computed from their dequantized weights."""

from __future__ import annotations

import pytest
import torch

from worker.model.linear import Projection
from worker.quant.int8_linear import (
    FakeQuantInput,
    W8A8Projection,
    W8A16Projection,
    dequantize,
    kernel_available,
    quantize_rows,
)
from worker.quant.quantize import quantize_tensor
from worker.quant.scheme import QuantConfig, Scheme

CPU = torch.device("cpu")


def make(out: int = 96, cols: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g) * 0.05
    return quantize_tensor(w, QuantConfig(Scheme.W8A16))


@pytest.mark.parametrize("rows", [1, 2, 4, 5, 17, 64])
def test_w8a16_matches_the_dequantized_weights_on_bfloat16_inputs(rows: int) -> None:
    """Decode rows take the GEMV kernel, more rows a bfloat16 GEMM; both round only the
    input to bfloat16 and the product before scaling (2^-8 relative)."""
    q, s = make()
    bias = torch.randn(96)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
    y = W8A16Projection(q, s, bias)(x)
    ref = (x.bfloat16().double() @ dequantize(q, s).double().t() + bias.double()).float()
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    torch.testing.assert_close(y, ref, rtol=0, atol=float(ref.abs().max()) * 2**-7)


@pytest.mark.parametrize("rows", [1, 5, 33])
def test_w8a8_matches_the_dequantized_weights_on_quantized_inputs(rows: int) -> None:
    """The int32 accumulation is exact, so only float32 rescaling separates the two."""
    q, s = make(seed=1)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)) * 3
    xq, xs = quantize_rows(x, None)
    ref = (xq.double() * xs.double()) @ dequantize(q, s).double().t()
    torch.testing.assert_close(W8A8Projection(q, s, None)(x), ref.float(), rtol=1e-5, atol=1e-5)


def test_per_token_activation_scales_reconstruct_each_row_within_half_a_step() -> None:
    x = torch.randn(4, 64) * torch.tensor([[0.01], [1.0], [30.0], [0.0]])
    xq, xs = quantize_rows(x, None)
    assert int(xq.abs().max()) == 127
    assert ((xq.float() * xs - x).abs() <= xs / 2 + 1e-12).all()


def test_a_static_activation_scale_clips_values_beyond_its_range() -> None:
    x = torch.tensor([[0.5, -2.0, 10.0]])
    xq, xs = quantize_rows(x, 1 / 127)
    assert xq.tolist() == [[64, -127, 127]] and xs.item() == pytest.approx(1 / 127)


def test_the_fake_quantized_fallback_matches_the_w8a8_kernel() -> None:
    q, s = make(seed=2)
    x = torch.randn(3, 128)
    fallback = FakeQuantInput(Projection(dequantize(q, s)), None)
    torch.testing.assert_close(fallback(x), W8A8Projection(q, s, None)(x), rtol=1e-5, atol=1e-5)


def test_int8_projections_hold_a_quarter_of_the_float_bytes() -> None:
    q, s = make(out=512, cols=512)
    float_bytes = Projection(dequantize(q, s)).nbytes
    for proj in (W8A16Projection(q, s, None), W8A8Projection(q, s, None)):
        assert proj.nbytes == q.nbytes + s.nbytes
        assert 0.25 <= proj.resident_bytes / float_bytes < 0.26


def test_widths_the_cpu_gemv_kernel_cannot_take_are_routed_to_the_fallback() -> None:
    assert kernel_available(Scheme.W8A16, 32, 64, CPU)
    assert not kernel_available(Scheme.W8A16, 32, 72, CPU)  # not a multiple of 16
    assert kernel_available(Scheme.W8A8, 32, 72, CPU)


def test_group_scales_dequantize_group_by_group() -> None:
    w = torch.randn(4, 64)
    q, s = quantize_tensor(w, QuantConfig(Scheme.W8A16, group_size=16))
    assert s.shape == (4, 4)
    err = (dequantize(q, s) - w).abs().view(4, 4, 16)
    assert (err <= s[:, :, None] / 2 + 1e-7).all()
