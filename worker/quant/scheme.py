"""The quantization section of config.json: what `npuserve quantize` wrote and the loader reads.

    "quantization_config": {
      "quant_method": "npuserve_int8", "format_version": 1,
      "scheme": "w8a16", "method": "absmax", "group_size": 0,
      "activations": null, "lm_head": false, "embeddings": false
    }

Tensors, in Hugging Face naming, for every quantized linear module `M` (all seven projections
of every decoder layer, plus `lm_head` when `lm_head` is true):

- `M.weight`: int8 [out, in], symmetric, values in [-127, 127];
- `M.weight_scale`: float32 [out] (per output channel) or [out, in // group_size];
- `M.input_scale`: float32 [1], only for w8a8 with static activations.

`model.embed_tokens` follows the same layout when `embeddings` is true. Biases, norms and
unquantized tensors keep the source checkpoint's dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum, StrEnum
from typing import Any, TypeVar

from common.errors import ModelConfigError

QUANT_METHOD = "npuserve_int8"
"""The `quant_method` value of checkpoints this package writes."""
FORMAT_VERSION = 1
"""Bump when the tensor layout changes; the loader refuses versions it does not know."""
QMAX = 127
"""Largest int8 magnitude used; -128 is left out so the range is symmetric."""

_E = TypeVar("_E", bound=Enum)


class Scheme(StrEnum):
    W8A16 = "w8a16"
    """int8 weights, 16-bit (bfloat16) activations."""
    W8A8 = "w8a8"
    """int8 weights and int8 activations (an int8 x int8 -> int32 GEMM)."""


class Method(StrEnum):
    """How a static activation scale is chosen from calibration statistics (weights always
    use their absmax; see ranges.py)."""

    ABSMAX = "absmax"
    """The largest magnitude: nothing is clipped."""
    PERCENTILE = "percentile"
    """A high percentile of the magnitudes: rare outliers are clipped."""
    KL = "kl"
    """The threshold whose int8 histogram is closest in KL divergence to the original one."""


class Activations(StrEnum):
    DYNAMIC = "dynamic"
    """A scale per token, computed from that token's largest magnitude at run time."""
    STATIC = "static"
    """One calibrated scale per layer input, from `--calib` prompts."""


@dataclass(frozen=True, slots=True)
class QuantConfig:
    """A validated quantization section."""

    scheme: Scheme
    method: Method = Method.ABSMAX
    group_size: int = 0
    """Input columns sharing one weight scale; 0 means one scale per output channel."""
    activations: Activations | None = None
    """How activations are quantized; None for w8a16, which keeps them in 16 bits."""
    lm_head: bool = False
    """Whether the output projection is int8 too (it is the largest matrix of small models)."""
    embeddings: bool = False
    """Whether the embedding table is stored in int8 (dequantized when loaded)."""

    def __post_init__(self) -> None:
        if self.group_size < 0:
            raise ModelConfigError("quantization_config.group_size must be >= 0 (0: per channel)")
        if self.scheme is Scheme.W8A8 and self.activations is None:
            raise ModelConfigError("quantization_config.activations must be 'dynamic' or "
                                   "'static' for scheme w8a8")
        if self.scheme is Scheme.W8A16 and self.activations is not None:
            raise ModelConfigError("quantization_config.activations must be null for w8a16, "
                                   "which keeps activations in 16 bits")
        if self.method is not Method.ABSMAX and not self.static_activations:
            raise ModelConfigError("quantization_config.method applies to static activations "
                                   "only; weights and dynamic activations use absmax")

    @property
    def static_activations(self) -> bool:
        return self.activations is Activations.STATIC

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored under `quantization_config`."""
        body = {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()}
        return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, **body}

    @classmethod
    def from_dict(cls, raw: object) -> QuantConfig:
        """Validate a `quantization_config` object; raises ModelConfigError naming the field."""
        if not isinstance(raw, dict):
            raise ModelConfigError("quantization_config must be a JSON object")
        method = raw.get("quant_method")
        if method != QUANT_METHOD:
            raise ModelConfigError(
                f"quantization_config.quant_method {method!r} is not supported; npuserve loads "
                f"int8 checkpoints written by `npuserve quantize` ({QUANT_METHOD!r})")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelConfigError(
                f"quantization_config.format_version {version!r} is not supported (expected "
                f"{FORMAT_VERSION}); re-run `npuserve quantize` with this version")
        known = {"quant_method", "format_version", *cls.__dataclass_fields__}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ModelConfigError(f"quantization_config has unknown keys {unknown}; "
                                   f"known: {sorted(known)}")
        group = raw.get("group_size", 0)
        if not isinstance(group, int) or isinstance(group, bool):
            raise ModelConfigError(f"quantization_config.group_size must be an integer, "
                                   f"got {group!r}")
        activations = raw.get("activations")
        return cls(
            scheme=_enum(Scheme, raw.get("scheme"), "scheme"),
            method=_enum(Method, raw.get("method", "absmax"), "method"),
            group_size=group,
            activations=None if activations is None else _enum(Activations, activations,
                                                                 "activations"),
            lm_head=_flag(raw, "lm_head"),
            embeddings=_flag(raw, "embeddings"),
        )


def _enum(kind: type[_E], value: object, field: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(repr(e.value) for e in kind)
        raise ModelConfigError(f"quantization_config.{field} {value!r} is not one of "
                               f"{choices}") from None


def _flag(raw: dict[str, Any], field: str) -> bool:
    value = raw.get(field, False)
    if not isinstance(value, bool):
        raise ModelConfigError(f"quantization_config.{field} must be true or false, "
                               f"got {value!r}")
    return value
