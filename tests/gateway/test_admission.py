"""Admission without gRPC or Redis: field checks, context and max_tokens, tokenization."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.config import GatewayConfig
from common.errors import InvalidRequestError, ResourceExhaustedError
from common.sampling_params import SamplingParams
from gateway.admission import (
    Limits,
    StreamLimiter,
    check_fields,
    check_request_id,
    prepare,
    tokenize,
)
from gateway.models import ModelMeta
from gateway.types import GenerationInput, PromptInput
from preprocess.tokenizer import load_tokenizer

META = ModelMeta("tiny", max_len=32, vocab_size=1000, sha="x")
LIMITS = Limits(default_max_tokens=16, max_tokens_limit=100)


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3: Path) -> Any:
    return load_tokenizer(tiny_qwen3)


def inp(prompt: PromptInput | None = None, **params: Any) -> GenerationInput:
    priority = params.pop("priority", 0)
    request_id = params.pop("request_id", "")
    return GenerationInput("tiny", prompt or PromptInput(token_ids=[1, 2, 3]),
                           SamplingParams(**params), priority, request_id)


def test_max_tokens_zero_takes_the_default_shortened_to_the_room_left_in_the_context(
        tokenizer: Any) -> None:
    assert prepare(inp(max_tokens=0), META, tokenizer, LIMITS).params.max_tokens == 16
    long = PromptInput(token_ids=list(range(25)))
    assert prepare(inp(long, max_tokens=0), META, tokenizer, LIMITS).params.max_tokens == 7
    assert prepare(inp(long, max_tokens=7), META, tokenizer, LIMITS).params.max_tokens == 7
    with pytest.raises(InvalidRequestError, match="max_tokens: .* ask for at most 7"):
        prepare(inp(long, max_tokens=8), META, tokenizer, LIMITS)


def test_a_prompt_that_fills_the_context_is_refused_under_the_field_it_came_from(
        tokenizer: Any) -> None:
    with pytest.raises(InvalidRequestError, match="token_ids: the prompt is 32 tokens"):
        prepare(inp(PromptInput(token_ids=[5] * 32)), META, tokenizer, LIMITS)
    with pytest.raises(InvalidRequestError, match="text: the prompt is"):
        prepare(inp(PromptInput(text="word " * 40)), META, tokenizer, LIMITS)
    chat = PromptInput(messages=[{"role": "user", "content": "word " * 40}])
    with pytest.raises(InvalidRequestError, match="messages: the prompt is"):
        prepare(inp(chat), META, tokenizer, LIMITS)


def test_prompts_are_tokenized_or_checked_against_the_vocabulary(tokenizer: Any) -> None:
    text = prepare(inp(PromptInput(text="Hello world")), META, tokenizer, LIMITS)
    assert text.prompt_ids == [9707, 1879]
    with pytest.raises(InvalidRequestError,
                       match=r"token_ids: id 1000 at position 1 .*\[0, 1000\)"):
        prepare(inp(PromptInput(token_ids=[1, 1000])), META, tokenizer, LIMITS)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"priority": 10}, "priority"),
    ({"priority": -1}, "priority"),
    ({"request_id": "a b"}, "request_id"),
    ({"request_id": "x" * 129}, "request_id"),
    ({"max_tokens": 101}, "max_tokens"),
    ({"temperature": float("nan")}, "sampling.temperature"),
    ({"top_k": -1}, "sampling.top_k"),
    ({"stop": ("",)}, "stop"),
])
def test_check_fields_names_the_offending_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_fields(inp(**kwargs), LIMITS)
    assert info.value.field == field


def test_stop_token_ids_are_checked_against_the_vocabulary(tokenizer: Any) -> None:
    with pytest.raises(InvalidRequestError, match="stop_token_ids: token id 5000"):
        prepare(inp(stop_token_ids=(5000,)), META, tokenizer, LIMITS)


def test_a_client_request_id_may_be_any_printable_ascii_without_spaces() -> None:
    check_request_id("")
    check_request_id("0f8a-4c1e:tenant/42")
    with pytest.raises(InvalidRequestError):
        check_request_id("naïve")


def test_tokenize_reports_each_token_as_the_text_it_covers(tokenizer: Any) -> None:
    result = tokenize(PromptInput(text="Hello world, 你好"), tokenizer)
    assert "".join(result.tokens) == "Hello world, 你好"
    assert len(result.tokens) == len(result.token_ids)
    chat = tokenize(PromptInput(messages=[{"role": "user", "content": "Hi"}]), tokenizer)
    assert chat.tokens[:3] == ["<|im_start|>", "user", "\n"]


def test_the_stream_limiter_refuses_past_its_bound_and_names_it() -> None:
    limiter = StreamLimiter(1)
    limiter.acquire()
    with pytest.raises(ResourceExhaustedError, match="--max-streams 1"):
        limiter.acquire()
    limiter.release()
    limiter.acquire()


def test_stop_strings_stop_ids_and_the_prompt_are_bounded_naming_the_flag() -> None:
    limits = Limits(max_stop_strings=2, max_stop_chars=5, max_stop_token_ids=3,
                    max_prompt_bytes=10, max_chat_messages=2)
    check_fields(inp(stop=("a", "bcdef"), stop_token_ids=(1, 2, 3)), limits)
    refusals = [
        (inp(stop=("a", "b", "c")), r"stop: 3 stop strings; at most 2 .*--max-stop-strings"),
        (inp(stop=("abcdef",)), r"stop: a stop string of 6 characters; at most 5 "
                                r".*--max-stop-chars"),
        (inp(stop_token_ids=(1, 2, 3, 4)), r"stop_token_ids: 4 ids; at most 3"),
        (inp(PromptInput(text="é" * 6)), r"text: the prompt is 12 bytes .*--max-prompt-bytes"),
        (inp(PromptInput(messages=[{"role": "user", "content": "x"}] * 3)),
         r"messages: 3 messages; at most 2 .*--max-chat-messages"),
        (inp(PromptInput(messages=[{"role": "user", "content": "0123456789x"}])),
         r"messages: the prompt is 11 bytes"),
    ]
    for request, message in refusals:
        with pytest.raises(InvalidRequestError, match=message):
            check_fields(request, limits)
    assert Limits.from_config(GatewayConfig(max_stop_strings=7)).max_stop_strings == 7
