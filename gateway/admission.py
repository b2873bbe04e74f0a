"""Admission: validate every field of a request, tokenize it, and enforce the gateway's limits.

Each rejection names the request field (as spelled in the proto) and says what to change.
Tokenization and chat templates are CPU work; `prepare` and `tokenize` are plain functions
the caller runs off the event loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.capabilities import unsupported
from common.errors import InvalidRequestError, ResourceExhaustedError
from common.keys import MAX_PRIORITY
from common.sampling_params import SamplingParams
from gateway.models import ModelMeta
from gateway.types import GenerationInput, PromptInput, TokenizeResult, WorkerInfo
from preprocess.control_tokens import encode_chat, encode_text, spells_control_token
from preprocess.tokenizer import render_chat

MAX_REQUEST_ID_LEN = 128
_SAMPLING_FIELDS = frozenset({"temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                              "presence_penalty", "frequency_penalty", "seed"})


@dataclass(frozen=True, slots=True)
class Limits:
    """The gateway's per-request limits (from GatewayConfig): they bound what one request
    can cost the gateway before a worker sees it (stop strings are matched against every
    token's text)."""

    default_max_tokens: int = 256
    max_tokens_limit: int = 8192
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_stop_token_ids: int = 256
    max_prompt_bytes: int = 2 << 20
    max_chat_messages: int = 1024
    allow_special_tokens: bool = False
    """Let prompt text and chat contents spell control tokens (trusted callers only)."""

    @classmethod
    def from_config(cls, config: Any) -> Limits:
        """The limits a GatewayConfig sets (its fields of the same names)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True, slots=True)
class Admitted:
    """A validated request: its prompt ids and its final sampling parameters."""

    prompt_ids: list[int]
    params: SamplingParams


def check_fields(inp: GenerationInput, limits: Limits) -> None:
    """Checks that need no model: priority, request_id, max_tokens bound, sampling ranges."""
    if not 0 <= inp.priority <= MAX_PRIORITY:
        raise InvalidRequestError("priority", f"must be in [0, {MAX_PRIORITY}], got {inp.priority}")
    check_request_id(inp.request_id)
    if inp.params.max_tokens > limits.max_tokens_limit:
        raise InvalidRequestError(
            "max_tokens", f"must be <= {limits.max_tokens_limit} (the gateway's "
            f"--max-tokens-limit), got {inp.params.max_tokens}")
    stop, stop_ids = inp.params.stop, inp.params.stop_token_ids
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequestError("stop", f"{len(stop)} stop strings; at most "
                                  f"{limits.max_stop_strings} (the gateway's --max-stop-strings)")
    if (longest := max((len(s) for s in stop), default=0)) > limits.max_stop_chars:
        raise InvalidRequestError("stop", f"a stop string of {longest} characters; at most "
                                  f"{limits.max_stop_chars} (the gateway's --max-stop-chars)")
    if len(stop_ids) > limits.max_stop_token_ids:
        raise InvalidRequestError("stop_token_ids", f"{len(stop_ids)} ids; at most "
                                  f"{limits.max_stop_token_ids} (the gateway's "
                                  "--max-stop-token-ids)")
    check_prompt_size(inp.prompt, limits)
    # max_tokens 0 means "the default", which is checked once the prompt length is known.
    _validate_params(dataclasses.replace(inp.params, max_tokens=1), None)


def check_prompt_size(prompt: PromptInput, limits: Limits) -> None:
    """Bounds on the prompt's size before it is tokenized: its UTF-8 bytes (text, or all the
    chat contents) and its number of chat messages."""
    if prompt.messages is not None:
        if len(prompt.messages) > limits.max_chat_messages:
            raise InvalidRequestError(
                "messages", f"{len(prompt.messages)} messages; at most "
                f"{limits.max_chat_messages} (the gateway's --max-chat-messages)")
        size = sum(len(str(m.get("content", "")).encode()) for m in prompt.messages)
    elif prompt.text is not None:
        size = len(prompt.text.encode())
    else:
        return
    if size > limits.max_prompt_bytes:
        raise InvalidRequestError(
            prompt.field, f"the prompt is {size} bytes of text; at most "
            f"{limits.max_prompt_bytes} (the gateway's --max-prompt-bytes)")


def check_request_id(request_id: str) -> None:
    """A client-chosen id: at most 128 printable ASCII characters, no whitespace."""
    if len(request_id) > MAX_REQUEST_ID_LEN or not all(
        "!" <= c <= "~" for c in request_id
    ):
        raise InvalidRequestError(
            "request_id", f"must be at most {MAX_REQUEST_ID_LEN} printable ASCII characters "
            "without spaces (or empty, to let the gateway pick one)")


def prepare(inp: GenerationInput, meta: ModelMeta, tokenizer: Any, limits: Limits) -> Admitted:
    """Validate `inp` against the model, tokenize its prompt and settle max_tokens.

    max_tokens 0 becomes the gateway default, shortened to what fits the model's context; an
    explicit max_tokens that does not fit is refused rather than silently cut. The checks
    that need no model (`check_fields`) come first, before the model is resolved.
    """
    ids = prompt_ids(inp.prompt, meta, tokenizer, trusted=limits.allow_special_tokens)
    field = inp.prompt.field
    room = meta.max_len - len(ids)
    if room < 1:
        raise InvalidRequestError(
            field, f"the prompt is {len(ids)} tokens; the longest context of model "
            f"{meta.name!r}'s live workers is {meta.max_len} tokens, which must also hold at "
            "least one generated token")
    max_tokens = inp.params.max_tokens
    if max_tokens == 0:
        max_tokens = min(limits.default_max_tokens, room)
    elif max_tokens > room:
        raise InvalidRequestError(
            "max_tokens", f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) "
            f"exceeds the longest context of model {meta.name!r}'s live workers, "
            f"{meta.max_len} tokens; ask for at most {room}")
    params = dataclasses.replace(inp.params, max_tokens=max_tokens)
    _validate_params(params, meta.vocab_size or None)
    return Admitted(ids, params)


def check_capabilities(params: SamplingParams, workers: Sequence[WorkerInfo]) -> None:
    """Refuse, naming the field, sampling settings no live worker of the model can honour (a
    worker that samples on its device may lack some); the queue then holds only requests
    that some worker will claim."""
    refusals = [unsupported(params, w.capabilities) for w in workers]
    if refusals and all(refusals):
        raise refusals[0]  # type: ignore[misc]


def prompt_ids(prompt: PromptInput, meta: ModelMeta, tokenizer: Any, *,
               trusted: bool = False) -> list[int]:
    """The prompt's token ids: as given (checked against the vocabulary), tokenized text, or
    the chat rendered with the model's template; text never spells control tokens unless
    `trusted` (preprocess.control_tokens)."""
    if prompt.messages is not None:
        return encode_chat(tokenizer, prompt.messages, trusted=trusted)
    if prompt.token_ids is not None:
        if not prompt.token_ids:
            raise InvalidRequestError("token_ids", "is empty; send at least one token id")
        if meta.vocab_size:
            for pos, t in enumerate(prompt.token_ids):
                if not 0 <= t < meta.vocab_size:
                    raise InvalidRequestError(
                        "token_ids", f"id {t} at position {pos} is outside model "
                        f"{meta.name!r}'s vocabulary [0, {meta.vocab_size})")
        return list(prompt.token_ids)
    if prompt.text is None:
        raise InvalidRequestError("prompt", "set either text or token_ids")
    if not prompt.text:
        raise InvalidRequestError("text", "is empty; send a non-empty prompt")
    ids = encode_text(tokenizer, prompt.text, trusted=trusted)
    if not ids:
        raise InvalidRequestError("text", "tokenizes to no tokens")
    return ids


def tokenize(prompt: PromptInput, tokenizer: Any, *, trusted: bool = False) -> TokenizeResult:
    """Tokenize text as is (no special tokens added), or a chat rendered with a generation
    prompt, as Generate would (control tokens spelled by the text stay text unless trusted).

    Each token's text is the piece of the (rendered) input it covers, as TGI reports it (a
    chat whose contents spell control tokens: each token decoded alone).
    """
    if prompt.messages is not None:
        text = render_chat(tokenizer, prompt.messages)
        if not trusted and spells_control_token(
                tokenizer, (str(m.get("content", "")) for m in prompt.messages)):
            ids = encode_chat(tokenizer, prompt.messages)
            return TokenizeResult(ids, [tokenizer.decode([i]) for i in ids])
    elif prompt.text is not None:
        text = prompt.text
    else:
        raise InvalidRequestError("input", "set either text or chat")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                    split_special_tokens=not trusted and prompt.messages is None)
    ids = list(enc["input_ids"])
    tokens = [text[start:end] for start, end in enc["offset_mapping"]]
    return TokenizeResult(ids, tokens)


def _validate_params(params: SamplingParams, vocab_size: int | None) -> None:
    try:
        params.validate(vocab_size)
    except InvalidRequestError as exc:
        if exc.field in _SAMPLING_FIELDS:
            raise InvalidRequestError(f"sampling.{exc.field}", exc.message) from None
        raise


class StreamLimiter:
    """Bounds the concurrent Generate/Chat streams of one gateway."""

    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams
        self.active = 0

    def acquire(self) -> None:
        """Take a slot, or raise ResourceExhaustedError naming the limit."""
        if self.active >= self.max_streams:
            raise ResourceExhaustedError(
                f"this gateway already serves {self.active} streams, its limit "
                f"(--max-streams {self.max_streams}); retry later or use another gateway")
        self.active += 1

    def release(self) -> None:
        """Give a slot back."""
        self.active -= 1
