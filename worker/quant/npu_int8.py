"""int8 projections on Ascend NPUs through torch_npu's quantized matmuls.

- w8a16 (int8 weights, 16-bit activations; per channel or per group of columns):
  `npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None,
  quant_scale=None, quant_offset=None, bias=None, antiquant_group_size=0)` with the weight
  [in, out] and the scales [out] (per channel) or [in / group, out] (per group);
- w8a8 (int8 weights and activations): the activations quantized per token by
  `npu_dynamic_quant(x) -> (x_int8, scale [M])`, or by a calibrated static scale with
  `npu_quantize(x, 1 / scale, None, torch.qint8, -1, False)`, then
  `npu_quant_matmul(x_int8, weight, scale, offset=None, pertoken_scale=None, bias=None,
  output_dtype=...)` with the weight [in, out] and the weight scales [out].

The bias is added after the kernel (Int8Projection.__call__). The op set
(`worker.model.npu_ops.NpuOps`) builds them from the same int8 tensors the loader
reads for every backend, so an npuserve or msmodelslim int8 checkpoint runs on the NPU as is.
"""

from __future__ import annotations

from types import ModuleType

import torch

from worker.quant.int8_linear import Int8Projection


class NpuW8A16Projection(Int8Projection):
    def __init__(self, npu: ModuleType, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__(qweight, scale, bias)
        self.npu = npu
        self.weight_t = self.qweight.t().contiguous()  # [in, out]
        groups = self.scale.reshape(qweight.shape[0], -1)  # [out, groups]
        self.antiquant_scale = (groups[:, 0] if groups.shape[1] == 1
                                else groups.t()).contiguous().to(dtype)
        self.group_size = 0 if groups.shape[1] == 1 else self.group

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.npu.npu_weight_quant_batchmatmul(  # type: ignore[no-any-return]
            x, self.weight_t, self.antiquant_scale, antiquant_group_size=self.group_size)


class NpuW8A8Projection(Int8Projection):
    def __init__(self, npu: ModuleType, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None, input_scale: float | None) -> None:
        super().__init__(qweight, scale, bias)
        self.npu = npu
        self.weight_t = self.qweight.t().contiguous()  # [in, out]
        self.input_scale = input_scale

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        channel = self.scale.reshape(-1)  # w8a8 scales are per output channel
        if self.input_scale is None:
            xq, token_scale = self.npu.npu_dynamic_quant(x)
            scale, pertoken = channel, token_scale
        else:
            inverse = torch.tensor([1.0 / self.input_scale], dtype=x.dtype, device=x.device)
            xq = self.npu.npu_quantize(x, inverse, None, torch.qint8, -1, False)
            scale, pertoken = channel * self.input_scale, None
        return self.npu.npu_quant_matmul(  # type: ignore[no-any-return]
            xq, self.weight_t, scale, pertoken_scale=pertoken, output_dtype=x.dtype)
