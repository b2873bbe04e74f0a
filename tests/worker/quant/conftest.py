"""Quantized copies of the tiny checkpoints, built once per session in a temporary folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from worker.quant.quantize import quantize_model
from worker.quant.scheme import Activations, Method, QuantConfig, Scheme

W8A16 = QuantConfig(Scheme.W8A16)
W8A8 = QuantConfig(Scheme.W8A8, activations=Activations.DYNAMIC)
W8A8_STATIC = QuantConfig(Scheme.W8A8, Method.PERCENTILE, activations=Activations.STATIC)
CALIB_IDS = [list(range(300, 340)), list(range(5000, 5060, 2))]
"""Token ids standing in for calibration prompts (the tiny models' output is noise anyway)."""


@pytest.fixture(scope="session")
def quantized(tiny_model_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
              ) -> Callable[[str, QuantConfig], Path]:
    """Factory `(arch, quant) -> Path` of the tiny `arch` model quantized with `quant`."""
    built: dict[tuple[str, QuantConfig], Path] = {}
    root = tmp_path_factory.mktemp("quantized")

    def get(arch: str, quant: QuantConfig) -> Path:
        if (arch, quant) not in built:
            out = root / f"{arch}-{len(built)}"
            calib = CALIB_IDS if quant.static_activations else ()
            quantize_model(tiny_model_dir(arch), out, quant, calib=calib, progress=False)
            built[arch, quant] = out
        return built[arch, quant]

    return get
