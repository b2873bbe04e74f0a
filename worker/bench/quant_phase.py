"""`npuserve bench engine --quantized DIR`: batch-1 decode of a quantized model against its source.

Both engines stay loaded and are timed in alternation, several rounds each, so a burst of
load from other processes hits both about equally; the ratio of the medians is the result.
Each quantized round follows a copy-bandwidth measurement of its own, and its ratio to the
floor is the round closest to its own floor, as the float model's batch-1 rounds are judged
(engine_bench.BATCH1_ROUNDS): a shared VM's copy bandwidth swings 1.5-2x between rounds, and
a floor taken from another moment than the decode it divides moved the w8a16 ratio from 0.92x
to 1.60x between runs of the same code on one Zen 4.
`--quantized auto` first makes the w8a16 copy itself, once (`w8a16_copy`).
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ModelConfigError
from worker.bench import bandwidth, npuserve_phase
from worker.quant.scheme import Scheme

if TYPE_CHECKING:
    from worker.backends.torch_settings import TorchSettings
    from worker.engine.engine import Engine

log = logging.getLogger(__name__)

ROUNDS = 3
"""Alternating measurements per engine."""


def run(float_engine: Engine, quantized_dir: str, prompt: Sequence[int],
        settings: TorchSettings, *, max_batch: int, warmup_tokens: int, measured_tokens: int,
        on_tokens: npuserve_phase.OnTokens | None = None) -> dict[str, Any]:
    """Load the quantized model beside `float_engine` with the same backend settings and
    time batch-1 decode of both."""
    quant = npuserve_phase.load_engine(quantized_dir, settings, max_batch=max_batch)
    npuserve_phase.warm_up(quant, prompt)
    times: dict[str, list[float]] = {"float": [], "quantized": []}
    copies: list[float] = []
    for _ in range(ROUNDS):
        for name, engine in (("float", float_engine), ("quantized", quant)):
            if name == "quantized":
                copies.append(bandwidth.measure_copy_bandwidth(device=settings.device))
            times[name].append(npuserve_phase.decode_ms_per_token(
                engine, prompt, warmup_tokens=warmup_tokens, measured_tokens=measured_tokens,
                on_tokens=on_tokens))
    float_ms = statistics.median(times["float"])
    quant_ms = statistics.median(times["quantized"])
    step_bytes = quant.weight_bytes()
    best = bandwidth.closest_to_floor(times["quantized"], copies)
    floor_ms = bandwidth.floor_ms_per_token(step_bytes, copies[best])
    quantization = quant.model_config.quantization
    return {
        "quantized_model": Path(quantized_dir).resolve().name,
        "quantized_config": quantization.to_dict() if quantization is not None else None,
        "quantized_decode_ms_per_token_batch1": quant_ms,
        "quantized_reference_decode_ms_per_token_batch1": float_ms,
        "quantized_decode_ms_rounds": times["quantized"],
        "quantized_reference_decode_ms_rounds": times["float"],
        "quantized_decode_speedup": float_ms / quant_ms,
        "quantized_bandwidth_gb_s_rounds": copies,
        "quantized_floor_round_decode_ms": times["quantized"][best],
        "quantized_bandwidth_gb_s": copies[best],
        "quantized_bandwidth_floor_ms_per_token": floor_ms,
        "quantized_decode_vs_floor": times["quantized"][best] / floor_ms,
        "quantized_weight_bytes_per_decode_step": step_bytes,
        "quantized_weight_resident_bytes": quant.backend.weight_memory_bytes(),
        "reference_weight_resident_bytes": float_engine.backend.weight_memory_bytes(),
    }


def w8a16_copy(model_dir: str | Path, *, progress: bool = True) -> Path:
    """The w8a16 copy of `model_dir` in its sibling `NAME-w8a16`, made by `npuserve
    quantize`'s code (per-channel int8 decoder projections) unless it is already there."""
    from worker.quant.quantize import quantize_model
    from worker.quant.scheme import QuantConfig

    src = Path(model_dir).absolute()
    out = src.parent / f"{src.name}-w8a16"
    if (out / "config.json").is_file():  # quantize_model's output appears whole or not at all
        scheme = json.loads((out / "config.json").read_text()).get(
            "quantization_config", {}).get("scheme")
        if scheme != Scheme.W8A16.value:
            raise ModelConfigError(f"{out} exists and is not a w8a16 copy (scheme {scheme}): "
                                   "move it away or give --quantized DIR")
        log.info("reusing the w8a16 copy %s", out)
        return out
    summary = quantize_model(src, out, QuantConfig(Scheme.W8A16), progress=progress)
    return summary.out_dir


def total_tokens(warmup_tokens: int, measured_tokens: int) -> int:
    """Output tokens the phase produces, for a progress bar."""
    return 2 * ROUNDS * (warmup_tokens + measured_tokens)

