"""The Ascend 310P op set on the CPU through the torch_npu simulation set to a 310P SoC:
float16 by default, the NZ KV cache and the 310P's attention kernels (flash attention over
16-aligned rows, split-fuse chunked prefill, paged decode). Its logits and greedy tokens
must equal PyTorch's ops' (in float32), its cache must be the 910B set's cache in NZ, and
what a 310P cannot run is refused. Nothing here runs on Ascend hardware."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from common.config import EngineConfig
from common.errors import ModelConfigError
from common.sampling_params import SamplingParams
from tests.worker.npu import torch_npu_sim
from worker.backends.torch_backend import TorchBackend
from worker.backends.torch_runner import ModelRunner
from worker.backends.torch_settings import TorchSettings
from worker.engine.engine import Engine
from worker.model.config import ModelConfig
from worker.model.npu_310p_ops import Npu310POps, NzKVCache
from worker.model.npu_ops import NpuOps, npu_ops_for
from worker.model.nz_layout import nd_to_nz, nz_to_nd
from worker.quant.scheme import Activations, QuantConfig, Scheme

FP32 = TorchSettings(kv_cache_gb=0.05, cpu_kernels=False, threads=2, dtype="float32")
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [50, 60, 70], list(range(300, 340))]


@pytest.fixture
def on_310p() -> Iterator[None]:
    torch_npu_sim.SocVersion.value = 202  # Atlas 300I Duo
    torch_npu_sim.calls.clear()
    try:
        yield
    finally:
        torch_npu_sim.SocVersion.value = 223


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min())


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_prefill_logits_through_the_310p_ops_equal_pytorchs(tiny_model_dir, arch: str,
                                                            on_310p: None) -> None:
    model: Path = tiny_model_dir(arch)
    reference = ModelRunner(model, FP32, max_model_len=256)
    npu = ModelRunner(model, FP32, max_model_len=256, ops=npu_ops_for(torch_npu_sim))
    assert isinstance(npu.ops, Npu310POps) and isinstance(npu.cache, NzKVCache)
    cfg = npu.model_config
    assert npu.block_size == 128 and npu.cache.layers[0][0].shape == (
        npu.num_blocks, cfg.num_key_value_heads * cfg.head_dim // 16, 128, 16)
    for prompt in PROMPTS:  # 13 and 3 tokens pad to 16 rows; 40 to 48
        one, two = (r.logits(r.prefill_hidden_states(prompt)) for r in (reference, npu))
        torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-4)
    assert "_npu_flash_attention" in torch_npu_sim.calls


def test_the_engine_decodes_and_chunks_prefills_through_the_310p_ops(tiny_qwen3: Path,
                                                                     on_310p: None) -> None:
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16)  # chunks the 40 tokens
    expected = [c.token_ids for c in Engine(TorchBackend(tiny_qwen3, config, FP32))
                .generate(PROMPTS, greedy)]
    torch_npu_sim.calls.clear()
    npu = Engine(TorchBackend(tiny_qwen3, config, FP32, ops=Npu310POps(torch_npu_sim)))
    assert [c.token_ids for c in npu.generate(PROMPTS, greedy)] == expected
    used = set(torch_npu_sim.calls)
    assert {"_npu_flash_attention", "_npu_paged_attention_splitfuse", "_npu_paged_attention",
            "_npu_reshape_and_cache", "npu_format_cast", "npu_add_rms_norm",
            "_npu_rotary_embedding"} <= used
    assert "npu_swiglu" not in used  # not built for the 310P (the simulation would refuse)


def test_a_cached_prefix_is_read_in_place_by_the_310p_ops(tiny_qwen3: Path,
                                                          on_310p: None) -> None:
    """Prefix caching: the second and third prompts start after the first's cached block of
    128 tokens, a prefill chunk after cached context through the paged kernel."""
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    shared = list(range(1000, 1140))
    prompts = [shared + [7 * i + j for j in range(5)] for i in range(1, 4)]
    off = EngineConfig(max_num_seqs=4, enable_prefix_caching=False)
    reference = Engine(TorchBackend(tiny_qwen3, off, FP32))
    expected = [reference.generate([p], greedy)[0].token_ids for p in prompts]
    npu = Engine(TorchBackend(tiny_qwen3, EngineConfig(max_num_seqs=4), FP32,
                              ops=Npu310POps(torch_npu_sim)))
    assert npu.backend.capacity.block_size == 128
    assert [npu.generate([p], greedy)[0].token_ids for p in prompts] == expected
    assert npu.prefix_cache_stats.cached_tokens == 2 * 128


def test_the_310p_cache_is_the_910b_cache_in_nz(tiny_qwen3: Path, on_310p: None) -> None:
    """The same prompt through both sets: every used block of the NZ cache converts to the
    910B's [128, kv_heads, head_dim] block and back."""
    prompt = list(range(7, 7 + 150))  # two blocks, the second partly filled
    nz_runner = ModelRunner(tiny_qwen3, FP32, max_model_len=256, ops=Npu310POps(torch_npu_sim))
    nz_runner.prefill_hidden_states(prompt)
    torch_npu_sim.SocVersion.value = 223
    nd_runner = ModelRunner(tiny_qwen3, FP32, max_model_len=256, ops=NpuOps(torch_npu_sim))
    nd_runner.prefill_hidden_states(prompt)
    assert isinstance(nz_runner.cache, NzKVCache)
    cfg = nz_runner.model_config
    width = cfg.num_key_value_heads * cfg.head_dim
    for layer in range(cfg.num_hidden_layers):
        for kv in (0, 1):
            nz = nz_runner.cache.layers[layer][kv][:2]
            nd = nd_runner.cache.data[layer, kv, :2]  # [2, 128, kv_heads, head_dim]
            torch.testing.assert_close(nz, nd_to_nz(nd.reshape(2, 128, width)),
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(nz_to_nd(nz, 128, width).reshape(nd.shape), nd,
                                       rtol=1e-5, atol=1e-5)
    assert nz_runner.cache.layers[0][0][1, :, 150 - 128:].abs().sum() == 0  # unused slots


def test_float16_is_the_310p_default_and_tracks_float32(tiny_qwen3: Path,
                                                        on_310p: None) -> None:
    settings = TorchSettings(kv_cache_gb=0.05, cpu_kernels=False, threads=2)
    half = ModelRunner(tiny_qwen3, settings, max_model_len=256, ops=Npu310POps(torch_npu_sim))
    assert half.dtype == torch.float16 and half.cache.layers[0][0].dtype == torch.float16
    reference = ModelRunner(tiny_qwen3, FP32, max_model_len=256)
    for prompt in PROMPTS:
        one, two = (r.logits(r.prefill_hidden_states(prompt)) for r in (reference, half))
        assert cosine(one, two) > 0.999
    checkpoint = ModelConfig.from_dir(tiny_qwen3)  # float32: the CPU's; an NPU's follows its SoC
    assert settings.dtype_name(checkpoint) == "float32"
    assert TorchSettings(device="npu:0").dtype_name(checkpoint, 223) == "bfloat16"
    assert TorchSettings(device="npu:0").dtype_name(checkpoint, 202) == "float16"


def test_what_a_310p_cannot_run_is_refused(tiny_qwen3: Path, on_310p: None) -> None:
    ops = Npu310POps(torch_npu_sim)
    with pytest.raises(ModelConfigError, match="no bfloat16.*--dtype float16"):
        ModelRunner(tiny_qwen3, TorchSettings(kv_cache_gb=0.05, dtype="bfloat16"),
                    max_model_len=256, ops=ops)
    with pytest.raises(ModelConfigError, match="blocks of 128 or 64 tokens, not 32"):
        ops.kv_cache_shape(2, 4, 32, 2, 32)
    with pytest.raises(ModelConfigError, match=r"multiple of 16"):
        ops.kv_cache_shape(2, 4, 128, 1, 40)
    assert ops.kv_cache_shape(2, 4, 64, 2, 32) == (2, 2, 4, 4, 64, 16)


@pytest.mark.parametrize("quant,kernel", [
    (QuantConfig(Scheme.W8A8, activations=Activations.STATIC), "npu_quant_matmul"),
    (QuantConfig(Scheme.W8A16), None)], ids=["w8a8-static", "w8a16"])
def test_int8_on_the_310p(tiny_qwen3: Path, tmp_path: Path, on_310p: None,
                          quant: QuantConfig, kernel: str | None) -> None:
    """W8A8 with calibrated activations runs on npu_quant_matmul, its float16 output taking
    the scale as int64 bits; W8A16 has no 310P kernel here and is dequantized on load."""
    from worker.quant.quantize import quantize_model

    model = quantize_model(tiny_qwen3, tmp_path / "int8", quant, calib=PROMPTS,
                           progress=False).out_dir
    torch_npu_sim.calls.clear()
    settings = TorchSettings(kv_cache_gb=0.05, cpu_kernels=False, threads=2)  # float16
    npu = ModelRunner(model, settings, max_model_len=256, ops=Npu310POps(torch_npu_sim))
    reference = ModelRunner(tiny_qwen3, FP32, max_model_len=256)
    for prompt in PROMPTS:
        one, two = (r.logits(r.prefill_hidden_states(prompt)) for r in (reference, npu))
        assert cosine(one, two) > 0.99
    if kernel is None:
        assert not {"npu_quant_matmul", "npu_weight_quant_batchmatmul"} & set(
            torch_npu_sim.calls)
    else:
        assert kernel in torch_npu_sim.calls
