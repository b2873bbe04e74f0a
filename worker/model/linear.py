"""A projection y = x W^T + b, routed to the fastest CPU GEMM for the number of rows.

With the compiled kernels, the machine's dispatch table (worker/kernels/dispatch.py, timed
once per CPU) routes each row bucket of each shape; rows past its buckets, and every call
without a table, follow the built-in rule below.

The built-in rule, measured on SmolLM2's shapes on 2-core AVX2 x86 machines (fp32, 2
threads):
- up to KERNEL_ROWS rows (decode), with the compiled CPU kernels (float32): npuserve's
  GEMV/small GEMM (worker/kernels/csrc/linear.c), which streams each weight from memory once
  at close to bandwidth; without them, `mm(W, x^T)` with one row padded to two for one or
  two rows (about 2x F.linear, which MKL runs far below bandwidth at one row);
- more rows (prefill, and decode without the kernels): oneDNN's linear over a weight prepacked
  once at load time, which stays bandwidth-bound where MKL's F.linear is not: at 8-16 rows the
  lm_head takes 4-5 ms against 15-17 ms, at 17-64 rows every layer shape is 1.1-2x
  faster, and a 512-row prefill chunk is 20% faster on a Zen 4 (even on an AVX2 Zen 3).
The packed copy doubles weight memory on CPU, so it can be turned off (`pack` False); then
F.linear serves the larger calls. Other devices use F.linear throughout.

bfloat16 weights on the CPU (`--dtype bfloat16`): with the compiled kernels, npuserve's kernel
widens them to float32 in registers and so streams half of float32's bytes, or multiplies
them on AMX tiles. The dispatch table routes them too, over BF16_ROUTE_BUCKETS (its last
bucket's choice serves every larger call, prefill included). Without a table, how many rows
the kernel serves before a GEMM takes over depends on how the CPU multiplies bfloat16
(`bf16_kernel_rows`): with AMX, up to AMX_KERNEL_ROWS, and with AVX512-BF16 alone up to
BF16_KERNEL_ROWS, then oneDNN's bfloat16 GEMM; without native bfloat16, up to KERNEL_ROWS,
then PyTorch's float32 GEMM on x and W widened for the call (`_widened_linear`), and no packed
copy is kept: oneDNN's bfloat16 GEMM then ran 2.5-3x slower than the kernel at 8-512 rows
(SmolLM2's shapes on an AVX2 Zen 3, 2 threads), and the kernel, whose widening costs
arithmetic where prefill is bound by it, 1.2-1.4x slower than the widened GEMM at 512 rows
(an AVX-512 Xeon without AVX512-BF16; they tied at 128).
With the kernels a bfloat16 model's activations are float32 throughout, on every CPU (the
kernels' op set, worker/kernels/cpu_ops.py), so every call takes float32 x: the kernel rounds
it to bfloat16 where it multiplies on AMX tiles or with vdpbf16ps, and oneDNN's bfloat16 GEMM
takes it rounded and returns its result widened. Without the kernels, x is bfloat16.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from worker.kernels.cpu import CpuKernels

ROUTE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
"""The row buckets of a route (worker/kernels/dispatch_table.BUCKETS)."""

BF16_ROUTE_BUCKETS = (*ROUTE_BUCKETS, 128, 512)
"""The row buckets of a bfloat16 route: the float ones, then prefill sizes, the last one's
choice serving every call of more rows (on AMX the kernel's tiles tied oneDNN at 128 rows and
lost to it at 256 and 512)."""

PACK_BATCH_HINT = 64
"""Batch size oneDNN chooses the packed layout for; it serves 3-512 rows well."""

BF16_KERNEL_ROWS = 8
"""Most rows the bfloat16 kernel serves: on a 2-core Zen 4 with AVX512-BF16, SmolLM2's layers
took 8.8-11.9 / 9.4-9.9 / 11.7-12.0 / 13.3 ms at 1 / 2 / 4 / 8 rows against oneDNN's packed
GEMM's 12.3-13.3 / 13.3 / 11.1-11.6 / 12.5, and 17.6-18.0 against 15.7 at 16."""

