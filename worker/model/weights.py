"""Weights read straight from Hugging Face safetensors, fused for few large matmuls.

q/k/v become one [q+2kv, hidden] matrix and gate/up one [2*intermediate, hidden] matrix, so
a decoder layer is four projections: at batch 1 on a CPU each call costs fixed overhead and
memory bandwidth is used best by few large reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from common.errors import ModelConfigError
from worker.model.config import ModelConfig
from worker.model.linear import Projection, can_pack


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Projection  # hidden -> q + 2*kv
    q_norm: torch.Tensor | None  # [head_dim]
    k_norm: torch.Tensor | None  # [head_dim]
    o_proj: Projection  # q -> hidden
    post_norm: torch.Tensor  # [hidden]
    gate_up: Projection  # hidden -> 2*intermediate
    down: Projection  # intermediate -> hidden


@dataclass(slots=True)
class ModelWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: Projection  # hidden -> vocab; the embedding matrix again when tied

    def nbytes_per_decode_step(self) -> int:
        """Bytes a decode step must read: every layer, the final norm and the lm_head once."""
        total = self.norm.nbytes + self.lm_head.nbytes
        for layer in self.layers:
            for t in (layer.input_norm, layer.qkv, layer.q_norm, layer.k_norm, layer.o_proj,
                      layer.post_norm, layer.gate_up, layer.down):
                total += t.nbytes if t is not None else 0
        return total


class _TensorSource:
    """Name -> tensor over one or many safetensors shards."""

    def __init__(self, model_dir: Path) -> None:
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

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ModelConfigError(f"weight {name!r} is missing from the checkpoint")
        with safe_open(self._where[name], framework="pt") as f:
            return f.get_tensor(name)


def load_weights(
    model_dir: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device,
    pack: bool = True,
) -> ModelWeights:
    """pack: also keep oneDNN-packed copies of the projections on CPU (see linear.py)."""
    src = _TensorSource(Path(model_dir))
    pack = pack and can_pack(device)

    def proj(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Projection:
        return Projection(weight, bias, pack)

    def get(name: str) -> torch.Tensor:
        return src.get(name).to(device=device, dtype=dtype).contiguous()

    def cat(*names: str) -> torch.Tensor:
        return torch.cat([src.get(n) for n in names]).to(device=device, dtype=dtype).contiguous()

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        layers.append(
            LayerWeights(
                input_norm=get(p + "input_layernorm.weight"),
                qkv=proj(
                    cat(*(f"{attn}{x}_proj.weight" for x in "qkv")),
                    cat(*(f"{attn}{x}_proj.bias" for x in "qkv")) if config.qkv_bias else None,
                ),
                q_norm=get(attn + "q_norm.weight") if config.qk_norm else None,
                k_norm=get(attn + "k_norm.weight") if config.qk_norm else None,
                o_proj=proj(get(attn + "o_proj.weight")),
                post_norm=get(p + "post_attention_layernorm.weight"),
                gate_up=proj(cat(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")),
                down=proj(get(p + "mlp.down_proj.weight")),
            )
        )
    embed = get("model.embed_tokens.weight")
    tied = config.tie_word_embeddings or "lm_head.weight" not in src
    lm_head = proj(embed if tied else get("lm_head.weight"))
    return ModelWeights(embed=embed, layers=layers, norm=get("model.norm.weight"), lm_head=lm_head)
