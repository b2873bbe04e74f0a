"""Checkpoints quantized by Huawei's msmodelslim (the format MindIE and vllm-ascend load),
read by npuserve on every backend, and written by `npuserve quantize --format msmodelslim`.

A directory holds the model's config.json, `quant_model_description*.json` (tensor name ->
"W8A8" | "W8A16" | "FLOAT", plus "model_quant_type") and the tensors, per quantized linear
module M:

- W8A16: `M.weight` int8 [out, in], `M.weight_scale` and `M.weight_offset` [out, 1] (the
  weight is (weight - offset) * scale); the float `M.bias` where the model has one;
- W8A8_DYNAMIC: the same weight tensors and a float bias (activations quantized per token
  at run time);
- W8A8 (static activations): the same weight tensors, and `M.input_scale`, `M.input_offset`
  [1] (x_q = round(x / input_scale + input_offset)), `M.deq_scale` [out] (input_scale *
  weight_scale; float32, or its bits in int64 for float16 models) and `M.quant_bias` int32
  [out], so that the NPU computes y = (x_q @ weight^T + quant_bias) * deq_scale; hence
  quant_bias = round(bias / deq_scale) - input_offset * weight.sum(1).

On the NPU these feed torch_npu's quant matmuls. Elsewhere npuserve runs every quantized
module as int8 weights with per-channel scales and 16-bit activations (its w8a16 path): the
weights are exactly msmodelslim's, and the float bias of a W8A8 module is recovered from
quant_bias. Weights with a non-zero offset (asymmetric) are refused: re-quantize with
symmetric weights (msmodelslim's w_sym=True, its default for these schemes).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.errors import ModelConfigError
from worker.quant.scheme import QMAX, QuantConfig, Scheme

DESCRIPTION_GLOB = "quant_model_description*.json"
SCHEMES = ("W8A8", "W8A8_DYNAMIC", "W8A16")
"""Quantization types npuserve reads (W8A8_DYNAMIC: per-token activations at run time, so
only the weight tensors); it writes W8A8 and W8A16."""
WRITTEN = ("W8A8", "W8A16")


def read_description(model_dir: str | Path) -> dict[str, str] | None:
    """The checkpoint's msmodelslim description, or None when it is not such a checkpoint."""
    found = sorted(Path(model_dir).glob(DESCRIPTION_GLOB))
    if not found:
        return None
    description: dict[str, str] = json.loads(found[0].read_text())
    kind = description.get("model_quant_type", "")
    if kind not in SCHEMES:
        raise ModelConfigError(f"{found[0].name}: model_quant_type {kind!r} is not supported; "
                               f"npuserve reads msmodelslim {' and '.join(SCHEMES)} checkpoints")
    return description


def quant_config(description: dict[str, str]) -> QuantConfig:
    """How npuserve runs the checkpoint off the NPU: int8 weights, 16-bit activations."""
    return QuantConfig(Scheme.W8A16, lm_head=description.get("lm_head.weight") in SCHEMES)


class MsModelSlimTensors:
    """A tensor getter that answers in npuserve's int8 layout (`M.weight_scale` [out] float32)
    over an msmodelslim checkpoint's tensors."""

    def __init__(self, get: Callable[[str], torch.Tensor], description: dict[str, str]) -> None:
        self._get = get
        self.description = description

    def quantized(self, module: str) -> bool:
        return self.description.get(module + ".weight") in SCHEMES

    def __call__(self, name: str) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        if leaf == "weight_scale" and self.quantized(module):
            offset = self._get(module + ".weight_offset")
            if offset.abs().max() != 0:
                raise ModelConfigError(
                    f"{module}: asymmetric int8 weights (weight_offset != 0) are not supported; "
                    "quantize with symmetric weights (w_sym=True)")
            return self._get(name).float().reshape(-1)
        if leaf == "bias" and self.description.get(module + ".weight") == "W8A8":
            return self._w8a8_bias(module)
        return self._get(name)

    def _w8a8_bias(self, module: str) -> torch.Tensor:
        """The float bias folded into quant_bias (with the input offset's correction)."""
        weight = self._get(module + ".weight").long()
        offset = self._get(module + ".input_offset").float().reshape(())
        deq = _deq_scale(self._get(module + ".deq_scale"))
        quant_bias = self._get(module + ".quant_bias").double()
        return ((quant_bias + offset.double() * weight.sum(1).double()) * deq.double()).float()


