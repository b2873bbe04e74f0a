"""The Qwen3 tokenizer rebuilt from `qwen.tiktoken` encodes exactly as Qwen's own BPE does."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from worker.checkpoints.qwen_tokenizer import (
    PRETOKENIZE_REGEX,
    QWEN3_ADDED_TOKENS,
    SPECIAL_START_ID,
    _recover_merge,
    load_ranks,
    qwen_ranks_path,
)

CORPUS = {
    "english": "The quick brown fox jumps over the lazy dog. It's what they'd've said, I'm sure.",
    "chinese": "通义千问是阿里云研发的大语言模型。我们在北京、上海和杭州都有团队！",
    "japanese_korean": "日本語のテキストです。한국어 텍스트도 있습니다.",
    "code": 'def f(x: int) -> int:\n    """Square."""\n    return x ** 2  # 平方\n\nprint(f(3))\n',
    "emoji": "🎉 party 👨‍👩‍👧‍👦 family 🇨🇳🇺🇸 flags ❤️‍🔥 😀😃😄",
    "whitespace_runs": "a  b   c    d\t\te \t \n  \n\n\n   f      ",
    "numbers": "3.14159 2,718 1e-9 0x1F 1234567890 ½ ² 第3名",
    "mixed": "Qwen3-0.6B在MMLU上得了52.8分(5-shot)，比Llama-3.2-1B好🚀",
    "newlines": "line one\r\nline two\n\n\nline three\r\n\r\n",
    "contractions": "I'LL we'Re YOU'VE she's it'd 'tis",
    "punctuation": "!!!??? ... --- === ''' ``` \"\"\" <<>> {}[]() @#$%^&*",
    "accents_nfc": unicodedata.normalize("NFC", "Ünïcödé naïve café résumé Führer"),
    "cyrillic_arabic": "Привет, мир! مرحبا بالعالم",
}


@pytest.fixture(scope="module")
def fast_tokenizer(qwen_tokenizer_dir: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def auto_tokenizer(qwen_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def tiktoken_encoding() -> Any:
    import tiktoken

    return tiktoken.Encoding(
        "qwen",
        pat_str=PRETOKENIZE_REGEX,
        mergeable_ranks=load_ranks(qwen_ranks_path()),
        special_tokens={},
    )


def _random_texts(count: int, seed: int = 0) -> list[str]:
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r",
        "'\".,;:!?-_()[]{}<>/\\|@#$%^&*+=~`",
        "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生",
        "αβγδεжзийклмñéüößçà",
        "😀🎉🚀❤️👍🔥✅🦙",
    ]
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        chars = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 60))]
        texts.append(unicodedata.normalize("NFC", "".join(chars)))
    return texts


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_encoding_equals_tiktoken_on_the_same_ranks(
    name: str, fast_tokenizer: Any, auto_tokenizer: Any, tiktoken_encoding: Any
) -> None:
    text = CORPUS[name]
    expected = tiktoken_encoding.encode_ordinary(text)
    assert fast_tokenizer.encode(text).ids == expected
    assert auto_tokenizer.encode(text) == expected


def test_encoding_equals_tiktoken_on_random_mixed_script_text(
    fast_tokenizer: Any, tiktoken_encoding: Any
) -> None:
    texts = _random_texts(300)
    assert [e.ids for e in fast_tokenizer.encode_batch(texts)] == [
        tiktoken_encoding.encode_ordinary(t) for t in texts
    ]


def test_decode_restores_the_original_text(fast_tokenizer: Any, auto_tokenizer: Any) -> None:
    for text in [*CORPUS.values(), *_random_texts(100, seed=1)]:
        ids = fast_tokenizer.encode(text).ids
        assert fast_tokenizer.decode(ids) == text
        assert auto_tokenizer.decode(ids) == text


def test_ids_match_the_real_qwen2_tokenizer_on_llama_cpp_test_cases(fast_tokenizer: Any) -> None:
    data = json.loads((Path(__file__).parent / "data" / "llama_cpp_qwen2_cases.json").read_text())
    for text, ids in data["cases"]:
        assert fast_tokenizer.encode(text).ids == ids, text


def test_vocabulary_holds_the_ranks_and_the_26_added_tokens(fast_tokenizer: Any) -> None:
    assert fast_tokenizer.get_vocab_size(with_added_tokens=True) == 151669
    merges = json.loads(fast_tokenizer.to_str())["model"]["merges"]
    assert len(merges) == SPECIAL_START_ID - 256  # one merge per multi-byte token


@pytest.mark.parametrize("offset", range(len(QWEN3_ADDED_TOKENS)))
def test_added_token_has_its_qwen3_id_and_encodes_as_one_token(
    offset: int, fast_tokenizer: Any
) -> None:
    content, _ = QWEN3_ADDED_TOKENS[offset]
    assert fast_tokenizer.token_to_id(content) == SPECIAL_START_ID + offset
    assert fast_tokenizer.encode(f"a{content}b").ids[1] == SPECIAL_START_ID + offset
    assert len(fast_tokenizer.encode(content).ids) == 1


def test_control_tokens_are_skipped_in_decoding_but_think_and_tool_tags_are_kept(
    auto_tokenizer: Any,
) -> None:
    ids = auto_tokenizer.encode("<|im_start|>assistant\n<think>\nhm</think><tool_call>x<|im_end|>")
    text = auto_tokenizer.decode(ids, skip_special_tokens=True)
    assert text == "assistant\n<think>\nhm</think><tool_call>x"


def test_tokenizer_config_names_im_end_as_eos_and_endoftext_as_pad(auto_tokenizer: Any) -> None:
    assert auto_tokenizer.eos_token == "<|im_end|>"
    assert auto_tokenizer.eos_token_id == 151645
    assert auto_tokenizer.pad_token_id == 151643
    assert auto_tokenizer.bos_token is None
    assert "<|im_start|>" in auto_tokenizer.chat_template


def test_merge_recovery_replays_bpe_with_lower_ranks_only() -> None:
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5, b"bcx": 6, b"x": 7}
    assert _recover_merge(ranks, b"abc", 5) == (b"ab", b"c")
    with pytest.raises(ValueError, match="cannot be built"):
        _recover_merge(ranks, b"bcx", 6)  # "x" only arrives at rank 7
    with pytest.raises(ValueError, match="cannot be built"):
        _recover_merge({b"a": 0, b"b": 1, b"c": 2, b"abc": 3}, b"abc", 3)