AMX_KERNEL_ROWS = 128
"""Most rows the bfloat16 kernel serves on AMX tiles: on a 2-core Xeon with AMX, SmolLM2's
layers (bfloat16 x, each call allocating its output) took 8.6-8.8 / 8.6-9.1 / 13.7 / 20.8 /
31.1 / 59.8 ms at 8 / 16 / 64 / 128 / 256 / 512 rows against oneDNN's packed GEMM's 11.0 /
11.4 / 14.7 / 20.9 / 28.5 / 57.1 (also on AMX)."""

KERNEL_ROWS = 16
"""Most rows the compiled kernel serves (a decode batch): it prefetches the weights it streams
and beats the packed GEMM there (SmolLM2 decode steps, 2 threads: 8 rows 39 vs 53 ms, 16 rows
73 vs 75 ms); prefill chunks are compute-bound and the packed GEMM's blocking wins."""


def bf16_kernel_rows(kernels: CpuKernels) -> int:
    """Most rows of a bfloat16 projection the kernel serves on this CPU without a table."""
    isa = kernels.isa.split()
    if "amxbf16" in isa:
        return AMX_KERNEL_ROWS
    if "avx512bf16" in isa:  # oneDNN multiplies bfloat16 natively too
        return BF16_KERNEL_ROWS
    return KERNEL_ROWS


