"""int8 projections on Ascend NPUs through torch_npu's quantized matmuls.

- w8a16 (int8 weights, 16-bit activations; per channel or per group of columns):
  `npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None,
  quant_scale=None, quant_offset=None, bias=None, antiquant_group_size=0)` with the weight
  [in, out] and the scales [out] (per channel) or [in / group, out] (per group);
- w8a8 (int8 weights and activations): the activations quantized per token by
  `npu_dynamic_quant(x) -> (x_int8, scale [M])`, or by a calibrated static scale with
  `npu_quantize(x, 1 / scale, None, torch.qint8, -1, False)`, then
  `npu_quant_matmul(x_int8, weight, scale, offset=None, pertoken_scale=None, bias=None,
  output_dtype=...)` with the weight [in, out] and the dequantization scales [out]
  (float32, or for a float16 output their bits in int64).

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
                 bias: torch.Tensor | None, input_scale: float | None,
                 dtype: torch.dtype) -> None:
        super().__init__(qweight, scale, bias)
        self.npu = npu
        self.weight_t = self.qweight.t().contiguous()  # [in, out]
        self.input_scale = input_scale
        channel = self.scale.reshape(-1).float()  # w8a8 scales are per output channel
        if input_scale is None:  # per token: the kernel multiplies both scales itself
            self.deq_scale = channel
        else:
            self.inverse = torch.tensor([1.0 / input_scale], dtype=dtype, device=qweight.device)
            self.deq_scale = deq_scale_for(channel * input_scale, dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is None:
            xq, pertoken = self.npu.npu_dynamic_quant(x)
        else:
            xq = self.npu.npu_quantize(x, self.inverse, None, torch.qint8, -1, False)
            pertoken = None
        return self.npu.npu_quant_matmul(  # type: ignore[no-any-return]
            xq, self.weight_t, self.deq_scale, pertoken_scale=pertoken, output_dtype=x.dtype)


def deq_scale_for(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """npu_quant_matmul's dequantization scale: float32 for a bfloat16 (or float32) output;
    for a float16 output, the float32 bits in the low half of an int64 (what
    torch_npu.npu_trans_quant_param makes, and how msmodelslim stores deq_scale)."""
    if dtype is not torch.float16:
        return scale.float()
    return scale.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
