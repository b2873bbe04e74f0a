"""`bench engine --quantized`: both models decode in alternation and the ratio is reported."""

from __future__ import annotations

from pathlib import Path

from worker.backends.torch_settings import TorchSettings
from worker.bench import npuserve_phase, quant_phase
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
    ratio = r["quantized_reference_decode_ms_per_token_batch1"] / r[
        "quantized_decode_ms_per_token_batch1"]
    assert r["quantized_decode_speedup"] == ratio > 0
    assert r["quantized_config"]["scheme"] == "w8a16"
    assert r["quantized_weight_resident_bytes"] < r["reference_weight_resident_bytes"]
