"""Typed settings, validated on construction. The only module that reads the environment."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import InvalidRequestError

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How a worker's engine runs one model on one device."""

    device: str = "cpu"
    """cpu, cuda[:N] or npu[:N] (Ascend, through torch_npu)."""
    dtype: str = "float32"
    """Compute and weight dtype: float32, bfloat16 or float16."""
    max_num_seqs: int = 16
    """Most requests in the running batch."""
    max_num_batched_tokens: int = 512
    """Token budget of one step (decodes + prefill chunks): bounds how long a step can stall
    running streams when a long prompt arrives."""
    block_size: int = 16
    """Tokens per KV cache block."""
    kv_cache_gb: float | None = None
    """KV cache size in GiB; None sizes it from kv_cache_fraction of free memory."""
    kv_cache_fraction: float = 0.3
    """Share of free device memory for the KV cache when kv_cache_gb is not set."""
    max_model_len: int | None = None
    """Cap on prompt + completion tokens; None means the model's context length."""
    threads: int | None = None
    """CPU threads for torch; None keeps torch's default."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise InvalidRequestError("dtype", f"must be one of {', '.join(_DTYPES)}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(name, "must be >= 1")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise InvalidRequestError("kv_cache_gb", "must be > 0")
        if not 0 < self.kv_cache_fraction <= 1:
            raise InvalidRequestError("kv_cache_fraction", "must be in (0, 1]")
