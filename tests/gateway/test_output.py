"""The gateway's output processor: token ids to text, stop strings, and the end of a stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.output import OutputProcessor
from preprocess.tokenizer import load_tokenizer

TEXT = "Hello 世界! 🚀 done. The answer is 42, and then more text follows here."


@pytest.fixture(scope="module")
def qwen(qwen_tokenizer_dir: Path) -> Any:
    return load_tokenizer(qwen_tokenizer_dir)


def _run(proc: OutputProcessor, ids: list[int]) -> tuple[list[str], str]:
    deltas = []
    for i in ids:
        deltas.append(proc.add(i))
        if proc.stopped:
            break
    return deltas, proc.finish()


def test_the_deltas_and_the_finish_make_the_full_decode(qwen: Any) -> None:
    ids = qwen.encode(TEXT)
    deltas, tail = _run(OutputProcessor(qwen, [1, 2, 3], ()), ids)
    assert "".join(deltas) + tail == TEXT
    assert not any("\ufffd" in d for d in deltas)


def test_a_stop_string_ends_the_text_before_it_even_across_tokens(qwen: Any) -> None:
    ids = qwen.encode(TEXT)
    proc = OutputProcessor(qwen, [], ("answer is",))
    deltas, tail = _run(proc, ids)
    assert proc.stopped
    assert "".join(deltas) + tail == TEXT[: TEXT.index("answer is")]
    assert len(deltas) < len(ids), "the stream ends at the stop string, not at the last token"


def test_text_that_may_start_a_stop_string_is_held_then_released_at_the_end(qwen: Any) -> None:
    ids = qwen.encode("one two thr")
    proc = OutputProcessor(qwen, [], ("three",))
    deltas, tail = _run(proc, ids)
    assert not proc.stopped
    assert "".join(deltas) == "one two "
    assert tail == "thr"


def test_a_character_cut_short_at_the_end_comes_out_as_a_replacement_character(
        qwen: Any) -> None:
    ids = qwen.encode("ok 🚀")
    partial = next(n for n in range(len(ids), 0, -1)
                   if qwen.decode(ids[:n]).endswith("\ufffd"))
    deltas, tail = _run(OutputProcessor(qwen, [], ()), ids[:partial])
    assert not any("\ufffd" in d for d in deltas)
    assert tail.endswith("\ufffd")
    assert "".join(deltas) + tail == qwen.decode(ids[:partial])


def test_a_stop_token_adds_no_text(qwen: Any) -> None:
    ids = qwen.encode("plain words")
    proc = OutputProcessor(qwen, [], ())
    text = "".join(proc.add(i) for i in ids)
    text += proc.add(ids[0], stop_token=True) + proc.finish()
    assert text == "plain words"
