"""OpenAI's response shapes, built from the gateway's chunks: completions and chat
completions (whole and streamed), log-probabilities in both the chat and the legacy form,
usage, and error bodies with the HTTP status of each neutral ErrorCode.

Plain dicts, not pydantic models: a streamed token costs one small dict and one json.dumps.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from common.errors import ErrorCode
from gateway.types import Chunk

Kind = Literal["chat", "text"]

HTTP_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    ErrorCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    ErrorCode.UNAUTHENTICATED: (401, "authentication_error"),
    ErrorCode.PERMISSION_DENIED: (403, "permission_error"),
    ErrorCode.NOT_FOUND: (404, "not_found_error"),
    ErrorCode.ALREADY_EXISTS: (409, "conflict_error"),
    ErrorCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    ErrorCode.CANCELLED: (499, "cancelled"),
    ErrorCode.INTERNAL: (500, "server_error"),
    ErrorCode.UNAVAILABLE: (503, "service_unavailable"),
    ErrorCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
"""HTTP status and OpenAI error `type` of each neutral code."""


def error_body(code: ErrorCode, message: str, param: str | None = None) -> dict[str, Any]:
    """{"error": {message, type, param, code}}, OpenAI's error shape."""
    status, kind = HTTP_STATUS[code]
    return {"error": {"message": message, "type": kind, "param": param,
                      "code": code.value.lower()}}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False,
                                                         separators=(",", ":"))
    return f"data: {text}\n\n".encode()


DONE = sse("[DONE]")


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@dataclass
class Choice:
    """What one choice has streamed so far, for a whole response or the final usage."""

    index: int
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chat_logprobs: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top: list[dict[str, float]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    chars: int = 0


class Response:
    """One request's responses: the chunks of every choice in, OpenAI JSON out."""

    def __init__(self, kind: Kind, model: str, n: int, *, logprobs: bool,
                 include_usage: bool) -> None:
        self.kind = kind
        self.model = model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.choices = [Choice(i) for i in range(n)]
        self._object = "chat.completion" if kind == "chat" else "text_completion"

    def add(self, index: int, chunk: Chunk) -> dict[str, Any] | None:
        """Fold `chunk` of choice `index` in; returns its stream chunk (None: nothing to
        send, e.g. an empty delta that ends nothing)."""
        c = self.choices[index]
        shown = chunk.token_ids and not chunk.stop_token  # a stop token is not output
        logprobs = self._logprobs(c, chunk) if self.logprobs and shown else None
        c.text.append(chunk.text)
        if chunk.finish_reason:
            c.finish_reason = chunk.finish_reason
            c.prompt_tokens, c.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        if not chunk.text and not chunk.finish_reason and logprobs is None:
            return None
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": index, "delta": {"content": chunk.text},
                                      "logprobs": logprobs,
                                      "finish_reason": chunk.finish_reason or None}
        else:
            choice = {"index": index, "text": chunk.text, "logprobs": logprobs,
                      "finish_reason": chunk.finish_reason or None}
        return self._chunk([choice])

    def first(self, index: int) -> dict[str, Any]:
        """A chat stream's first chunk of a choice: the assistant role, no content yet."""
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])

    def usage(self) -> dict[str, Any]:
        prompt = max((c.prompt_tokens for c in self.choices), default=0)
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk of a stream with stream_options.include_usage."""
        return {"id": self.id, "object": self._object + ("" if self.kind == "text" else
                                                          ".chunk"),
                "created": self.created, "model": self.model, "choices": [],
                "usage": self.usage()}

    def whole(self) -> dict[str, Any]:
        """The non-streamed response, once every choice has finished."""
        choices = []
        for c in self.choices:
            text = "".join(c.text)
            logprobs = self._whole_logprobs(c) if self.logprobs else None
            if self.kind == "chat":
                choices.append({"index": c.index, "message": {"role": "assistant",
                                                              "content": text},
                                "logprobs": logprobs, "finish_reason": c.finish_reason})
            else:
                choices.append({"index": c.index, "text": text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason})
        return {"id": self.id, "object": self._object, "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage()}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"id": self.id, "object": self._object + (".chunk" if self.kind == "chat"
                                                          else ""),
               "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            out["usage"] = None
        return out

    def _logprobs(self, c: Choice, chunk: Chunk) -> dict[str, Any]:
        """The chunk's log-probabilities, in the kind's form; also kept for `whole`."""
        tops = chunk.top_logprobs or [[] for _ in chunk.logprobs]
        if self.kind == "chat":
            content = [{"token": token, "logprob": lp, "bytes": _token_bytes(token),
                        "top_logprobs": [{"token": t, "logprob": tlp, "bytes": _token_bytes(t)}
                                         for _, tlp, t in top]}
                       for token, lp, top in zip(chunk.tokens, chunk.logprobs, tops,
                                                 strict=False)]
            c.chat_logprobs.extend(content)
            return {"content": content}
        start = len(c.tokens)
        for token, lp, top in zip(chunk.tokens, chunk.logprobs, tops, strict=False):
            c.tokens.append(token)
            c.token_logprobs.append(lp)
            c.top.append({t: tlp for _, tlp, t in top})
            c.offsets.append(c.chars)
            c.chars += len(token)
        return {"tokens": c.tokens[start:], "token_logprobs": c.token_logprobs[start:],
                "top_logprobs": c.top[start:], "text_offset": c.offsets[start:]}

    def _whole_logprobs(self, c: Choice) -> dict[str, Any]:
        if self.kind == "chat":
            return {"content": c.chat_logprobs}
        return {"tokens": c.tokens, "token_logprobs": c.token_logprobs,
                "top_logprobs": c.top, "text_offset": c.offsets}


def model_list(models: list[tuple[str, int]]) -> dict[str, Any]:
    """GET /v1/models: (name, max context) of each served model."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "npuserve",
         "max_model_len": max_len} for name, max_len in models]}
