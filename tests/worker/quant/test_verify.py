"""verify's metrics and its advice: a model agrees with itself, a damaged copy does not."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import InvalidRequestError
from tests.worker.quant.conftest import W8A16
from worker.quant.prompts import EvalText, load_texts
from worker.quant.verify import Agreement, compare, format_table, next_step

TEXTS = [EvalText("a", "The lighthouse keeper trimmed the wick and wound the clock.", "en"),
         EvalText("b", "def double(x):\n    return 2 * x\n", "code")]


def damaged_copy(src: Path, dst: Path) -> Path:
    """The model with the signs of one layer's down projection flipped."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = -tensors[name]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_agreement_of_identical_logits_is_perfect() -> None:
    logits = torch.randn(5, 50)
    a = Agreement()
    a.add(logits, logits.clone(), torch.tensor([1, 2, 3, 4]))
    m = a.summary()
    assert m["cosine_mean"] == pytest.approx(1) and m["cosine_min"] == pytest.approx(1)
    assert m["top1_agreement"] == 1 and m["kl_mean"] == pytest.approx(0, abs=1e-6)
    nll = -logits.log_softmax(-1)[torch.arange(4), torch.tensor([1, 2, 3, 4])].mean()
    assert m["perplexity_model"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_a_model_passes_against_itself_and_a_damaged_copy_fails(tiny_qwen3: Path,
                                                              tmp_path: Path) -> None:
    same = compare(tiny_qwen3, tiny_qwen3, TEXTS, progress=False)
    assert same.passed and same.overall["cosine_min"] > 0.9999
    assert same.overall["top1_agreement"] == 1.0 and same.suggestion is None
    broken = compare(damaged_copy(tiny_qwen3, tmp_path / "broken"), tiny_qwen3, TEXTS,
                     progress=False)
    assert not broken.passed and broken.overall["cosine_mean"] < 0.9
    assert "not an npuserve int8 checkpoint" in (broken.suggestion or "")
    assert "FAIL" in format_table(broken)


def test_a_quantized_model_reports_its_settings_and_per_text_rows(
        quantized: Callable[..., Path], tiny_llama: Path) -> None:
    result = compare(quantized("llama", W8A16), tiny_llama, TEXTS, threshold=0.99,
                     progress=False)
    assert result.passed and result.quantization is not None
    assert [row["id"] for row in result.texts] == ["a", "b"]
    assert sum(row["positions"] for row in result.texts) == result.overall["positions"]
    assert "w8a16, absmax, per channel" in format_table(result)


@pytest.mark.parametrize(("quant", "advice"), [
    ({"scheme": "w8a8", "method": "absmax", "activations": "static"}, "--activations dynamic"),
    ({"scheme": "w8a8", "method": "absmax", "activations": "static"}, "--method percentile"),
    ({"scheme": "w8a8", "method": "percentile", "activations": "static"}, "--method kl"),
    ({"scheme": "w8a8", "method": "absmax", "activations": "dynamic"}, "--group-size 128"),
    ({"scheme": "w8a8", "activations": "dynamic", "group_size": 128}, "--scheme w8a16"),
    ({"scheme": "w8a16", "group_size": 128}, "--group-size 64"),
    ({"scheme": "w8a16", "group_size": 32}, "bfloat16 or float32"),
])
def test_the_advice_moves_one_step_along_the_ladder(quant: dict, advice: str) -> None:
    assert advice in next_step(quant)


def test_the_default_evaluation_set_covers_languages_code_and_long_texts() -> None:
    texts = load_texts()
    assert {t.lang for t in texts} >= {"en", "zh", "code"}
    assert {t.kind for t in texts} >= {"question", "code", "long"}
    assert any(t.question for t in texts)


def test_a_prompt_file_without_text_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "ok"}\n{"prompt": "no text field"}\n')
    with pytest.raises(InvalidRequestError, match="p.jsonl:2"):
        load_texts(path)
    plain = tmp_path / "p.txt"
    plain.write_text("first\n\nsecond\n")
    assert [t.text for t in load_texts(plain)] == ["first", "second"]
