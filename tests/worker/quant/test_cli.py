"""`npuserve quantize` and `npuserve verify` as a user runs them: output and exit status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.cli import main
from tests.worker.quant.test_verify import damaged_copy


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"id": "one", "text": "Tell me about the sea and ships."}) + "\n")
    return path


def test_quantize_then_verify_exits_0_and_writes_json(tiny_qwen2: Path, tmp_path: Path,
                                                      prompts: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_qwen2), "--out", str(out),
                 "--scheme", "w8a8", "--activations", "static", "--calib", str(prompts)]) == 0
    assert "tensors in int8" in capsys.readouterr().out
    report = tmp_path / "verify.json"
    assert main(["verify", "--model", str(out), "--reference", str(tiny_qwen2),
                 "--prompts", str(prompts), "--threshold", "0.9", "--json", str(report)]) == 0
    assert "PASS" in capsys.readouterr().out
    result = json.loads(report.read_text())
    assert result["passed"] and result["quantization"]["activations"] == "static"
    assert set(result["overall"]) >= {"cosine_mean", "cosine_min", "top1_agreement", "kl_mean",
                                      "perplexity_reference", "perplexity_model"}


def test_verify_exits_1_on_a_damaged_copy_and_says_what_to_try(
        tiny_qwen3: Path, tmp_path: Path, prompts: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    broken = damaged_copy(tiny_qwen3, tmp_path / "broken")
    assert main(["verify", "--model", str(broken), "--reference", str(tiny_qwen3),
                 "--prompts", str(prompts)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "next:" in out


def test_bad_input_exits_2_with_a_message(tiny_qwen3: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", "--model", str(tiny_qwen3), "--out", str(tmp_path / "q"),
                 "--scheme", "w8a16", "--activations", "static"]) == 2
    assert main(["quantize", "--model", str(tiny_qwen3), "--out", str(tmp_path / "q"),
                 "--scheme", "w8a8", "--activations", "static"]) == 2
    assert main(["quantize", "--model", str(tiny_qwen3), "--out", str(tmp_path / "q"),
                 "--scheme", "w8a16", "--method", "kl"]) == 2
    assert main(["verify", "--model", str(tmp_path), "--reference", str(tiny_qwen3)]) == 2
    err = capsys.readouterr().err
    assert "w8a8 only" in err and "--calib" in err and "config.json" in err
    assert "--method chooses calibrated ranges" in err
