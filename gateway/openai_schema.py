"""The OpenAI-compatible request bodies, as pydantic models, and their GenerationInput.

Field names and meanings follow OpenAI's API reference; npuserve's own extensions (`top_k`,
`min_p`, `repetition_penalty`, `ignore_eos`, `priority`, `request_id`, `timeout`) sit beside
them, as vLLM's do. Parameters npuserve does not implement are refused with a message naming
them, never silently dropped: tools and functions, `response_format` other than text,
`logit_bias`, `echo`, `suffix`, `best_of` > 1, images and audio in messages. Fields no version
of the API defines are ignored (clients send vendor extras), and logged.

Ranges are checked once, by admission (common.sampling_params), whatever the front end.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common.errors import InvalidRequestError
from common.sampling_params import SamplingParams
from gateway.types import GenerationInput, PromptInput

MAX_CHOICES = 16
"""Most completions one request may ask for (`n`); each is a request of its own."""
_ROLES = {"system", "user", "assistant", "tool", "developer"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class StreamOptions(BaseModel):
    include_usage: bool = False
    """Send a last chunk with the usage of the whole request (and `usage: null` before)."""


class _Sampling(_Body):
    """What chat and text completions share."""

    model: str = ""
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    priority: int = 0
    """npuserve: 0 (lowest) to 9."""
    request_id: str = ""
    """npuserve: the request's id (Cancel, idempotency); generated when empty."""
    timeout: float | None = Field(default=None, gt=0)
    """npuserve: seconds the request may take in all (also the X-Request-Timeout header)."""

    def refuse_unsupported(self) -> None:
        if self.logit_bias:
            raise InvalidRequestError("logit_bias", "is not supported; leave it out")
        if self.n > MAX_CHOICES:
            raise InvalidRequestError("n", f"must be <= {MAX_CHOICES}, got {self.n}")

    def params(self, max_tokens: int | None, logprobs: bool, top_logprobs: int,
               choice: int) -> SamplingParams:
        """SamplingParams of choice `choice` (0-based): with a seed, choice i uses seed + i,
        so the n completions differ and each is reproducible."""
        d = SamplingParams()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens or 0,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_k=self.top_k or 0,
            top_p=d.top_p if self.top_p is None else self.top_p,
            min_p=self.min_p or 0.0,
            repetition_penalty=(d.repetition_penalty if self.repetition_penalty is None
                                else self.repetition_penalty),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=None if self.seed is None else self.seed + choice,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )

    def choice_ids(self, base: str) -> list[str]:
        """The request id of each choice: `base` (the client's id or a generated one),
        suffixed with the choice's index when n > 1."""
        return [base] if self.n == 1 else [f"{base}-{i}" for i in range(self.n)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        """The content as text: a string, or the concatenation of its text parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    f"messages[{index}].content", f"content parts of type {kind!r} are not "
                    "supported; send text (a string, or parts of type 'text')")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def generation_inputs(self, request_id: str) -> list[GenerationInput]:
        """One GenerationInput per choice (`request_id`: see choice_ids)."""
        self.refuse_unsupported()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise InvalidRequestError(name, "tool and function calling are not supported")
        if self.tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice", "tool calling is not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise InvalidRequestError("response_format", "only {'type': 'text'} is supported")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs", "needs logprobs: set logprobs to true")
        messages = []
        for i, m in enumerate(self.messages):
            if m.role not in _ROLES:
                raise InvalidRequestError(f"messages[{i}].role",
                                          f"must be one of {', '.join(sorted(_ROLES))}")
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": m.text(i)})
        max_tokens = self.max_completion_tokens or self.max_tokens
        return [GenerationInput(
            model=self.model, prompt=PromptInput(messages=messages),
            params=self.params(max_tokens, self.logprobs, self.top_logprobs or 0, i),
            priority=self.priority, request_id=rid)
            for i, rid in enumerate(self.choice_ids(request_id))]


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0)
    """Legacy form: return this many alternatives per token (0: only the chosen one)."""
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def generation_inputs(self, request_id: str) -> list[GenerationInput]:
        """One GenerationInput per choice (`request_id`: see choice_ids)."""
        self.refuse_unsupported()
        if self.echo:
            raise InvalidRequestError("echo", "is not supported; leave it false")
        if self.suffix:
            raise InvalidRequestError("suffix", "is not supported; leave it out")
        if self.best_of not in (None, 1):
            raise InvalidRequestError("best_of", "is not supported; use n")
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise InvalidRequestError("prompt", "one prompt per request: send a list of "
                                          "several prompts as several requests")
            prompt = prompt[0]
        one = (PromptInput(text=prompt) if isinstance(prompt, str)
               else PromptInput(token_ids=[int(t) for t in prompt]))  # type: ignore[arg-type]
        logprobs = self.logprobs is not None
        return [GenerationInput(
            model=self.model, prompt=one,
            params=self.params(self.max_tokens, logprobs, self.logprobs or 0, i),
            priority=self.priority, request_id=rid)
            for i, rid in enumerate(self.choice_ids(request_id))]


class TokenizeRequest(_Body):
    model: str = ""
    prompt: str | None = None
    messages: list[ChatMessage] | None = None

    def prompt_input(self) -> PromptInput:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("prompt", "send exactly one of prompt and messages")
        if self.prompt is not None:
            return PromptInput(text=self.prompt)
        return PromptInput(messages=[{"role": m.role, "content": m.text(i)}
                                     for i, m in enumerate(self.messages or [])])


class DetokenizeRequest(_Body):
    model: str = ""
    tokens: list[int]

