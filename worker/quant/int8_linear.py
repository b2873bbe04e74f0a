"""Int8 projections at run time: siblings of `Projection` with the same call and byte counts.

Only the int8 matrix and its float32 scales stay resident; which kernel runs depends on the
scheme, the rows of the call and the device:

- w8a16 on the CPU with the compiled kernels and float32 activations: npuserve's int8
  GEMV/GEMM (worker/kernels/csrc/linear.c). On AVX2 and AVX-512 it rounds each activation
  row to int16 (15 bits, far finer than the weights' 8) and multiplies in integers (with
  AVX512-VNNI one fused instruction per thirty-two weights); elsewhere it widens the weights
  to float32 in registers. Scales stay float32. With per-channel scales the machine's
  dispatch table (worker/kernels/dispatch.py) may route a row bucket (prefill chunks) to
  F.linear on the weight widened to float32 for the call instead, where MKL's or oneDNN's
  blocking beats the kernel's arithmetic.
- w8a16 otherwise, up to SMALL_M rows: `torch._weight_int8pack_mm` with bfloat16 activations,
  which reads one byte per weight. On a 2-core Zen 4 it is compute-bound (int8 -> float32
  conversion and an FMA per weight, no VNNI), about 1.7x faster than the fp32 mm it replaces
  over SmolLM2's layers rather than the 4x its bytes suggest. Unit scales go in and the
  float32 scales are applied to its output, so they are not rounded to bfloat16. The kernel
  needs `in` to be a multiple of 16 (other widths give wrong results, not an error).
- w8a16, more rows (batched decode, prefill): that kernel's cost grows with the rows, so the
  int8 matrix is widened to bfloat16 for this one call (exact: int8 fits in bfloat16's
  mantissa) and a bfloat16 GEMM runs; it also beats the packed fp32 GEMM from 4 rows up.
- w8a8, any rows: activations quantized per token (or with the calibrated static scale), then
  `torch._int_mm` (int8 x int8 -> int32) and one rescale by both scales.

A device or shape without the kernel (checked by running it once at load), and per-group
scales anywhere but the CPU kernels, fall back to dequantizing on load: a float `Projection`,
with activations fake-quantized for w8a8 so the numbers match the scheme.
`quantized_projection` logs a warning then.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from common.errors import ModelConfigError
from worker.model.linear import ROUTE_BUCKETS, Projection
from worker.quant.scheme import QMAX, QuantConfig, Scheme

if TYPE_CHECKING:
    from worker.kernels.cpu import CpuKernels

log = logging.getLogger(__name__)

SMALL_M = 4
"""Most rows the w8a16 GEMV kernel serves: it reads the weights once per 4 rows, so above
that the widened bfloat16 GEMM wins (SmolLM2's layers, 2 threads: 8 rows 21 vs 20 ms,
16 rows 33 vs 24 ms; at 4 rows 12 vs 17 ms)."""
INT8_ROUTE_BUCKETS = (*ROUTE_BUCKETS, 256)
"""The row buckets of a w8a16 route: the float ones and a prefill bucket whose choice also
serves every call of more rows."""
_warned: set[str] = set()


class Int8Projection(ABC):
    """y = x (s * Wq)^T + b with Wq int8 [out, in] and s float32 [out] (per output channel),
    or [out, in / group] (per group of columns, CPU kernels only).

    The base of the two schemes' projections: the loader picks the subclass.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        self.qweight = qweight.contiguous()
        self.scale = scale.float().contiguous()
        self.bias = bias
        self.group = qweight.shape[1] * qweight.shape[0] // self.scale.numel()
        """Columns per scale: `in` when per channel."""

    @property
    def nbytes(self) -> int:
        """Bytes one call reads: the int8 matrix, its scales and the bias."""
        return (self.qweight.nbytes + self.scale.nbytes
                + (self.bias.nbytes if self.bias is not None else 0))

    @property
    def resident_bytes(self) -> int:
        """Bytes held in memory."""
        return self.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, in] -> [M, out] in x's dtype."""
        y = self._matmul(x).to(x.dtype)
        return y + self.bias if self.bias is not None else y

    @abstractmethod
    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, in] -> x W^T in float32 or the kernel's dtype."""


