"""Tokenizer loading, chat templates with clear request errors, and stop ids."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from common.errors import InvalidRequestError, ModelConfigError
from preprocess.control_tokens import encode_chat
from preprocess.tokenizer import eos_token_ids, load_tokenizer, render_chat

IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643


@pytest.fixture(scope="module")
def qwen(qwen_tokenizer_dir: Path) -> Any:
    return load_tokenizer(qwen_tokenizer_dir)


@pytest.fixture
def fresh_qwen(qwen_tokenizer_dir: Path) -> Any:
    """A tokenizer a test may modify."""
    return load_tokenizer(qwen_tokenizer_dir)


def test_chat_prompt_is_chatml_ending_with_the_assistant_header(qwen: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    ids = encode_chat(qwen, messages)
    assert qwen.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids[0] == IM_START and ids.count(IM_END) == 2


def test_without_generation_prompt_the_conversation_ends_after_the_last_turn(qwen: Any) -> None:
    ids = encode_chat(
        qwen, [{"role": "user", "content": "hi"}], add_generation_prompt=False
    )
    assert qwen.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n"


def test_template_arguments_reach_the_template(qwen: Any) -> None:
    text = render_chat(qwen, [{"role": "user", "content": "hi"}], enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_prompt_ids_are_the_rendered_text_encoded_without_extra_special_tokens(qwen: Any) -> None:
    messages = [{"role": "user", "content": "2+2=?"}, {"role": "assistant", "content": "4"}]
    ids = encode_chat(qwen, messages, add_generation_prompt=False)
    assert ids == qwen.encode(render_chat(qwen, messages, False), add_special_tokens=False)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "is empty"),
        ("hello", "must be a list"),
        ([{"role": "wizard", "content": "x"}], "role 'wizard'; use one of assistant, system"),
        ([{"content": "x"}], "role None"),
        ([{"role": "user", "content": None}], "message 0 (user) has no text content"),
        ([{"role": "user", "content": "ok"}, "not a dict"], "message 1 is not"),
    ],
)
def test_malformed_messages_are_refused_naming_the_field(
    qwen: Any, messages: Any, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match="^messages: .*" + re.escape(message)) as info:
        encode_chat(qwen, messages)
    assert info.value.field == "messages"


def test_model_without_a_chat_template_is_a_request_error(fresh_qwen: Any) -> None:
    fresh_qwen.chat_template = None
    with pytest.raises(InvalidRequestError, match="no chat template; send a plain prompt"):
        encode_chat(fresh_qwen, [{"role": "user", "content": "hi"}])


def test_conversation_the_template_rejects_is_a_request_error(fresh_qwen: Any) -> None:
    fresh_qwen.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(InvalidRequestError, match="rejected by the chat template: Conversation"):
        encode_chat(fresh_qwen, [{"role": "user", "content": "hi"}])


def test_directory_without_tokenizer_is_a_model_config_error(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_qwen3_stops_on_im_end_and_endoftext(tiny_qwen3: Path) -> None:
    assert eos_token_ids(tiny_qwen3) == [IM_END, ENDOFTEXT]
    assert eos_token_ids(load_tokenizer(tiny_qwen3)) == [IM_END, ENDOFTEXT]


def test_single_eos_in_every_file_gives_one_stop_id(tiny_llama: Path) -> None:
    assert eos_token_ids(tiny_llama) == [IM_END]


def test_eos_ids_from_config_and_generation_config_are_merged(
    qwen_tokenizer_dir: Path, tmp_path: Path
) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((qwen_tokenizer_dir / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [IM_END, 7]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert eos_token_ids(tmp_path) == [IM_END, 9, 7]


def test_tokenizer_without_a_directory_gives_its_own_eos(fresh_qwen: Any) -> None:
    fresh_qwen.name_or_path = "not/a/directory"
    assert eos_token_ids(fresh_qwen) == [IM_END]
