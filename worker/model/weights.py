"""Weights read straight from Hugging Face safetensors, fused for few large matmuls.

q/k/v become one [q+2kv, hidden] matrix and gate/up one [2*intermediate, hidden] matrix, so
a decoder layer is four projections: at batch 1 on a CPU each call costs fixed overhead and
memory bandwidth is used best by few large reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from common.errors import ModelConfigError
from worker.model.config import ModelConfig
from worker.model.linear import Projection, can_pack
from worker.model.sharding import Shard
from worker.quant.int8_linear import (
    DeviceInt8,
    FakeQuantInput,
    Int8Projection,
    dequantize,
    quantized_projection,
)
from worker.quant.msmodelslim import SCHEMES, MsModelSlimTensors, read_description

if TYPE_CHECKING:
    from worker.kernels.cpu import CpuKernels

AnyProjection = Projection | Int8Projection | FakeQuantInput
"""A float projection or one of its int8 siblings (same call, nbytes and resident_bytes)."""


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: AnyProjection  # hidden -> q + 2*kv
    q_norm: torch.Tensor | None  # [head_dim]
    k_norm: torch.Tensor | None  # [head_dim]
    o_proj: AnyProjection  # q -> hidden
    post_norm: torch.Tensor  # [hidden]
    gate_up: AnyProjection  # hidden -> 2*intermediate
    down: AnyProjection  # intermediate -> hidden


@dataclass(slots=True)
class ModelWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: AnyProjection  # hidden -> vocab; the embedding matrix again when tied
    vocab_rows: slice | None = None
    """Under tensor parallelism, the vocabulary rows embed and lm_head hold (None: all)."""

    def nbytes_per_decode_step(self) -> int:
        """Bytes a decode step must read: every layer, the final norm and the lm_head once."""
        total = self.norm.nbytes + self.lm_head.nbytes
        for layer in self.layers:
            for t in (layer.input_norm, layer.qkv, layer.q_norm, layer.k_norm, layer.o_proj,
                      layer.post_norm, layer.gate_up, layer.down):
                total += t.nbytes if t is not None else 0
        return total

    def resident_bytes(self) -> int:
        """Bytes the weights hold in memory: packed copies included, a tied matrix once."""
        total = self.embed.nbytes + self.norm.nbytes + self.lm_head.resident_bytes
        weight = getattr(self.lm_head, "weight", None)
        if weight is not None and weight.data_ptr() == self.embed.data_ptr():
            total -= self.embed.nbytes
        for layer in self.layers:
            for t in (layer.input_norm, layer.q_norm, layer.k_norm, layer.post_norm):
                total += t.nbytes if t is not None else 0
            for proj in (layer.qkv, layer.o_proj, layer.gate_up, layer.down):
                total += proj.resident_bytes
        return total


class TensorSource:
    """Name -> tensor over one or many safetensors files (a tensor-parallel rank's part of it
    when a Shard is given)."""

    def __init__(self, model_dir: Path, config: ModelConfig | None = None,
                 shard: Shard | None = None) -> None:
        self._config, self._shard = config, shard
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = [p.name for p in sorted(model_dir.glob("*.safetensors"))]
        if not files:
            raise ModelConfigError(f"{model_dir} holds no .safetensors weights")
        self._where: dict[str, Path] = {}
        for name in files:
            with safe_open(model_dir / name, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    self._where[key] = model_dir / name

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        """Every tensor of the checkpoint, sorted."""
        return sorted(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ModelConfigError(f"weight {name!r} is missing from the checkpoint")
        with safe_open(self._where[name], framework="pt") as f:
            if self._shard is None or self._config is None:
                return f.get_tensor(name)
            return self._shard.select(name, f.get_tensor(name), self._config).contiguous()


def load_weights(
    model_dir: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device,
    pack: bool = True, kernels: CpuKernels | None = None, shard: Shard | None = None,
    device_int8: DeviceInt8 | None = None, norm_dtype: torch.dtype | None = None,
) -> ModelWeights:
    """pack: also keep oneDNN-packed copies of the projections on CPU; kernels: the compiled
    CPU kernels for decode-time projections, float32 or bfloat16 on the CPU (see linear.py;
    int8 ones take them in float32 only); shard:
    load only a tensor-parallel rank's part (`config` is the whole model's); norm_dtype: the
    norms' weights in the dtype of the activations they scale, where it is not `dtype`."""
    src = TensorSource(Path(model_dir), config if shard is not None else None, shard)
    pack = pack and can_pack(device)
    quant = config.quantization
    description = read_description(model_dir) if quant is not None else None
    tensor: Callable[[str], torch.Tensor] = (
        MsModelSlimTensors(src.get, description) if description is not None else src.get)

    def proj(modules: list[str], bias: bool = False) -> AnyProjection:
        """One projection over HF `modules`, fused by stacking their rows."""
        kept_float = description is not None and not all(
            description.get(m + ".weight") in SCHEMES for m in modules)
        if quant is not None and not kept_float:
            return quantized_projection(quant, tensor, modules, bias, dtype, device,
                                        kernels if dtype == torch.float32 else None,
                                        device_int8)
        weight = cat(*(m + ".weight" for m in modules))
        return Projection(weight, cat(*(m + ".bias" for m in modules)) if bias else None, pack,
                          kernels)

    def place(t: torch.Tensor, as_dtype: torch.dtype = dtype) -> torch.Tensor:
        t = t.to(device=device, dtype=as_dtype).contiguous()
        return kernels.on_hugepages(t) if kernels is not None else t

    def get(name: str) -> torch.Tensor:
        return place(src.get(name))

    def norm(name: str) -> torch.Tensor:
        return place(src.get(name), norm_dtype or dtype)

    def cat(*names: str) -> torch.Tensor:
        if len(names) == 1:
            return get(names[0])
        return place(torch.cat([src.get(n) for n in names]))

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        layers.append(
            LayerWeights(
                input_norm=norm(p + "input_layernorm.weight"),
                qkv=proj([f"{attn}{x}_proj" for x in "qkv"], bias=config.qkv_bias),
                q_norm=norm(attn + "q_norm.weight") if config.qk_norm else None,
                k_norm=norm(attn + "k_norm.weight") if config.qk_norm else None,
                o_proj=proj([attn + "o_proj"]),
                post_norm=norm(p + "post_attention_layernorm.weight"),
                gate_up=proj([p + "mlp.gate_proj", p + "mlp.up_proj"]),
                down=proj([p + "mlp.down_proj"]),
            )
        )
    if quant is not None and quant.embeddings:
        # F.embedding needs a float table, so an int8 one only saves disk space
        embed = dequantize(src.get("model.embed_tokens.weight"),
                           src.get("model.embed_tokens.weight_scale")).to(device, dtype)
    else:
        embed = get("model.embed_tokens.weight")
    if quant is not None and quant.lm_head:
        lm_head = proj(["lm_head"])
    else:
        tied = config.tie_word_embeddings or "lm_head.weight" not in src
        # serving asks it for the rows a step samples; only teacher-forced passes ask more
        lm_head = Projection(embed if tied else get("lm_head.weight"), None, pack, kernels,
                             prefill=False)
    return ModelWeights(embed=embed, layers=layers, norm=norm("model.norm.weight"), lm_head=lm_head,
                        vocab_rows=shard.vocab_rows(config.vocab_size) if shard else None)
