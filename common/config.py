"""Typed settings, validated on construction. The only module that reads the environment."""

from __future__ import annotations

import argparse
import os
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
    """KV cache size in GiB; None sizes it from kv_cache_fraction of free memory. Either way
    it is capped at what max_num_seqs sequences of the full context length can use."""
    kv_cache_fraction: float = 0.3
    """Share of free device memory for the KV cache when kv_cache_gb is not set."""
    max_model_len: int | None = None
    """Cap on prompt + completion tokens; None means the model's context length."""
    threads: int | None = None
    """CPU threads for torch; None keeps torch's default."""
    cpu_packed_weights: bool = True
    """On CPU, keep a oneDNN-packed second copy of each projection for steps of 3+ tokens:
    2-3x faster batched decode, 20% faster prefill, twice the weight memory."""
    cpu_kernels: bool = True
    """On CPU in float32, run decode-time projections, attention and the elementwise steps
    with npuserve's C kernels (compiled for the machine on first use; needs a C compiler,
    else PyTorch's ops run with a warning). False uses PyTorch's ops throughout."""

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


def env(name: str, default: str) -> str:
    """NPUSERVE_<name> from the environment, else default: CLI flags take their defaults here."""
    return os.environ.get(f"NPUSERVE_{name}", default)


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    """Redis URL (redis://[:password@]host:port/db, or rediss:// for TLS)."""
    prefix: str = "npuserve:"
    """Prefix of every key, so several deployments can share one Redis."""

    @staticmethod
    def add_flags(parser: argparse.ArgumentParser) -> None:
        """--redis and --prefix, shared by every process that talks to the queue."""
        defaults = RedisConfig()
        parser.add_argument("--redis", default=env("REDIS_URL", defaults.url),
                            help="Redis URL (default: %(default)s) [NPUSERVE_REDIS_URL]")
        parser.add_argument("--prefix", default=env("REDIS_PREFIX", defaults.prefix),
                            help="prefix of every Redis key (default: %(default)s) "
                                 "[NPUSERVE_REDIS_PREFIX]")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RedisConfig:
        return cls(url=args.redis, prefix=args.prefix)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    redis: RedisConfig = RedisConfig()
    listen: str = "0.0.0.0:50051"
    """host:port the gRPC server binds."""
    gateway_id: str = ""
    """Name of this gateway's reply stream; empty picks a unique one at start."""
    max_queued_per_model: int = 1024
    """Queue bound per model; beyond it Generate fails with RESOURCE_EXHAUSTED."""
    max_streams: int = 512
    """Concurrent Generate/Chat streams this gateway serves; beyond it RESOURCE_EXHAUSTED."""
    default_max_tokens: int = 256
    """max_tokens when a request leaves it at 0."""
    max_tokens_limit: int = 8192
    """Largest max_tokens a request may ask for."""
    request_ttl_s: int = 3600
    """Lifetime of a request's keys in Redis when nothing else removes them."""
    metrics_port: int = 0
    """Prometheus /metrics port; 0 disables."""

    def __post_init__(self) -> None:
        for name in ("max_queued_per_model", "max_streams", "default_max_tokens",
                     "max_tokens_limit", "request_ttl_s"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(name, "must be >= 1")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    model_dir: str
    """Hugging Face model directory to serve."""
    model_name: str = ""
    """Name clients use in `model`; empty uses the directory's name."""
    backend: str = "torch"
    engine: EngineConfig = EngineConfig()
    redis: RedisConfig = RedisConfig()
    worker_id: str = ""
    """Empty picks host-pid-random."""
    lease_ms: int = 15000
    """A claimed request goes back to the queue if its worker does not renew within this."""
    heartbeat_s: float = 2.0
    """Registration refresh period; the registration expires after three missed beats."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: time to finish running requests before handing the rest back."""
    metrics_port: int = 0
    """Prometheus /metrics port; 0 disables."""

    def __post_init__(self) -> None:
        if self.lease_ms < 1000:
            raise InvalidRequestError("lease_ms", "must be >= 1000")
        if self.heartbeat_s <= 0 or self.drain_timeout_s < 0:
            raise InvalidRequestError("heartbeat_s", "heartbeat must be > 0, drain >= 0")
