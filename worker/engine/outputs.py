"""What the engine hands back: one event per generated token, and whole completions."""

from __future__ import annotations

from dataclasses import dataclass

from worker.engine.request import FinishReason


@dataclass(slots=True)
class TokenEvent:
    request_id: str
    index: int
    """Position of the token in the completion, from 0: the exactly-once key downstream."""
    token_id: int
    logprob: float | None
    finish_reason: FinishReason | None
    """Set on the request's last event; STOP means this token is EOS or a stop token."""
    top_logprobs: list[tuple[int, float]] | None = None
    """With top_logprobs: the most likely (token id, log-probability) at this position."""


@dataclass(slots=True)
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[float] | None
