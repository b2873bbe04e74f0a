"""`bench engine --quantized`: both models decode in alternation and the ratio is reported;
`--quantized auto` makes the w8a16 copy once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import ModelConfigError
from worker.backends.torch_settings import TorchSettings
from worker.bench import npuserve_phase, quant_phase, shapes
from worker.quant.quantize import quantize_model
from worker.quant.scheme import QuantConfig, Scheme


def test_the_quantized_phase_reports_decode_times_speedup_and_weight_bytes(
        tiny_llama: Path, tmp_path: Path) -> None:
    quantize_model(tiny_llama, tmp_path / "q", QuantConfig(Scheme.W8A16), progress=False)
    settings = TorchSettings(kv_cache_gb=0.02)
    engine = npuserve_phase.load_engine(str(tiny_llama), settings, max_batch=2)
    seen: list[int] = []
    r = quant_phase.run(engine, str(tmp_path / "q"), list(range(100, 108)), settings,
                        max_batch=2, warmup_tokens=2, measured_tokens=4, on_tokens=seen.append)
    assert sum(seen) == quant_phase.total_tokens(2, 4)
    assert len(r["quantized_decode_ms_rounds"]) == quant_phase.ROUNDS
    assert len(r["quantized_bandwidth_gb_s_rounds"]) == quant_phase.ROUNDS
    assert r["quantized_floor_round_decode_ms"] in r["quantized_decode_ms_rounds"]
    assert r["quantized_bandwidth_gb_s"] in r["quantized_bandwidth_gb_s_rounds"]
    assert r["quantized_decode_vs_floor"] == pytest.approx(
        r["quantized_floor_round_decode_ms"] / r["quantized_bandwidth_floor_ms_per_token"])
    ratio = r["quantized_reference_decode_ms_per_token_batch1"] / r[
        "quantized_decode_ms_per_token_batch1"]
    assert r["quantized_decode_speedup"] == ratio > 0
    assert r["quantized_config"]["scheme"] == "w8a16"
    assert r["quantized_weight_resident_bytes"] < r["reference_weight_resident_bytes"]


def test_the_w8a16_copy_is_made_once_beside_its_source(tmp_path: Path) -> None:
    src = shapes.checkpoint("qwen3-tiny", tmp_path)
    copy = quant_phase.w8a16_copy(src, progress=False)
    assert copy == tmp_path / "qwen3-tiny-w8a16"
    config = json.loads((copy / "config.json").read_text())
    assert config["quantization_config"]["scheme"] == "w8a16"
    stamp = (copy / "model.safetensors").stat().st_mtime_ns
    assert quant_phase.w8a16_copy(src, progress=False) == copy
    assert (copy / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_sibling_that_is_not_a_w8a16_copy_is_not_taken_for_one(tmp_path: Path) -> None:
    src = shapes.checkpoint("qwen3-tiny", tmp_path)
    (tmp_path / "qwen3-tiny-w8a16").mkdir()
    (tmp_path / "qwen3-tiny-w8a16" / "config.json").write_text("{}")
    with pytest.raises(ModelConfigError, match="not a w8a16 copy"):
        quant_phase.w8a16_copy(src, progress=False)
