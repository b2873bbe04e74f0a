"""Per-request generation settings, validated the same way by gateway and worker."""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20
"""Most alternatives a request may ask for per position (OpenAI's limit)."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request is decoded. Defaults follow vLLM's, so an unset field changes nothing."""

    max_tokens: int = 16
    """Upper bound on generated tokens (>= 1)."""
    temperature: float = 1.0
    """0 means greedy; otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling: smallest set whose probability mass reaches top_p, in (0, 1]."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's, in [0, 1]."""
    repetition_penalty: float = 1.0
    """HF/CTRL-style penalty on tokens of the prompt and the output; 1 disables, must be > 0."""
    presence_penalty: float = 0.0
    """OpenAI-style: subtracted once from every token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """OpenAI-style: subtracted per occurrence of a generated token, in [-2, 2]."""
    seed: int | None = None
    """Same seed + same prompt = same output, whatever else shares the batch."""
    stop: tuple[str, ...] = ()
    """Stop strings; the output ends before the first one and does not contain it. Applied to
    the text by the gateway's output processor: the engine, which deals in token ids, ignores
    them."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (the token itself is not part of the text)."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS token (benchmarks use this for fixed lengths)."""
    logprobs: bool = False
    """Return the log-probability of each chosen token."""
    top_logprobs: int = 0
    """With logprobs: also the this-many most likely tokens at each position, with their
    log-probabilities (0 to MAX_TOP_LOGPROBS)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequestError naming the first field that is out of range."""
        if self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        _finite_in("temperature", self.temperature, 0.0, math.inf)
        if self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0 (0 disables), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        _finite_in("min_p", self.min_p, 0.0, 1.0)
        if not (self.repetition_penalty > 0.0 and math.isfinite(self.repetition_penalty)):
            raise InvalidRequestError(
                "repetition_penalty", f"must be > 0 (1 disables), got {self.repetition_penalty}"
            )
        _finite_in("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _finite_in("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidRequestError("seed", f"must be in [0, 2^63), got {self.seed}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], "
                                      f"got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs", "needs logprobs: set logprobs too")
        for s in self.stop:
            if not s:
                raise InvalidRequestError("stop", "stop strings must be non-empty")
        if vocab_size is not None:
            for t in self.stop_token_ids:
                if not (0 <= t < vocab_size):
                    raise InvalidRequestError(
                        "stop_token_ids",
                        f"token id {t} is not in the model's vocabulary [0, {vocab_size})",
                    )


def _finite_in(name: str, value: float, lo: float, hi: float) -> None:
    if not (math.isfinite(value) and lo <= value <= hi):
        bounds = f"[{lo}, {hi}]" if math.isfinite(hi) else f">= {lo}"
        raise InvalidRequestError(name, f"must be {bounds}, got {value}")
