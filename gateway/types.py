"""The gateway's own request and response types: what convert.py turns protobuf into and back.

Nothing here knows about gRPC or Redis, so admission and generation are testable without
either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.capabilities import Capabilities
from common.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class PromptInput:
    """A prompt in exactly one of three forms; convert.py guarantees at most one is set."""

    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    """Chat messages ({role, content}), rendered with the model's chat template."""

    @property
    def field(self) -> str:
        """The request field the prompt came from, for error messages."""
        if self.messages is not None:
            return "messages"
        return "token_ids" if self.token_ids is not None else "text"


@dataclass(frozen=True, slots=True)
class GenerationInput:
    """One Generate or Chat call, before validation."""

    model: str
    prompt: PromptInput
    params: SamplingParams
    """max_tokens is the client's value: 0 means the gateway's default."""
    priority: int = 0
    request_id: str = ""


@dataclass(slots=True)
class Timings:
    """Milliseconds, on the last chunk of a stream."""

    queue_wait_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(slots=True)
class Chunk:
    """One message of a generation stream: a token (or text) delta, or the request's end."""

    request_id: str
    index: int
    """Position in the completion of the first of token_ids (the token count so far when the
    chunk carries no token)."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    """With logprobs: the text of each of token_ids on its own."""
    top_logprobs: list[list[tuple[int, float, str]]] = field(default_factory=list)
    """With top_logprobs: per token, the most likely (id, log-probability, text) there."""
    finish_reason: str = ""
    """stop, length, cancelled, deadline or error; set on the last chunk only."""
    stop_token: bool = False
    """The chunk's token is the stop token that ended the request (EOS or stop_token_ids):
    not part of the text."""
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: Timings | None = None
    """Set on the last chunk only."""


@dataclass(frozen=True, slots=True)
class TokenizeResult:
    """Token ids and, for each, the piece of the (rendered) input it covers."""

    token_ids: list[int]
    tokens: list[str]


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A live worker's registration (worker:{id})."""

    id: str
    model: str
    backend: str = ""
    device: str = ""
    capacity: int = 0
    running: int = 0
    max_len: int = 0
    capabilities: Capabilities = field(default_factory=Capabilities)
    draining: bool = False
    """Stopping: it finishes what it runs and claims nothing new."""


@dataclass(frozen=True, slots=True)
class ModelListing:
    """One served model as ListModels reports it."""

    name: str
    max_context: int
    workers: list[WorkerInfo]
    queued: int
