"""`--dtype auto`: the checkpoint's dtype where the device computes it well, else float32 (the
rule), and what a runner, the doctor and the CLI make of a bfloat16 checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import InvalidRequestError
from worker.backends.dtype_choice import auto_dtype, cpu_runs_bfloat16
from worker.backends.torch_runner import ModelRunner
from worker.backends.torch_settings import TorchSettings
from worker.model.config import ModelConfig

AVX2 = "flags : fpu sse2 avx fma avx2"
AVX512_BF16 = AVX2 + " avx512f avx512bw avx512_bf16 amx_bf16"
NEON = "Features : fp asimd"


def test_a_bfloat16_checkpoint_runs_in_bfloat16_on_a_cpu_with_the_kernels() -> None:
    for flags in (AVX2, AVX512_BF16):
        assert auto_dtype("bfloat16", False, "cpu", cpu_flags=flags) == "bfloat16"
    # without the kernels, or where they cannot run it, the exact widening
    assert auto_dtype("bfloat16", False, "cpu", cpu_flags=AVX2, cpu_kernels=False) == "float32"
    assert auto_dtype("bfloat16", False, "cpu", cpu_flags=NEON) == "float32"
    assert auto_dtype("bfloat16", False, "cpu", cpu_flags="flags : sse2 avx") == "float32"


def test_float16_float32_and_int8_checkpoints_run_in_float32_on_a_cpu() -> None:
    assert auto_dtype("float16", False, "cpu", cpu_flags=AVX512_BF16) == "float32"
    assert auto_dtype("float32", False, "cpu", cpu_flags=AVX512_BF16) == "float32"
    # the int8 kernels take float32 activations
    assert auto_dtype("bfloat16", True, "cpu", cpu_flags=AVX512_BF16) == "float32"


def test_a_gpu_keeps_a_half_checkpoint_half_and_an_npu_its_socs() -> None:
    assert auto_dtype("bfloat16", False, "cuda:1") == "bfloat16"
    assert auto_dtype("float16", True, "cuda") == "float16"
    assert auto_dtype("float32", False, "cuda") == "float32"
    assert auto_dtype("bfloat16", False, "cuda", cuda_bf16=False) == "float32"
    assert auto_dtype("float32", False, "npu:0") == "bfloat16"
    assert auto_dtype("bfloat16", False, "npu:0-7", npu_default="float16") == "float16"


def test_the_cpu_flags_are_read_from_the_machine_when_not_given() -> None:
    from worker.kernels.build import cpu_flags

    assert cpu_runs_bfloat16() == cpu_runs_bfloat16(cpu_flags())


def test_an_unknown_dtype_is_refused_with_the_choices() -> None:
    with pytest.raises(InvalidRequestError, match="auto, float32, bfloat16, float16"):
        TorchSettings(dtype="half")


@pytest.fixture(scope="module")
def bf16_qwen3(tiny_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3 stored as a bfloat16 checkpoint."""
    out = tmp_path_factory.mktemp("bf16-qwen3")
    for f in tiny_qwen3.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    tensors = load_file(tiny_qwen3 / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_a_runner_takes_a_bfloat16_checkpoint_as_auto_says(bf16_qwen3: Path,
                                                            tiny_qwen3: Path) -> None:
    settings = TorchSettings(kv_cache_gb=0.01, threads=1)
    checkpoint = ModelConfig.from_dir(bf16_qwen3)
    expected = torch.bfloat16 if cpu_runs_bfloat16() else torch.float32
    assert settings.dtype_name(checkpoint) == str(expected).removeprefix("torch.")
    runner = ModelRunner(bf16_qwen3, settings, max_model_len=128)
    assert runner.dtype == expected and runner.cache.data.dtype == expected
    assert runner.weights.layers[0].qkv.weight.dtype == expected
    # a float32 checkpoint stays float32, and a dtype set is taken as set
    assert ModelRunner(tiny_qwen3, settings, max_model_len=128).dtype == torch.float32
    fp32 = TorchSettings(kv_cache_gb=0.01, threads=1, dtype="float32")
    assert ModelRunner(bf16_qwen3, fp32, max_model_len=128).dtype == torch.float32


def test_the_doctor_plans_the_dtype_auto_takes(bf16_qwen3: Path) -> None:
    from common.config import EngineConfig
    from worker.doctor import report

    found = report(bf16_qwen3, TorchSettings(kv_cache_gb=0.01), EngineConfig())
    expected = "bfloat16" if cpu_runs_bfloat16() else "float32"
    assert found["plan"]["dtype"] == expected == found["plan"]["kv_cache_dtype"]
