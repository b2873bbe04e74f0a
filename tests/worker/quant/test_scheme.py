"""The quantization section of config.json: written as read, malformed ones refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.errors import ModelConfigError
from tests.worker.quant.conftest import W8A16
from worker.model.config import ModelConfig
from worker.quant.runner import load_runner
from worker.quant.scheme import Activations, Method, QuantConfig, Scheme

BASE: dict[str, Any] = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                        "intermediate_size": 16, "num_hidden_layers": 1,
                        "num_attention_heads": 2}
GOOD = QuantConfig(Scheme.W8A8, Method.KL, 64, Activations.STATIC, lm_head=True).to_dict()


def test_a_section_reads_back_as_the_config_that_wrote_it() -> None:
    config = ModelConfig.from_dict({**BASE, "quantization_config": GOOD})
    assert config.quantization == QuantConfig(Scheme.W8A8, Method.KL, 64, Activations.STATIC,
                                              lm_head=True)
    assert ModelConfig.from_dict(BASE).quantization is None


@pytest.mark.parametrize(("change", "names"), [
    ({"quant_method": "gptq"}, "quant_method"),
    ({"format_version": 7}, "format_version"),
    ({"scheme": "w4a16"}, "scheme"),
    ({"method": "mse"}, "method"),
    ({"group_size": "64"}, "group_size"),
    ({"group_size": -1}, "group_size"),
    ({"activations": "sometimes"}, "activations"),
    ({"lm_head": "yes"}, "lm_head"),
    ({"bits": 4}, "unknown keys"),
    ({"scheme": "w8a16"}, "activations"),  # w8a16 with static activations
    ({"activations": None}, "activations"),  # w8a8 without an activation scheme
    ({"activations": "dynamic"}, "method"),  # kl needs calibrated (static) activations
])
def test_a_malformed_section_is_refused_naming_the_field(change: dict[str, Any],
                                                         names: str) -> None:
    with pytest.raises(ModelConfigError, match=names):
        ModelConfig.from_dict({**BASE, "quantization_config": {**GOOD, **change}})


def test_a_section_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ModelConfigError, match="JSON object"):
        ModelConfig.from_dict({**BASE, "quantization_config": ["w8a16"]})


def test_a_checkpoint_whose_tensors_contradict_its_section_is_refused(
        quantized, tmp_path: Path) -> None:
    """Per-group scales declared, per-channel scales stored: the loader names the tensor."""
    src = quantized("qwen2", W8A16)
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").unlink()
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"]["group_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match=r"q_proj\.weight_scale"):
        load_runner(tmp_path, 16)
