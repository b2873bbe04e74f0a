"""npuserve's forward against transformers' reference forward on the same tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.errors import ModelConfigError
from common.sampling_params import SamplingParams
from worker.backends.base import SequenceChunk
from worker.backends.torch_backend import TorchBackend
from worker.backends.torch_settings import TorchSettings
from worker.model.config import ModelConfig

PARAMS = SamplingParams()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.fixture(params=["qwen3", "qwen2", "llama"])
def arch_dir(request: pytest.FixtureRequest, tiny_model_dir) -> Path:
    return tiny_model_dir(request.param)


@pytest.fixture(params=["cpu-kernels", "torch"])
def ops(request: pytest.FixtureRequest) -> str:
    """Which DecoderOps run the model: the compiled CPU kernels or PyTorch's operators."""
    return str(request.param)


def backend_with(model_dir: Path, ops: str, **settings: object) -> TorchBackend:
    backend = TorchBackend(model_dir, settings=TorchSettings(cpu_kernels=ops == "cpu-kernels",
                                                             **settings))  # type: ignore[arg-type]
    assert backend.runner.ops.name == ops  # the kernels must build here, or the test is not testing
    return backend


def test_prefill_chunks_and_decode_steps_match_transformers(arch_dir: Path, ops: str) -> None:
    ref_model = AutoModelForCausalLM.from_pretrained(arch_dir, dtype=torch.float32).eval()
    backend = backend_with(arch_dir, ops, kv_cache_gb=0.02, block_size=4)
    vocab = ModelConfig.from_dir(arch_dir).vocab_size
    ids = torch.randint(0, vocab, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ref_model(ids).logits[0]  # [24, vocab]
    table = list(range(7))  # 28 slots, not contiguous with anything else in the cache
    tokens = ids[0].tolist()

    backend.execute([SequenceChunk("a", tokens[:9], 0, table, False, PARAMS)])
    out = backend.execute([SequenceChunk("a", tokens[9:18], 9, table, True, PARAMS)])
    assert rel_err(out.logits[0], ref[17]) < 1e-4
    for pos in range(18, 24):  # decode steps, one token each
        out = backend.execute([SequenceChunk("a", [tokens[pos]], pos, table, True, PARAMS)])
        assert rel_err(out.logits[0], ref[pos]) < 1e-4, f"decode at position {pos}"


def test_a_mixed_batch_of_decodes_and_prefills_matches_each_sequence_alone(
    arch_dir: Path, ops: str
) -> None:
    ref_model = AutoModelForCausalLM.from_pretrained(arch_dir, dtype=torch.float32).eval()
    backend = backend_with(arch_dir, ops, kv_cache_gb=0.02, block_size=4)
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randint(0, 1000, (n,), generator=g).tolist() for n in (11, 6, 9))
    backend.execute([SequenceChunk("a", a[:10], 0, [0, 1, 2], True, PARAMS),
                     SequenceChunk("b", b[:5], 0, [5, 6], True, PARAMS)])
    # one step: two decodes with different context lengths and a fresh prefill
    out = backend.execute([SequenceChunk("c", c, 0, [9, 10, 11], True, PARAMS),
                           SequenceChunk("a", [a[10]], 10, [0, 1, 2], True, PARAMS),
                           SequenceChunk("b", [b[5]], 5, [5, 6], True, PARAMS)])
    with torch.no_grad():
        for row, seq in enumerate((c, a, b)):
            ref = ref_model(torch.tensor([seq])).logits[0, -1]
            assert rel_err(out.logits[row], ref) < 1e-4


def test_bfloat16_weights_track_the_float32_reference(tiny_qwen3: Path) -> None:
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    backend = TorchBackend(tiny_qwen3, settings=TorchSettings(kv_cache_gb=0.02, dtype="bfloat16"))
    ids = list(range(100, 116))
    out = backend.execute([SequenceChunk("a", ids, 0, [0], True, PARAMS)])
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0, -1]
    assert torch.nn.functional.cosine_similarity(out.logits[0], ref, dim=0) > 0.99


def test_unsupported_rope_scaling_is_refused_with_its_name() -> None:
    raw = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2,
           "rope_scaling": {"type": "yarn", "factor": 4.0}}
    with pytest.raises(ModelConfigError, match="yarn"):
        ModelConfig.from_dict(raw)


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ModelConfigError, match="mistral"):
        ModelConfig.from_dict({"model_type": "mistral"})


def test_weight_memory_counts_the_packed_copies_and_reads_count_one(tiny_qwen2: Path) -> None:
    packed = TorchBackend(tiny_qwen2, settings=TorchSettings(kv_cache_gb=0.01))
    plain = TorchBackend(tiny_qwen2, settings=TorchSettings(kv_cache_gb=0.01,
                                                          cpu_packed_weights=False))
    assert packed.weight_bytes() == plain.weight_bytes()
    # tied embeddings: the lm_head is the embedding matrix, held once
    assert plain.weight_memory_bytes() == plain.weight_bytes()
    assert packed.weight_memory_bytes() > plain.weight_memory_bytes()
