"""Typed entry points into the compiled CPU kernels, taking and returning tensors.

Callers guarantee the layouts (contiguous float32 on the CPU, int8 weights where named): the
backend decides once at load that a model runs on the kernels (`cpu_ops.supports`), and these
run hundreds of times per step, so they check nothing. Each is pinned against the PyTorch
operators it replaces by tests/worker/kernels.

Kernels that need scratch memory (the int8 projection's int16 copy of x, attention's scores
and partial results) take it from the caller: here one buffer per thread, which grows when a
call asks for more and is reused by every later call, so a steady stream of steps allocates
none.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from typing import Any

import torch

from worker.kernels import abi
from worker.kernels.build import load_library

log = logging.getLogger(__name__)

HUGEPAGE_MIN_BYTES = 4 << 20
"""Smallest tensor worth moving onto huge pages (it must span at least one aligned 2 MiB)."""

MAX_HEAD_DIM = 256
"""Largest head_dim the kernels hold in registers and stack buffers."""


class CpuKernels:
    """The library's functions with their C signatures declared (abi.SIGNATURES)."""

    cpuk_linear_f32: Any
    cpuk_linear_i8: Any
    cpuk_linear_bf16: Any
    cpuk_linear_f32_wbf16: Any
    cpuk_linear_wbf16_workspace: Any
    cpuk_rms_norm: Any
    cpuk_add_rms_norm: Any
    cpuk_silu_mul: Any
    cpuk_causal_softmax: Any
    cpuk_qk_rope_store: Any
    cpuk_advise_hugepages: Any
    cpuk_decode_attention: Any
    cpuk_decode_workspace: Any
    cpuk_decode_forward: Any

    cpuk_set_prefetch: Any
    cpuk_get_prefetch: Any
    cpuk_set_row_stream: Any
    cpuk_get_row_stream: Any
    cpuk_set_row_stream_i8: Any
    cpuk_get_row_stream_i8: Any
    cpuk_set_amx: Any
    cpuk_get_amx: Any
    cpuk_set_amx_i8_rows: Any
    cpuk_get_amx_i8_rows: Any
    cpuk_set_attention_parts: Any
    cpuk_get_attention_parts: Any
    cpuk_set_attention_prefetch: Any
    cpuk_get_attention_prefetch: Any
    cpuk_isa: Any
    cpuk_prefill_attention_takes: Any
    cpuk_prefill_attention: Any

    def __init__(self, lib: ctypes.CDLL) -> None:
        for name, fn in abi.bind(lib).items():
            setattr(self, name, fn)
        self._local = threading.local()
        self.build_id = os.path.basename(lib._name)
        """The compiled file's name, a digest of its sources, compiler and CPU."""

    @property
    def isa(self) -> str:
        """The vector extensions the kernels use on this machine, e.g. "avx512f avx2 fma"."""
        return self.cpuk_isa().decode().strip()

    def _with_scratch(self, fn: Any, *args: Any) -> None:
        """fn(*args, work, work_bytes) with this thread's scratch, grown (to at least double,
        so rarely) and called again when fn returns the bytes it needs."""
        work: torch.Tensor | None = getattr(self._local, "work", None)
        if work is None:
            work = self._local.work = torch.empty(0, dtype=torch.uint8)
        need = fn(*args, work.data_ptr(), work.nbytes)
        if need < 0:
            raise ValueError(f"{fn.__name__} does not take these arguments")
        if need:
            work = self._local.work = torch.empty(max(need, 2 * work.nbytes), dtype=torch.uint8)
            need = fn(*args, work.data_ptr(), work.nbytes)
            assert need == 0, f"{fn.__name__} asked for scratch twice"

    def on_hugepages(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of t in fresh memory advised for transparent huge pages (best effort: t
        itself when it is small)."""
        if t.nbytes < HUGEPAGE_MIN_BYTES:
            return t
        out = torch.empty_like(t, memory_format=torch.contiguous_format)
        self.cpuk_advise_hugepages(out.data_ptr(), out.nbytes)
        return out.copy_(t)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.Tensor:
        """x: [M, in] @ weight [out, in]^T (+ bias) -> [M, out]."""
        m, k = x.shape
        n = weight.shape[0]
        y = torch.empty(m, n)
        self.cpuk_linear_f32(x.data_ptr(), m, k, weight.data_ptr(), n,
                            bias.data_ptr() if bias is not None else None, y.data_ptr())
        return y

    def linear_bf16(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                    ) -> torch.Tensor:
        """bfloat16 x [M, in] @ weight [out, in]^T (+ bias) -> bfloat16 [M, out], summed in
        float32 and rounded once."""
        m, k = x.shape
        n = weight.shape[0]
        y = torch.empty(m, n, dtype=torch.bfloat16)
        self._with_scratch(self.cpuk_linear_bf16, x.data_ptr(), m, k, weight.data_ptr(), n,
                           bias.data_ptr() if bias is not None else None, y.data_ptr())
        return y

    def linear_f32_wbf16(self, x: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
        """float32 x [M, in] @ bfloat16 weight [out, in]^T (+ float32 bias) -> float32
        [M, out]: the one-call decode step's projection of a bfloat16 model."""
        m, k = x.shape
        n = weight.shape[0]
        y = torch.empty(m, n)
        self._with_scratch(self.cpuk_linear_f32_wbf16, x.data_ptr(), m, k, weight.data_ptr(),
                           n, bias.data_ptr() if bias is not None else None, y.data_ptr())
        return y

    def linear_int8(self, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    group: int, bias: torch.Tensor | None) -> torch.Tensor:
        """x: [M, in] @ (qweight int8 [out, in] * scale [out, in / group])^T (+ bias)."""
        m, k = x.shape
        n = qweight.shape[0]
        y = torch.empty(m, n)
        self._with_scratch(self.cpuk_linear_i8, x.data_ptr(), m, k, qweight.data_ptr(),
                           scale.data_ptr(), group, n,
                           bias.data_ptr() if bias is not None else None, y.data_ptr())
        return y

    def decode_attention(self, q: torch.Tensor, cache: torch.Tensor, block_size: int,
                         tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """q [n, heads, d] against one layer's paged cache [2, kv_heads, slots, d] (float32 or
        bfloat16), int32 block tables [n, max_blocks] and context lengths [n] -> [n, heads, d]."""
        n, heads, d = q.shape
        out = torch.empty_like(q)
        self._with_scratch(self.cpuk_decode_attention, q.data_ptr(), n, heads, cache.shape[1],
                           d, cache.data_ptr(), cache.dtype == torch.bfloat16, cache.shape[2],
                           tables.data_ptr(), tables.shape[1], lens.data_ptr(), block_size,
                           d**-0.5, out.data_ptr())
        return out

    def prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                          ) -> torch.Tensor | None:
        """q [t, heads, d], the last t positions of a context whose keys and values are k, v
        [kv_heads, context, d] -> [t, heads, d], causal, in float32; None when the kernel does
        not take this head_dim."""
        t, heads, d = q.shape
        kv_heads, context = k.shape[0], k.shape[1]
        if not self.cpuk_prefill_attention_takes(d):
            return None
        q, k, v = (x.float().contiguous() for x in (q, k, v))
        out = torch.empty_like(q)
        self._with_scratch(self.cpuk_prefill_attention, q.data_ptr(), t, heads, kv_heads, d,
                           k.data_ptr(), v.data_ptr(), context, d**-0.5, out.data_ptr())
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = torch.empty_like(x)
        self.cpuk_rms_norm(x.data_ptr(), weight.data_ptr(), eps, x.shape[0], x.shape[1],
                          out.data_ptr())
        return out

    def add_rms_norm(self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """residual += delta (in place); returns rms_norm(residual)."""
        out = torch.empty_like(residual)
        self.cpuk_add_rms_norm(residual.data_ptr(), delta.data_ptr(), weight.data_ptr(), eps,
                              residual.shape[0], residual.shape[1], out.data_ptr())
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        t, width = gate_up.shape
        out = torch.empty(t, width // 2)
        self.cpuk_silu_mul(gate_up.data_ptr(), t, width // 2, out.data_ptr())
        return out


@functools.lru_cache(maxsize=1)
def cpu_kernels() -> CpuKernels | None:
    """The process's kernels, compiled on first use; None (with a warning) where they cannot
    be built or the library's ABI is not the one abi.py mirrors."""
    lib = load_library()
    if lib is None:
        return None
    reason = abi.check(lib)
    if reason is not None:
        log.warning("CPU kernels refused, using PyTorch's ops (slower decode): %s", reason)
        return None
    return CpuKernels(lib)
