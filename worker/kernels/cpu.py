"""Typed entry points into the compiled CPU kernels, taking and returning tensors.

Callers guarantee the layouts (contiguous float32 on the CPU, int8 weights where named): the
backend decides once at load that a model runs on the kernels (`cpu_ops.supports`), and these
run hundreds of times per step, so they check nothing. Each is pinned against the PyTorch
operators it replaces by tests/worker/kernels.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch

from worker.kernels.build import load_library

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    "npu_linear_f32": (None, [_P, _I, _I, _P, _I, _P, _P]),
    "npu_linear_i8": (ctypes.c_int, [_P, _I, _I, _P, _P, _I, _I, _P, _P]),
    "npu_rms_norm": (None, [_P, _P, _F, _I, _I, _P]),
    "npu_add_rms_norm": (None, [_P, _P, _P, _F, _I, _I, _P]),
    "npu_silu_mul": (None, [_P, _I, _I, _P]),
    "npu_causal_softmax": (None, [_P, _I, _I, _I, _F]),
    "npu_qk_rope_store": (None, [_P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _F, _P, _P, _P, _I,
                                 _P]),
    "npu_advise_hugepages": (ctypes.c_int, [_P, _I]),
    "npu_decode_workspace": (ctypes.c_int64, [_P, _I]),
    "npu_decode_forward": (ctypes.c_int, [_P, _P]),
    "npu_decode_attention": (ctypes.c_int, [_P, _I, _I, _I, _I, _P, _I, _P, _I, _P, _I, _F,
                                            _P]),
}

HUGEPAGE_MIN_BYTES = 4 << 20
"""Smallest tensor worth moving onto huge pages (it must span at least one aligned 2 MiB)."""

MAX_HEAD_DIM = 256
"""Largest head_dim the kernels hold in registers and stack buffers."""


class CpuKernels:
    """The library's functions with their C signatures declared."""

    npu_linear_f32: Any
    npu_linear_i8: Any
    npu_rms_norm: Any
    npu_add_rms_norm: Any
    npu_silu_mul: Any
    npu_causal_softmax: Any
    npu_qk_rope_store: Any
    npu_advise_hugepages: Any
    npu_decode_workspace: Any
    npu_decode_forward: Any
    npu_decode_attention: Any

    def __init__(self, lib: ctypes.CDLL) -> None:
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)

    def on_hugepages(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of t in fresh memory advised for transparent huge pages (best effort: t
        itself when it is small)."""
        if t.nbytes < HUGEPAGE_MIN_BYTES:
            return t
        out = torch.empty_like(t, memory_format=torch.contiguous_format)
        self.npu_advise_hugepages(out.data_ptr(), out.nbytes)
        return out.copy_(t)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.Tensor:
        """x: [M, in] @ weight [out, in]^T (+ bias) -> [M, out]."""
        m, k = x.shape
        n = weight.shape[0]
        y = torch.empty(m, n)
        self.npu_linear_f32(x.data_ptr(), m, k, weight.data_ptr(), n,
                            bias.data_ptr() if bias is not None else None, y.data_ptr())
        return y

    def linear_int8(self, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    group: int, bias: torch.Tensor | None) -> torch.Tensor:
        """x: [M, in] @ (qweight int8 [out, in] * scale [out, in / group])^T (+ bias)."""
        m, k = x.shape
        n = qweight.shape[0]
        y = torch.empty(m, n)
        status = self.npu_linear_i8(x.data_ptr(), m, k, qweight.data_ptr(), scale.data_ptr(),
                                    group, n, bias.data_ptr() if bias is not None else None,
                                    y.data_ptr())
        if status != 0:
            raise MemoryError(f"int8 projection of {m} rows could not allocate its int16 copy")
        return y

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = torch.empty_like(x)
        self.npu_rms_norm(x.data_ptr(), weight.data_ptr(), eps, x.shape[0], x.shape[1],
                          out.data_ptr())
        return out

    def add_rms_norm(self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """residual += delta (in place); returns rms_norm(residual)."""
        out = torch.empty_like(residual)
        self.npu_add_rms_norm(residual.data_ptr(), delta.data_ptr(), weight.data_ptr(), eps,
                              residual.shape[0], residual.shape[1], out.data_ptr())
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        t, width = gate_up.shape
        out = torch.empty(t, width // 2)
        self.npu_silu_mul(gate_up.data_ptr(), t, width // 2, out.data_ptr())
        return out


@functools.lru_cache(maxsize=1)
def cpu_kernels() -> CpuKernels | None:
    """The process's kernels, compiled on first use; None where they cannot be built."""
    lib = load_library()
    return CpuKernels(lib) if lib is not None else None
