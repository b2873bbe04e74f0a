"""Streaming detokenization: whole characters, each once, and the same text as a full decode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from preprocess.detokenizer import IncrementalDetokenizer
from preprocess.tokenizer import load_tokenizer

TEXTS = {
    "chinese": "鬱鬱蔥蔥的爨底下村，饕餮與魑魅魍魎。通义千问是一个大语言模型。",
    "emoji": "🎉👨‍👩‍👧‍👦🇨🇳❤️‍🔥🦙😶‍🌫️",
    "mixed": "Hello 世界! 🚀 Qwen3 在 2025 年发布, résumé naïve ½ — done.\n\n  code: x**2",
    "rare_cjk": "𠀋𠂉𪚥龘靐齉",
}


@pytest.fixture(scope="module")
def qwen(qwen_tokenizer_dir: Path) -> Any:
    return load_tokenizer(qwen_tokenizer_dir)


def _stream(tokenizer: Any, ids: list[int], **kwargs: Any) -> tuple[list[str], Any]:
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    return [detok.add(i) for i in ids], detok


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_deltas_never_hold_a_broken_character(name: str, qwen: Any) -> None:
    ids = qwen.encode(TEXTS[name])
    # The test is only meaningful if some character is split across tokens.
    assert any("\ufffd" in qwen.decode([i]) for i in ids) or name == "mixed"
    deltas, _ = _stream(qwen, ids)
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_deltas_concatenate_to_the_full_decode(name: str, qwen: Any) -> None:
    ids = qwen.encode(TEXTS[name])
    deltas, detok = _stream(qwen, ids)
    assert "".join(deltas) == qwen.decode(ids) == TEXTS[name]
    assert detok.text == TEXTS[name]
    assert detok.flush() == ""


def test_each_character_arrives_once_and_whole(qwen: Any) -> None:
    text = TEXTS["chinese"] + TEXTS["emoji"]
    deltas, _ = _stream(qwen, qwen.encode(text))
    arrived = [ch for d in deltas for ch in d]
    assert arrived == list(text)
    assert sum(1 for d in deltas if d == "") > 0  # some tokens completed nothing by themselves


def test_prompt_ids_are_context_not_output(qwen: Any) -> None:
    prompt = qwen.encode("<|im_start|>user\n写一首诗<|im_end|>\n<|im_start|>assistant\n")
    answer = qwen.encode("床前明月光 🌕")
    deltas, detok = _stream(qwen, answer, prompt_ids=prompt)
    assert "".join(deltas) == detok.text == "床前明月光 🌕"


def test_special_tokens_are_skipped_unless_asked_for(qwen: Any) -> None:
    ids = qwen.encode("答案<|im_end|>")
    assert _stream(qwen, ids)[1].text == "答案"
    assert _stream(qwen, ids, skip_special_tokens=False)[1].text == "答案<|im_end|>"


def test_flush_releases_a_dangling_partial_character(qwen: Any) -> None:
    ids = qwen.encode("ok 鬱")
    assert qwen.decode(ids[-1:]) == "\ufffd"  # 鬱 is two tokens: keep only the first
    deltas, detok = _stream(qwen, ids[:-1])
    assert "".join(deltas) == "ok"
    assert detok.flush() == " \ufffd"
    assert detok.text == "ok \ufffd"


def test_long_streams_keep_a_bounded_window(qwen: Any) -> None:
    text = TEXTS["mixed"] * 40
    ids = qwen.encode(text)
    deltas, detok = _stream(qwen, ids)
    assert "".join(deltas) == text
    assert len(detok._ids) < 80


def test_works_with_a_bare_tokenizers_tokenizer(qwen_tokenizer_dir: Path) -> None:
    from tokenizers import Tokenizer

    bare = Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    deltas, _ = _stream(bare, bare.encode(TEXTS["emoji"]).ids)
    assert "".join(deltas) == TEXTS["emoji"]