def native_bf16(kernels: CpuKernels) -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16, AMX), so that oneDNN's
    bfloat16 GEMM (and its packed copy) can serve prefill."""
    return bool({"amxbf16", "avx512bf16"} & set(kernels.isa.split()))


def can_pack(device: torch.device) -> bool:
    return device.type == "cpu" and torch.backends.mkldnn.is_available()


class Projection:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 pack: bool = False, kernels: CpuKernels | None = None,
                 prefill: bool = True) -> None:
        """weight: [out, in] as stored in Hugging Face checkpoints; pack only on CPU; kernels
        only for float32 or bfloat16 weights on the CPU; prefill False for a projection that
        serving calls with at most a step's sampled rows (the lm_head), whose route then has
        no prefill buckets to time."""
        self.weight = weight.contiguous()
        self.bias = bias
        self._cpu = weight.device.type == "cpu"
        self._kernels = kernels if weight.dtype == torch.float32 else None
        """The float32 kernel (routes, the built-in rule, the one-call decode step)."""
        self._bf16_kernels = kernels if weight.dtype == torch.bfloat16 else None
        self._bf16_rows = (0 if self._bf16_kernels is None
                           else bf16_kernel_rows(self._bf16_kernels))
        """Most rows the bfloat16 kernel serves without a table (0: none)."""
        self._bias_f32 = bias.float() if bias is not None else None
        """The bias as a float32 product takes it (the bias itself where it is float32)."""
        self._widen = self._bf16_kernels is not None and not native_bf16(self._bf16_kernels)
        """bfloat16 without native bfloat16: the GEMM past the kernel is PyTorch's float32 one
        on W widened, and no call reads a packed copy, so none is kept."""
        self._packed = _packed(self.weight) if pack and not self._widen else None
        self._routes: tuple[str, ...] | None = None
        self.route_buckets = (BF16_ROUTE_BUCKETS if self._bf16_kernels is not None and prefill
                              else ROUTE_BUCKETS)
        """The row buckets of a route; a bfloat16 route's last one serves every larger call,
        a float32 route's none (calls of more rows keep the built-in rule)."""

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype of x in serving's calls: float32 with the kernels (their op set's
        activations), the weight's otherwise."""
        return torch.float32 if self._bf16_kernels is not None else self.weight.dtype

    @property
    def packed(self) -> bool:
        """Whether oneDNN's packed copy is kept (the `onednn` route can run)."""
        return self._packed is not None

    def route(self, choices: tuple[str, ...] | None) -> None:
        """Take one of "kernel", "onednn", "torch" per bucket of route_buckets (None: the
        built-in rule)."""
        if choices is not None:
            if len(choices) != len(self.route_buckets):
                raise ValueError(f"a route has {len(self.route_buckets)} choices, "
                                 f"not {len(choices)}")
            if "kernel" in choices and self._kernels is None and self._bf16_kernels is None:
                raise ValueError("the kernel route needs the compiled kernels")
            if "onednn" in choices and self._packed is None:
                raise ValueError("the onednn route needs the packed weight")
        self._routes = choices

    @property
    def nbytes(self) -> int:
        """Bytes one call reads (the packed copy is an alternative, not an addition)."""
        return self.weight.nbytes + (self.bias.nbytes if self.bias is not None else 0)

    @property
    def resident_bytes(self) -> int:
        """Bytes held in memory, the packed copy included."""
        extra = self._packed.nbytes if self._packed is not None else 0
        return self.nbytes + extra

    def kernel_operand(self) -> tuple[torch.Tensor, None, torch.Tensor | None] | None:
        """(weight, no scales, float32 bias) for the compiled decoder (float32 or bfloat16
        weights), or None without the kernels."""
        if self._kernels is None and self._bf16_kernels is None:
            return None
        return self.weight, None, self._bias_f32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, in] -> [M, out]."""
        m = x.shape[0]
        if self._routes is not None and (m <= ROUTE_BUCKETS[-1] or self._bf16_kernels is not None):
            b = min(bisect.bisect_left(self.route_buckets, m), len(self._routes) - 1)
            return self.run(self._routes[b], x)
        if m <= self._bf16_rows:
            return self.run("kernel", x)
        if self._bf16_kernels is not None:
            return self.run("onednn" if self._packed is not None else "torch", x)
        if self._kernels is not None and m <= KERNEL_ROWS:
            return self._kernels.linear(x.contiguous(), self.weight, self.bias)
        if self._cpu and m <= 2:
            xs = torch.cat([x, x]) if m == 1 else x  # a real [2, in] copy, not a broadcast
            y = torch.mm(self.weight, xs.t()).t()[:m]  # [M, out], strided
            return y + self.bias if self.bias is not None else y.contiguous()
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def run(self, choice: str, x: torch.Tensor) -> torch.Tensor:
        """x through one GEMM: "kernel", "onednn" (the packed weight; float32 x over bfloat16
        weights rounded for it, the result widened) or "torch" (F.linear; in float32,
        `_widened_linear`, for bfloat16 weights under float32 x or on a CPU without native
        bfloat16)."""
        if choice == "kernel":
            if self._bf16_kernels is not None and x.dtype == torch.float32:
                return self._bf16_kernels.linear_f32_wbf16(x.contiguous(), self.weight,
                                                           self._bias_f32)
            if self._bf16_kernels is not None:
                return self._bf16_kernels.linear_bf16(x.contiguous(), self.weight, self.bias)
            assert self._kernels is not None
            return self._kernels.linear(x.contiguous(), self.weight, self.bias)
        if choice == "onednn":
            if x.dtype != self.weight.dtype:
                y = torch.ops.mkldnn._linear_pointwise(x.to(self.weight.dtype), self._packed,
                                                       self.bias, "none", [], "")
                return y.to(x.dtype)
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        if self._widen or x.dtype != self.weight.dtype:
            return _widened_linear(x, self.weight, self._bias_f32)
        return F.linear(x, self.weight, self.bias)


def _widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                    ) -> torch.Tensor:
    """F.linear of a bfloat16 weight in float32, widened for the call, x in float32 and a
    float32 bias (a bfloat16 x widened too, and the result rounded back once): the same exact
    products, float32 sums. On a CPU without native bfloat16, PyTorch's bfloat16 GEMM runs far
    below its float32 one: on an AVX-512 Xeon without AVX512-BF16, SmolLM2's 3072x576 at 64 /
    128 / 512 rows took 1.4 / 2.1 / 6.4 ms widened against 4.0 / 7.5 / 29.4 in bfloat16 (and
    1.1 / 2.1 / 9.4 on the kernel, which widens each tile's weights once); widening the weight
    costs a fraction of a prefill chunk's arithmetic."""
    y = F.linear(x.float(), weight.float(), bias)
    return y.to(x.dtype)


def _packed(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's packed copy of weight, or None where oneDNN has no kernel for its dtype on this
    CPU (bfloat16 needs AVX-512 or AVX-NE-CONVERT); F.linear then serves those calls."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
    except RuntimeError:
        return None
