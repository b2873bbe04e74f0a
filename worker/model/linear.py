"""A projection y = x W^T + b, routed to the fastest CPU GEMM form for the batch size.

Weights stay in the checkpoint's [out, in] layout. On CPU, MKL's fp32 GEMM is slow when the
activation matrix has few rows (M = 2..64: decode steps) and is the left operand, as in
F.linear: measured on SmolLM2's shapes, `mm(W, x^T)` is 3-7x faster there (the lm_head at
M=2: 3 ms against 21 ms). At M = 1 that product degenerates into a slower GEMV, so one row is
padded to two, which beats every single-row form (2x over F.linear). Past M = 64 (prefill
chunks) F.linear is the faster again. Other devices use F.linear throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMALL_BATCH = 64
"""Largest M sent through mm(W, x^T) on CPU."""


class Projection:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """weight: [out, in] as stored in Hugging Face checkpoints."""
        self.weight = weight.contiguous()
        self.bias = bias
        self._cpu = weight.device.type == "cpu"

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (self.bias.nbytes if self.bias is not None else 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, in] -> [M, out]."""
        m = x.shape[0]
        if not self._cpu or m > SMALL_BATCH:
            return F.linear(x, self.weight, self.bias)
        xs = torch.cat([x, x]) if m == 1 else x  # [max(M, 2), in], a real copy
        y = torch.mm(self.weight, xs.t()).t()[:m]  # [M, out], strided
        if self.bias is not None:
            return y + self.bias
        return y.contiguous()
