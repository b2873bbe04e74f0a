"""The synthetic backend's own settings. Kept apart from the backend so the CLIs (the
worker's, and `npuserve bench serve`) can list them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import InvalidRequestError

FIRST_ID = 256
"""Output ids start here: past the byte tokens of byte-level BPE vocabularies (Qwen) and the
special tokens at the start of others (SmolLM2's first 17), so the text is ordinary words."""


@dataclass(frozen=True, slots=True)
class SyntheticSettings:
    """The synthetic backend's step time and output vocabulary (flags prefixed so they stay
    apart from the real backends')."""

    synthetic_step_ms: float = 10.0
    """Synthetic backend (no model): milliseconds every engine step sleeps, whatever its
    batch, standing in for a device's step time."""
    synthetic_vocab: int = 4096
    """Synthetic backend (no model): output tokens are ids from 256 up to 256 + this (within
    the model's vocabulary, EOS ids skipped), a deterministic function of the previous token
    and the position."""

    synthetic_kv_tokens: int = 1 << 18
    """Synthetic backend (no model): tokens its KV cache holds (bookkeeping only, no
    memory): the scheduler preempts past it as on a device."""

    def __post_init__(self) -> None:
        if self.synthetic_step_ms < 0:
            raise InvalidRequestError("synthetic_step_ms", "must be >= 0")
        if self.synthetic_vocab < 1:
            raise InvalidRequestError("synthetic_vocab", "must be >= 1")
        if self.synthetic_kv_tokens < 1:
            raise InvalidRequestError("synthetic_kv_tokens", "must be >= 1")
