"""A request and all its per-request state. Only the scheduler changes `status`."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

from common.sampling_params import SamplingParams


class RequestStatus(IntEnum):
    """Ordered so that `status >= FINISHED_STOPPED` means finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


class FinishReason(StrEnum):
    STOP = "stop"
    """EOS or a stop token (stop strings are the gateway's)."""
    LENGTH = "length"
    """max_tokens or the model's context reached."""
    CANCELLED = "cancelled"


_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.CANCELLED,
}


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    """Ids that end the request unless params.ignore_eos (stop_token_ids always end it)."""
    max_len: int
    """prompt + completion may not exceed this (the model's usable context)."""
    token_ids: list[int] = field(init=False)
    """Prompt followed by every generated token."""
    num_computed_tokens: int = 0
    """Tokens whose keys/values are in the cache."""
    block_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    """Tokens found in the prefix cache at the latest admission, so not computed."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Prefix-cache hashes of the full blocks of token_ids, computed as they are needed."""
    num_registered_blocks: int = 0
    """Leading blocks of block_ids already offered to the prefix cache (found there at
    admission, or registered once full)."""
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    arrival_step: int = 0
    """The scheduler's count of steps when the request was added."""
    first_token_step: int | None = None
    """The scheduler's count of steps when the request's first token was sampled."""
    generator: Any = None
    """The request's own random generator (a torch.Generator), made by the engine."""

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def finish_reason(self) -> FinishReason | None:
        return _REASONS.get(self.status)
