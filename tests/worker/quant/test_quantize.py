"""quantize -> load -> generate on the tiny checkpoints, and the size of what is written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from common.errors import ModelConfigError
from common.sampling_params import SamplingParams
from tests.worker.quant.conftest import W8A8, W8A8_STATIC, W8A16
from worker.backends.torch_backend import TorchBackend
from worker.backends.torch_settings import TorchSettings
from worker.engine.engine import Engine
from worker.quant.int8_linear import W8A8Projection, W8A16Projection
from worker.quant.quantize import quantize_model
from worker.quant.runner import load_runner
from worker.quant.scheme import QuantConfig, Scheme

IDS = list(range(1000, 1040))


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def all_logits(model_dir: Path) -> torch.Tensor:
    runner = load_runner(model_dir, len(IDS))
    return runner.logits(runner.prefill_hidden_states(IDS))


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
@pytest.mark.parametrize("quant", [W8A16, W8A8], ids=["w8a16", "w8a8"])
def test_a_quantized_model_loads_int8_layers_and_generates_like_its_source(
        arch: str, quant: QuantConfig, quantized: Callable[..., Path],
        tiny_model_dir: Callable[..., Path]) -> None:
    out = quantized(arch, quant)
    engine = Engine.from_model_dir(out, settings=TorchSettings(kv_cache_gb=0.02))
    kind = W8A16Projection if quant.scheme is Scheme.W8A16 else W8A8Projection
    assert isinstance(engine.backend, TorchBackend)
    layer = engine.backend.runner.weights.layers[0]
    assert all(isinstance(p, kind) for p in (layer.qkv, layer.o_proj, layer.gate_up, layer.down))
    done = engine.generate([IDS[:12]], SamplingParams(max_tokens=8, temperature=0.0,
                                                      ignore_eos=True))
    assert len(done[0].token_ids) == 8
    cos = torch.nn.functional.cosine_similarity(all_logits(out), all_logits(tiny_model_dir(arch)))
    assert float(cos.mean()) > 0.995


def test_per_group_w8a16_runs_int8_on_the_cpu_kernels(quantized: Callable[..., Path],
                                                       tiny_qwen3: Path) -> None:
    out = quantized("qwen3", QuantConfig(Scheme.W8A16, group_size=16))
    engine = Engine.from_model_dir(out, settings=TorchSettings(kv_cache_gb=0.02))
    assert isinstance(engine.backend, TorchBackend)
    runner = engine.backend.runner
    layer = runner.weights.layers[0]
    assert isinstance(layer.gate_up, W8A16Projection) and layer.gate_up.group == 16
    assert runner.plan is not None  # decode steps take the one-call path too
    done = engine.generate([IDS[:12]], SamplingParams(max_tokens=8, temperature=0.0,
                                                      ignore_eos=True))
    assert len(done[0].token_ids) == 8
    cos = torch.nn.functional.cosine_similarity(all_logits(out), all_logits(tiny_qwen3))
    assert float(cos.mean()) > 0.995


def test_the_quantized_layers_take_about_a_quarter_of_their_float32_bytes(
        quantized: Callable[..., Path], tiny_qwen3: Path) -> None:
    out, src = tensors(quantized("qwen3", W8A16)), tensors(tiny_qwen3)
    layers = [k for k, t in out.items() if t.dtype == torch.int8]
    assert len(layers) == 3 * 7  # every linear module of the three decoder layers
    stored = sum(out[k].nbytes + out[k + "_scale"].nbytes for k in layers)
    assert 0.25 < stored / sum(src[k].nbytes for k in layers) < 0.28  # scales: 4 B per 64-256
    assert out["lm_head.weight"].dtype == torch.float32  # lm_head stays float by default
    config = json.loads((quantized("qwen3", W8A16) / "config.json").read_text())
    assert config["quantization_config"]["scheme"] == "w8a16"


def test_static_activation_scales_are_calibrated_for_every_layer_input(
        quantized: Callable[..., Path]) -> None:
    out = tensors(quantized("llama", W8A8_STATIC))
    scales = {k: float(t) for k, t in out.items() if k.endswith(".input_scale")}
    assert len(scales) == 4 * 7 and all(s > 0 for s in scales.values())
    # q, k and v read the same input, so they share its scale
    layer = "model.layers.1.self_attn."
    assert scales[layer + "q_proj.input_scale"] == scales[layer + "v_proj.input_scale"]
    runner = load_runner(quantized("llama", W8A8_STATIC), 8)
    assert runner.weights.layers[1].qkv.input_scale == scales[layer + "q_proj.input_scale"]


def test_a_tied_lm_head_and_the_embeddings_can_be_quantized_too(tiny_qwen2: Path,
                                                                 tmp_path: Path) -> None:
    quant = QuantConfig(Scheme.W8A16, lm_head=True, embeddings=True)
    summary = quantize_model(tiny_qwen2, tmp_path / "q", quant, progress=False)
    out = tensors(tmp_path / "q")
    assert out["lm_head.weight"].dtype == out["model.embed_tokens.weight"].dtype == torch.int8
    runner = load_runner(tmp_path / "q", len(IDS))
    assert isinstance(runner.weights.lm_head, W8A16Projection)
    assert summary.quantized_bytes / summary.float32_bytes < 0.27
    cos = torch.nn.functional.cosine_similarity(all_logits(tmp_path / "q"),
                                                all_logits(tiny_qwen2))
    assert float(cos.mean()) > 0.99


def test_a_group_size_that_does_not_divide_the_inputs_is_refused(tiny_qwen3: Path,
                                                                tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="group size 48"):
        quantize_model(tiny_qwen3, tmp_path / "q", QuantConfig(Scheme.W8A16, group_size=48),
                       progress=False)
    assert not (tmp_path / "q").exists()


def test_an_already_quantized_model_is_not_quantized_again(quantized: Callable[..., Path],
                                                           tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="already quantized"):
        quantize_model(quantized("qwen2", W8A16), tmp_path / "q", W8A16, progress=False)


def test_static_activations_need_calibration_prompts(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="--calib"):
        quantize_model(tiny_llama, tmp_path / "q", W8A8_STATIC, progress=False)
