"""The subset of a Hugging Face config.json that the forward pass needs, validated once."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ModelConfigError
from worker.quant.msmodelslim import quant_config, read_description
from worker.quant.scheme import QuantConfig

# model_type -> (q/k/v projections carry a bias, per-head q/k RMSNorm)
_ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "llama": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    """One of llama, qwen2, qwen3."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    """Fewer than num_attention_heads means grouped-query attention."""
    head_dim: int
    """Qwen3 sets it explicitly; otherwise hidden_size // num_attention_heads."""
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    """None for plain RoPE; linear or llama3 scaling parameters otherwise."""
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]
    torch_dtype: str
    """The dtype the checkpoint was saved in (float32, bfloat16, float16)."""
    quantization: QuantConfig | None = None
    """The int8 layout written by `npuserve quantize`; None for a float checkpoint."""

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"{model_dir} has no config.json; is it a model directory?")
        raw = json.loads(path.read_text())
        generation = Path(model_dir) / "generation_config.json"
        gen_raw = json.loads(generation.read_text()) if generation.is_file() else {}
        config = cls.from_dict(raw, gen_raw)
        if config.quantization is None and (described := read_description(model_dir)):
            return dataclasses.replace(config, quantization=quant_config(described))
        return config

    @classmethod
    def from_dict(cls, raw: dict[str, Any],
                  generation: dict[str, Any] | None = None) -> ModelConfig:
        model_type = raw.get("model_type", "")
        if model_type not in _ARCHITECTURES:
            raise ModelConfigError(
                f"model_type {model_type!r} is not supported; npuserve runs "
                f"{', '.join(sorted(_ARCHITECTURES))}"
            )
        qkv_bias, qk_norm = _ARCHITECTURES[model_type]
        if model_type == "llama" and raw.get("attention_bias"):
            qkv_bias = True
        if raw.get("mlp_bias"):
            raise ModelConfigError("mlp_bias=true is not supported")
        heads = int(raw["num_attention_heads"])
        rope_theta, rope_scaling = _rope(raw)
        eos: list[int] = []
        for source in (raw, generation or {}):
            value = source.get("eos_token_id")
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, int) and item not in eos:
                    eos.append(item)
        return cls(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            eos_token_ids=tuple(eos),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            quantization=(QuantConfig.from_dict(raw["quantization_config"])
                          if raw.get("quantization_config") is not None else None),
        )


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Theta and scaling from either the classic keys or transformers 5's rope_parameters."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    merged = {**params, **scaling}
    theta = float(merged.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if rope_type not in _ROPE_TYPES:
        raise ModelConfigError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    if "factor" not in merged:
        raise ModelConfigError(f"rope_scaling of type {rope_type!r} needs a 'factor'")
    return theta, {**merged, "rope_type": rope_type}
