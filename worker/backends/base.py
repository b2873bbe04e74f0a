"""The narrow interface between the engine and a device.

A backend declares its capacity so the scheduler can fit work to it, and executes one step:
a list of token chunks, each a request's next tokens with its KV block table. It returns
either logits for the chunks that end a sequence (the engine samples) or, for devices that
sample on chip, the token ids themselves. Nothing here imports torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from common.capabilities import Capabilities
from common.sampling_params import SamplingParams
from worker.model.config import ModelConfig


class OutputKind(StrEnum):
    LOGITS = "logits"
    TOKENS = "tokens"


@dataclass(frozen=True, slots=True)
class BackendCapacity:
    max_batch: int
    """Most sequences in one step (for a pool of batch-1 instances: the pool size)."""
    max_seq_len: int
    """Longest prompt + completion one request may reach."""
    max_tokens_per_step: int
    """Token budget of one step, prefill chunks and decodes together."""
    block_size: int
    """Tokens per KV block; a slot-per-request device uses block_size == max_seq_len."""
    num_blocks: int
    """KV blocks available in all."""
    chunked_prefill: bool = True
    """Whether a prompt may be prefilled over several steps."""
    mixed_batches: bool = True
    """Whether prefill chunks and decodes may share one step."""
    output: OutputKind = OutputKind.LOGITS
    one_call_tokens: int = 0
    """Most tokens of a step the backend runs as one call (the CPU kernels' one-call step,
    which takes short prefill chunks beside the decodes too); 0: none. A capped prefill keeps
    a step that decodes within it, since leaving it costs more than the tokens."""
    prefill_stall: float = 0.0
    """The engine's max_prefill_stall when none is set: LATENCY_PREFILL_STALL where the cap
    was measured to keep streams' gaps short at little cost (the torch backend on a CPU with
    AVX-512), 0 (off) elsewhere. The cap's estimate takes a mixed step's extra time as
    proportional to its prefill tokens; where a step's fixed costs dominate (an
    accelerator's launches), that is untested and could shrink the cap to a token a step."""
    prefix_caching: bool = False
    """Whether requests may share the cached KV blocks of a common prefix: needs a paged
    cache read through block tables and a prefill that can start after cached context (a
    backend sets it from EngineConfig.enable_prefix_caching where it can, else leaves it
    False)."""


@dataclass(slots=True)
class SequenceChunk:
    """One request's share of a step."""

    request_id: str
    token_ids: list[int]
    """The tokens to feed now."""
    start_pos: int
    """Position of token_ids[0] in the sequence (tokens before it are cached)."""
    block_table: list[int]
    """KV blocks owned by the request, in order."""
    sample: bool
    """True when the chunk reaches the sequence's end, so a next token is produced."""
    params: SamplingParams
    """Used only by backends that sample on the device."""

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.start_pos > 0


@dataclass(slots=True)
class StepResult:
    """Outputs for the chunks with sample=True, in the order they appear in the step."""

    logits: Any | None = None
    """[n, vocab] float32 tensor when the backend's output is LOGITS."""
    token_ids: list[int] | None = None
    """Sampled ids when the backend's output is TOKENS."""
    failed: dict[str, str] = field(default_factory=dict)
    """Requests whose device call failed this step -> what failed. They have no output row
    (rows above are for the others), and the backend already reset what they held."""


@dataclass(frozen=True, slots=True)
class DeviceStats:
    """One reading of an accelerator's own counters (for the worker's metrics)."""

    memory_total_bytes: int
    memory_used_bytes: int
    utilization: float
    """Busy fraction of the compute units, 0..1, as the vendor's driver reports it."""
    temperature_c: float | None = None
    """The chip's temperature, where the driver reports one."""


class Backend(ABC):
    """One device (or pool of devices) running one model."""

    name: str = ""
    capacity: BackendCapacity
    capabilities: Capabilities = Capabilities()
    """Sampling parameters it honours; the engine refuses requests setting any other."""
    model_config: ModelConfig
    device: Any = "cpu"
    """Where the backend runs; its str() is what the worker's registration shows."""

    @property
    def logits_device(self) -> Any:
        """Where `execute` returns logits: the engine samples, and keeps each request's
        generator, there."""
        return self.device

    @abstractmethod
    def execute(self, chunks: Sequence[SequenceChunk]) -> StepResult:
        """Run the model over the chunks and write their keys/values to the cache."""

    @abstractmethod
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (for bandwidth floors and metrics)."""

    def weight_memory_bytes(self) -> int:
        """Bytes the weights hold in device or host memory (copies kept for speed included)."""
        return self.weight_bytes()

    def kv_cache_bytes(self) -> int:
        """Bytes of memory the KV cache holds."""
        return 0

    def device_stats(self) -> DeviceStats | None:
        """The device's memory and utilisation now, where its driver reports them."""
        return None

    def close(self) -> None:  # noqa: B027 -- optional hook, no-op by default
        """Release what the backend holds outside this process (a simulator, a device)."""

    def release(self, request_id: str) -> None:  # noqa: B027 -- optional hook, no-op by default
        """Called when a request leaves the device (finished, aborted or preempted)."""
