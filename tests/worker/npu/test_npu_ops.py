"""The NPU op set on the CPU through a simulation of torch_npu (tests/worker/npu/
torch_npu_sim.py: the real signatures and conventions, reference arithmetic). The model's
logits and greedy tokens through it must equal PyTorch's op set's: prefill, chunked prefill
over the paged cache, and batched decode. Nothing here runs on Ascend hardware."""

from __future__ import annotations

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
from worker.model.npu_310p_ops import Npu310POps
from worker.model.npu_ops import NpuOps, npu_ops_for, soc_family
from worker.quant.scheme import Activations, QuantConfig, Scheme

SETTINGS = TorchSettings(kv_cache_gb=0.05, cpu_kernels=False, threads=2, dtype="float32")
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [50, 60, 70], list(range(300, 340))]


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_prefill_logits_through_the_npu_ops_equal_pytorchs(tiny_model_dir, arch: str) -> None:
    model: Path = tiny_model_dir(arch)
    reference = ModelRunner(model, SETTINGS, max_model_len=256)
    npu = ModelRunner(model, SETTINGS, max_model_len=256, ops=NpuOps(torch_npu_sim))
    assert npu.block_size == 128 and npu.cache.data.shape[3:] == (128, 2, npu.model_config.head_dim)
    for prompt in PROMPTS:
        one, two = (r.logits(r.prefill_hidden_states(prompt)) for r in (reference, npu))
        torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-4)


def test_the_engine_decodes_and_chunks_prefills_through_the_npu_ops(tiny_qwen3: Path) -> None:
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    # a 16-token step budget cuts the 40-token prompt into chunks after cached context
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16)
    expected = [c.token_ids for c in Engine(TorchBackend(tiny_qwen3, config, SETTINGS))
                .generate(PROMPTS, greedy)]
    torch_npu_sim.calls.clear()
    npu = Engine(TorchBackend(tiny_qwen3, config, SETTINGS, ops=NpuOps(torch_npu_sim)))
    assert [c.token_ids for c in npu.generate(PROMPTS, greedy)] == expected
    used = set(torch_npu_sim.calls)
    assert {"_npu_paged_attention", "npu_fused_infer_attention_score", "npu_add_rms_norm",
            "_npu_reshape_and_cache", "_npu_rotary_embedding", "npu_swiglu"} <= used


def test_a_cached_prefix_is_read_in_place_by_the_npu_ops(tiny_qwen3: Path) -> None:
    """Prefix caching: the second and third prompts start after the first's cached block of
    128 tokens, a prefill chunk after cached context through the paged kernel."""
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    shared = list(range(1000, 1140))
    prompts = [shared + [7 * i + j for j in range(5)] for i in range(1, 4)]
    off = EngineConfig(max_num_seqs=4, enable_prefix_caching=False)
    reference = Engine(TorchBackend(tiny_qwen3, off, SETTINGS))
    expected = [reference.generate([p], greedy)[0].token_ids for p in prompts]
    npu = Engine(TorchBackend(tiny_qwen3, EngineConfig(max_num_seqs=4), SETTINGS,
                              ops=NpuOps(torch_npu_sim)))
    assert npu.backend.capacity.block_size == 128
    assert [npu.generate([p], greedy)[0].token_ids for p in prompts] == expected
    assert npu.prefix_cache_stats.cached_tokens == 2 * 128


def test_the_op_set_follows_the_soc_and_refuses_what_it_cannot_run() -> None:
    assert [soc_family(v) for v in (220, 223, 250, 202)] == ["910b", "910b", "a3", "310p"]
    with pytest.raises(ModelConfigError, match="SoC version 100"):
        soc_family(100)
    assert type(npu_ops_for(torch_npu_sim)) is NpuOps
    torch_npu_sim.SocVersion.value = 202
    try:
        assert isinstance(npu_ops_for(torch_npu_sim), Npu310POps)
    finally:
        torch_npu_sim.SocVersion.value = 223
    assert NpuOps.default_dtype is torch.bfloat16 and Npu310POps.default_dtype is torch.float16
    with pytest.raises(ModelConfigError, match="blocks of 128"):
        NpuOps(torch_npu_sim).kv_cache_shape(2, 4, 16, 2, 32)


@pytest.mark.parametrize("quant", [
    QuantConfig(Scheme.W8A16), QuantConfig(Scheme.W8A16, group_size=32),
    QuantConfig(Scheme.W8A8, activations=Activations.DYNAMIC)],
    ids=["w8a16", "w8a16-group32", "w8a8-dynamic"])
def test_int8_checkpoints_run_on_the_npus_quantized_matmuls(tiny_qwen3: Path, tmp_path: Path,
                                                             quant: QuantConfig) -> None:
    from worker.quant.quantize import quantize_model

    model = quantize_model(tiny_qwen3, tmp_path / "int8", quant, progress=False).out_dir
    torch_npu_sim.calls.clear()
    npu = ModelRunner(model, SETTINGS, max_model_len=256, ops=NpuOps(torch_npu_sim))
    kernel = ("npu_quant_matmul" if quant.scheme is Scheme.W8A8
              else "npu_weight_quant_batchmatmul")
    reference = ModelRunner(tiny_qwen3, SETTINGS, max_model_len=256)  # the float model
    for prompt in PROMPTS:
        one, two = (r.logits(r.prefill_hidden_states(prompt)) for r in (reference, npu))
        assert torch.nn.functional.cosine_similarity(one, two, dim=-1).min() > 0.99
    assert kernel in torch_npu_sim.calls
    if quant.scheme is Scheme.W8A16:  # the same int8 weights as npuserve's own CPU path,
        cpu = ModelRunner(model, SETTINGS, max_model_len=256)  # which rounds activations
        for prompt in PROMPTS:
            one, two = (r.logits(r.prefill_hidden_states(prompt)) for r in (cpu, npu))
            assert torch.nn.functional.cosine_similarity(one, two, dim=-1).min() > 0.9999
