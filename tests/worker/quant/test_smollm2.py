"""One check on a real model: SmolLM2-135M in w8a16 tracks the float model closely.

The full gate (every default text, w8a8 too, decode speed) is `npuserve verify` and
`npuserve bench engine --quantized`; this keeps the suite quick with two short texts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.quant.prompts import load_texts
from worker.quant.quantize import quantize_model
from worker.quant.scheme import QuantConfig, Scheme
from worker.quant.verify import compare

TEXTS = ("code-sql", "en-question-arithmetic")


@pytest.fixture(scope="module")
def smollm2_w8a16(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "w8a16"
    quantize_model(smollm2_dir, out, QuantConfig(Scheme.W8A16), progress=False)
    return out


def test_w8a16_smollm2_agrees_with_float32_on_logits_and_top_1(smollm2_w8a16: Path,
                                                                smollm2_dir: Path) -> None:
    texts = [t for t in load_texts() if t.id in TEXTS]
    result = compare(smollm2_w8a16, smollm2_dir, texts, threshold=0.99, progress=False)
    assert result.passed, result.overall
    assert result.overall["top1_agreement"] >= 0.95
    ppl = result.overall
    assert ppl["perplexity_model"] < 1.05 * ppl["perplexity_reference"]