def _deq_scale(raw: torch.Tensor) -> torch.Tensor:
    """deq_scale as float32: stored so for bfloat16 models, as float32 bits in int64 for
    float16 ones (the layout torch_npu's quant matmul takes)."""
    if raw.dtype == torch.int64:
        return (raw & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    return raw.float()


def write(src: str | Path, out: str | Path, scheme: str, *,
          input_ranges: dict[str, tuple[float, float]] | None = None) -> Path:
    """Quantize checkpoint `src` into msmodelslim's layout at `out`: every decoder projection
    (symmetric per-channel int8 weights), lm_head and embeddings kept float. For W8A8,
    `input_ranges` gives each module's calibrated input (min, max); unset modules use
    (-1, 1)."""
    from safetensors.torch import save_file

    from worker.model.config import ModelConfig
    from worker.model.weights import TensorSource
    from worker.quant.quantize import quantize_tensor

    if scheme not in WRITTEN:
        raise ModelConfigError(f"msmodelslim scheme {scheme!r}: choose one of {WRITTEN}")
    src, out = Path(src), Path(out)
    config = ModelConfig.from_dir(src)
    if config.quantization is not None:
        raise ModelConfigError(f"{src} is already quantized; quantize its float source")
    source = TensorSource(src)
    names = source.names()
    projections = {n[:-len(".weight")] for n in names if n.endswith("_proj.weight")
                   and ".layers." in n}
    tensors: dict[str, torch.Tensor] = {}
    description: dict[str, Any] = {"model_quant_type": scheme}
    dtype = getattr(torch, config.torch_dtype, torch.bfloat16)
    per_channel = QuantConfig(Scheme.W8A16)
    for name in names:
        module = name.rpartition(".")[0]
        if module not in projections:
            tensors[name] = source.get(name)
            description[name] = "FLOAT"
            continue
        if not name.endswith(".weight"):
            continue  # a projection's bias: folded below
        float_weight = source.get(name).float()
        qweight, scale = quantize_tensor(float_weight, per_channel)
        out_features = qweight.shape[0]
        tensors[name] = qweight
        tensors[module + ".weight_scale"] = scale.reshape(out_features, 1).to(dtype)
        tensors[module + ".weight_offset"] = torch.zeros(out_features, 1, dtype=dtype)
        description[name] = scheme
        bias = source.get(module + ".bias").float() if module + ".bias" in source else None
        if scheme == "W8A16":
            if bias is not None:
                tensors[module + ".bias"] = bias.to(dtype)
            continue
        low, high = (input_ranges or {}).get(module, (-1.0, 1.0))
        input_scale = max(high - low, 1e-8) / (2 * QMAX + 1)
        input_offset = round(-128 - low / input_scale)
        deq = (input_scale * scale.float()).float()
        folded = torch.round((bias if bias is not None else torch.zeros(out_features)) / deq)
        tensors[module + ".input_scale"] = torch.tensor([input_scale], dtype=dtype)
        tensors[module + ".input_offset"] = torch.tensor([input_offset], dtype=torch.int8)
        tensors[module + ".deq_scale"] = deq
        tensors[module + ".quant_bias"] = (
            folded - input_offset * qweight.long().sum(1)).to(torch.int32)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(out / f"quant_model_weight_{scheme.lower()}.safetensors"))
    (out / f"quant_model_description_{scheme.lower()}.json").write_text(
        json.dumps(description, indent=1) + "\n")
    raw = json.loads((src / "config.json").read_text())
    raw["quantize"] = scheme.lower()  # what MindIE reads
    (out / "config.json").write_text(json.dumps(raw, indent=1) + "\n")
    for extra in src.iterdir():
        if extra.name not in ("config.json",) and extra.suffix in (".json", ".txt", ".model") \
                and not extra.name.endswith(".index.json"):
            (out / extra.name).write_bytes(extra.read_bytes())
    return out


def static_ranges(npuserve_int8: str | Path) -> dict[str, tuple[float, float]]:
    """Each module's input range from an npuserve w8a8 checkpoint with static activations
    (symmetric: +-input_scale * 127), to write the same calibration in msmodelslim's layout."""
    from safetensors import safe_open

    ranges: dict[str, tuple[float, float]] = {}
    for path in sorted(Path(npuserve_int8).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name.endswith(".input_scale"):
                    bound = float(f.get_tensor(name).float().max()) * QMAX
                    ranges[name[:-len(".input_scale")]] = (-bound, bound)
    return ranges
