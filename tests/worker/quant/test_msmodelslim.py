"""msmodelslim checkpoints (what MindIE and vllm-ascend load): written by npuserve, read on
the CPU through npuserve's int8 path, checked against the float model, and split over
tensor-parallel ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import ModelConfigError
from worker.backends.torch_runner import ModelRunner
from worker.backends.torch_settings import TorchSettings
from worker.model.config import ModelConfig
from worker.model.weights import TensorSource
from worker.quant import msmodelslim
from worker.quant.quantize import quantize_model
from worker.quant.scheme import QuantConfig, Scheme

SETTINGS = TorchSettings(kv_cache_gb=0.02, threads=2)
PROMPT = list(range(300, 340))
REPO = Path(__file__).resolve().parents[3]


def logits(model: Path, settings: TorchSettings = SETTINGS) -> torch.Tensor:
    runner = ModelRunner(model, settings)
    return runner.logits(runner.prefill_hidden_states(PROMPT))


@pytest.fixture(scope="module")
def written(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("msmodelslim")
    src = tiny_model_dir("qwen2")  # q/k/v carry biases: W8A8 folds them into quant_bias
    ranges = {f"model.layers.{i}.{m}": (-3.0, 5.0) for i in range(2)
              for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
    return {"float": src,
            "W8A16": msmodelslim.write(src, root / "w8a16", "W8A16"),
            "W8A8": msmodelslim.write(src, root / "w8a8", "W8A8", input_ranges=ranges),
            "npuserve": root / "npuserve"}


def test_the_layout_is_msmodelslims(written: dict[str, Path]) -> None:
    out = written["W8A8"]
    description = json.loads((out / "quant_model_description_w8a8.json").read_text())
    assert description["model_quant_type"] == "W8A8"
    assert description["model.layers.0.mlp.down_proj.weight"] == "W8A8"
    assert description["model.embed_tokens.weight"] == "FLOAT"
    tensors = load_file(str(out / "quant_model_weight_w8a8.safetensors"))
    m = "model.layers.0.self_attn.q_proj"
    assert tensors[m + ".weight"].dtype == torch.int8
    assert tensors[m + ".weight_scale"].shape[1] == 1 == tensors[m + ".weight_offset"].shape[1]
    assert tensors[m + ".quant_bias"].dtype == torch.int32
    assert tensors[m + ".input_offset"].dtype == torch.int8
    assert json.loads((out / "config.json").read_text())["quantize"] == "w8a8"
    assert ModelConfig.from_dir(out).quantization == QuantConfig(Scheme.W8A16)


def test_w8a16_reads_as_npuserves_own_int8(written: dict[str, Path]) -> None:
    ours = quantize_model(written["float"], written["npuserve"], QuantConfig(Scheme.W8A16),
                          progress=False).out_dir
    torch.testing.assert_close(logits(written["W8A16"]), logits(Path(ours)))


def test_w8a8_recovers_the_float_biases_and_tracks_the_float_model(
        written: dict[str, Path]) -> None:
    float_src = TensorSource(written["float"])
    desc = msmodelslim.read_description(written["W8A8"])
    assert desc is not None
    tensors = msmodelslim.MsModelSlimTensors(TensorSource(written["W8A8"]).get, desc)
    stored = load_file(str(written["W8A8"] / "quant_model_weight_w8a8.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        deq = stored[name + ".deq_scale"]
        error = (tensors(name + ".bias") - float_src.get(name + ".bias").float()).abs()
        assert (error <= deq / 2 + 1e-6).all()  # quant_bias rounds bias / deq_scale
    reference, model = logits(written["float"]), logits(written["W8A8"])
    cosine = torch.nn.functional.cosine_similarity(reference, model, dim=-1)
    assert cosine.min() > 0.999


def test_asymmetric_weights_are_refused_naming_the_module(written: dict[str, Path],
                                                          tmp_path: Path) -> None:
    out = tmp_path / "asym"
    out.mkdir()
    for f in written["W8A16"].iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    path = out / "quant_model_weight_w8a16.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.1.mlp.up_proj.weight_offset"] += 3
    save_file(tensors, str(path))
    with pytest.raises(ModelConfigError, match="up_proj: asymmetric int8 weights"):
        ModelRunner(out, SETTINGS)


def test_tensor_parallel_ranks_split_an_msmodelslim_checkpoint(written: dict[str, Path]
                                                               ) -> None:
    import dataclasses

    from worker.backends.tensor_parallel import TensorParallelRunner

    split = TensorParallelRunner(written["W8A8"], dataclasses.replace(SETTINGS, threads=1,
                                                                      tensor_parallel=2))
    try:
        two = split.logits(split.prefill_hidden_states(PROMPT))
    finally:
        split.close()
    torch.testing.assert_close(two, logits(written["W8A8"]), rtol=1e-3, atol=1e-3)


def test_npuserve_quantize_writes_it_and_verify_passes(written: dict[str, Path],
                                                      tmp_path: Path) -> None:
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "common.cli", "quantize", "--model",
                          str(written["float"]), "--out", str(out), "--scheme", "w8a16",
                          "--format", "msmodelslim"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert (out / "quant_model_description_w8a16.json").is_file()
    verify = subprocess.run([sys.executable, "-m", "common.cli", "verify", "--model", str(out),
                             "--reference", str(written["float"])], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