class W8A16Projection(Int8Projection):
    """int8 weights, bfloat16 activations."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None, kernels: CpuKernels | None = None) -> None:
        super().__init__(qweight, scale, bias)
        self._kernels = kernels if qweight.device.type == "cpu" else None
        if self._kernels is not None:
            self.qweight = self._kernels.on_hugepages(self.qweight)
        # the kernel's own scales are bfloat16; ones keep the float32 scales exact
        self._unit = torch.ones(qweight.shape[0], dtype=torch.bfloat16, device=qweight.device)
        self._routes: tuple[str, ...] | None = None

    @property
    def routable(self) -> bool:
        """Whether both candidates can serve it: the CPU kernels, and per-channel scales
        (torch's kernels take no groups)."""
        return self._kernels is not None and self.group == self.qweight.shape[1]

    def route(self, choices: tuple[str, ...] | None) -> None:
        """Take "kernel" or "torch" per INT8_ROUTE_BUCKETS bucket for float32 calls (None:
        the kernel for every call); the last bucket's choice also serves more rows."""
        if choices is not None:
            if len(choices) != len(INT8_ROUTE_BUCKETS):
                raise ValueError(f"a w8a16 route has {len(INT8_ROUTE_BUCKETS)} choices, "
                                 f"not {len(choices)}")
            if not self.routable:
                raise ValueError("a w8a16 route needs the compiled kernels and per-channel "
                                 "scales")
        self._routes = choices

    @property
    def resident_bytes(self) -> int:
        return self.nbytes + self._unit.nbytes

    def kernel_operand(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(int8 weight, per-row scales, bias) for the compiled decoder, or None without the
        kernels."""
        return (self.qweight, self.scale, self.bias) if self._kernels is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernels is not None and x.dtype == torch.float32:
            if self._routes is None:
                return self.run("kernel", x)
            b = min(bisect.bisect_left(INT8_ROUTE_BUCKETS, x.shape[0]), len(self._routes) - 1)
            return self.run(self._routes[b], x)
        return super().__call__(x)

    def run(self, choice: str, x: torch.Tensor) -> torch.Tensor:
        """float32 x through one implementation: "kernel" (npuserve's int8 kernel) or "torch"
        (F.linear on the weight widened to float32 for this call: the same products, so a
        route changes no result beyond float rounding)."""
        if choice == "kernel":
            assert self._kernels is not None
            return self._kernels.linear_int8(x.contiguous(), self.qweight, self.scale,
                                             self.group, self.bias)
        y = F.linear(x, self.qweight.float()).mul_(self.scale)
        return y + self.bias if self.bias is not None else y

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.group != self.qweight.shape[1]:
            raise ModelConfigError("per-group int8 scales run only on the CPU kernels in "
                                   "float32; load the model with them, or requantize per channel")
        m = x.shape[0]
        xb = x.to(torch.bfloat16)
        if m <= SMALL_M:
            y = torch._weight_int8pack_mm(xb, self.qweight, self._unit)  # [M, out] bfloat16
        else:
            y = F.linear(xb, self.qweight.to(torch.bfloat16))
        return y * self.scale  # float32 by type promotion


class W8A8Projection(Int8Projection):
    """int8 weights and activations: an int8 x int8 -> int32 GEMM, rescaled once."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 input_scale: float | None = None) -> None:
        """input_scale: the calibrated static activation scale; None quantizes per token."""
        super().__init__(qweight, scale, bias)
        self.input_scale = input_scale

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_rows(x, self.input_scale)  # [M, in] int8, [M, 1] float32
        y = _int_mm(xq, self.qweight.t()) * xs  # [M, out] float32 by type promotion
        return y.mul_(self.scale)


class FakeQuantInput:
    """The w8a8 fallback: a float projection whose input is quantized and dequantized first."""

    def __init__(self, inner: Projection, input_scale: float | None) -> None:
        self.inner = inner
        self.input_scale = input_scale

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    @property
    def resident_bytes(self) -> int:
        return self.inner.resident_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_rows(x, self.input_scale)
        return self.inner((xq.float() * xs).to(x.dtype))


def quantize_rows(x: torch.Tensor, static_scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, in] -> (int8 [M, in], float32 scales [M, 1]); per row unless a static scale."""
    if static_scale is None:
        scale = torch.linalg.vector_norm(x, math.inf, dim=1, keepdim=True, dtype=torch.float32)
        scale = scale.clamp_min_(1e-30).div_(QMAX)
        # |x| / scale <= 127 by construction, so no clamp is needed
        return torch.div(x, scale).round_().to(torch.int8), scale
    scale = torch.full((x.shape[0], 1), static_scale, device=x.device)
    return torch.div(x, scale).round_().clamp_(-QMAX, QMAX).to(torch.int8), scale


def dequantize(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] and scales [out] or [out, groups] -> float32 [out, in]."""
    out, cols = qweight.shape
    groups = scale.reshape(out, -1)
    w = qweight.float().view(out, groups.shape[1], -1) * groups.float()[:, :, None]
    return w.view(out, cols)


def _projection(scheme: Scheme, qweight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, input_scale: float | None,
                kernels: CpuKernels | None = None) -> Int8Projection:
    if scheme is Scheme.W8A8:
        return W8A8Projection(qweight, scale, bias, input_scale)
    return W8A16Projection(qweight, scale, bias, kernels)


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ [K, N] -> int32; CUDA's kernel wants more than 16 rows, so pad to 17."""
    m = a.shape[0]
    if a.device.type == "cuda" and m <= 16:
        return torch._int_mm(F.pad(a, (0, 0, 0, 17 - m)), b)[:m]
    return torch._int_mm(a, b)


@functools.lru_cache(maxsize=64)
def kernel_available(scheme: Scheme, out_features: int, in_features: int,
                     device: torch.device) -> bool:
    """Whether the scheme's int8 kernel runs on `device` for this shape: tried once on ones,
    because support differs by device, build and shape (and a wrong shape can crash rather
    than raise, so the known CPU limit is checked first)."""
    if scheme is Scheme.W8A16 and in_features % 16:
        return False
    probe = _projection(scheme, torch.ones(out_features, in_features, dtype=torch.int8,
                                           device=device), torch.ones(out_features, device=device),
                        None, None)
    try:
        y = probe(torch.ones(2, in_features, device=device)).float()
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(y, torch.full_like(y, float(in_features)), rtol=1e-2))


DeviceInt8 = Callable[[Scheme, torch.Tensor, torch.Tensor, "torch.Tensor | None", "float | None",
                       torch.dtype], "Int8Projection | None"]
"""An op set's own int8 projection (scheme, int8 weight, scales, bias, static input scale,
dtype), or None where it has none."""


def quantized_projection(
    quant: QuantConfig, get: Callable[[str], torch.Tensor], modules: list[str], bias: bool,
    dtype: torch.dtype, device: torch.device, kernels: CpuKernels | None = None,
    device_int8: DeviceInt8 | None = None,
) -> Int8Projection | FakeQuantInput | Projection:
    """The projection for HF `modules` (fused by stacking rows): the op set's own int8
    projection where it has one (`device_int8`, the NPU's), else int8 on a kernel path, else a
    float Projection dequantized on load (a warning says so)."""
    qweights, scales, input_scales = [], [], []
    for m in modules:
        w, s = get(m + ".weight"), get(m + ".weight_scale").float()
        if w.dtype != torch.int8 or w.dim() != 2:
            raise ModelConfigError(f"{m}.weight is {w.dtype} {list(w.shape)}; a quantized "
                                   "checkpoint stores int8 [out, in] (re-run npuserve quantize)")
        groups = w.shape[1] // quant.group_size if quant.group_size else 1
        if (quant.group_size and w.shape[1] % quant.group_size) or s.numel() != w.shape[0] * groups:
            raise ModelConfigError(f"{m}.weight_scale has shape {list(s.shape)}, expected "
                                   f"[{w.shape[0]}, {groups}] for group_size {quant.group_size}")
        qweights.append(w)
        scales.append(s.reshape(w.shape[0], groups))
        if quant.static_activations:
            input_scales.append(float(get(m + ".input_scale").float().max()))
    qweight = torch.cat(qweights).to(device)
    scale = torch.cat(scales).to(device)
    b = torch.cat([get(m + ".bias") for m in modules]).to(device, dtype) if bias else None
    # modules fused here read one input, so they share its scale; the largest is the safe one
    input_scale = max(input_scales) if input_scales else None
    if device_int8 is not None and (
            own := device_int8(quant.scheme, qweight, scale, b, input_scale, dtype)) is not None:
        return own
    out_features, in_features = qweight.shape
    grouped = scale.shape[1] > 1
    if (grouped and kernels is not None and quant.scheme is Scheme.W8A16
            and (in_features // scale.shape[1]) % 8 == 0):
        return W8A16Projection(qweight, scale, b, kernels)  # the CPU kernels read group scales
    if grouped:
        reason = f"per-group scales with {quant.scheme.value} without the CPU kernels"
    elif not kernel_available(quant.scheme, out_features, in_features, device):
        reason = f"{quant.scheme.value} [{out_features}, {in_features}] on {device}"
    else:
        return _projection(quant.scheme, qweight, scale[:, 0], b, input_scale, kernels)
    if reason not in _warned:
        _warned.add(reason)
        log.warning("no int8 kernel for %s: dequantizing those weights to %s on load "
                    "(same results, float memory and speed)", reason, dtype)
    proj = Projection(dequantize(qweight, scale).to(dtype), b)
    return FakeQuantInput(proj, input_scale) if quant.scheme is Scheme.W8A8 else proj
