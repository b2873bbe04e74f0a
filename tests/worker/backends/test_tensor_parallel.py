"""Tensor parallelism for real on the CPU: two ranks in two processes over gloo, against the
same model on one rank. Reductions run in another order, so logits agree to float32
tolerance, not bit for bit; greedy tokens agree exactly."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from common.config import EngineConfig
from common.errors import ModelConfigError
from common.sampling_params import SamplingParams
from tests.worker.quant.conftest import W8A8, W8A16
from worker.backends.tensor_parallel import decode, encode
from worker.backends.torch_backend import TorchBackend
from worker.backends.torch_runner import ModelRunner
from worker.backends.torch_settings import TorchSettings
from worker.engine.engine import Engine
from worker.model.config import ModelConfig
from worker.model.sharding import Shard
from worker.quant.scheme import QuantConfig

pytestmark = pytest.mark.timeout(300)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [50, 60, 70], [900, 12, 7, 7, 7, 300]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SETTINGS = TorchSettings(kv_cache_gb=0.02, threads=1)


@pytest.fixture(scope="module")
def one_kv_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 with one KV head (as Qwen2.5-72B has 8 for 8 ranks, fewer than ranks)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    path = tmp_path_factory.mktemp("kv1")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                         initializer_range=0.1, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def engine(model: Path, ranks: int) -> Engine:
    settings = dataclasses.replace(SETTINGS, tensor_parallel=ranks)
    return Engine(TorchBackend(model, EngineConfig(max_num_seqs=4), settings))


@pytest.fixture(params=["qwen3", "kv1"])  # one tensor-parallel group per process at a time
def pair(request: pytest.FixtureRequest, tiny_qwen3: Path, one_kv_head: Path
         ) -> Iterator[tuple[Path, Engine, Engine]]:
    model = tiny_qwen3 if request.param == "qwen3" else one_kv_head
    single, split = engine(model, 1), engine(model, 2)
    yield model, single, split
    split.backend.close()


def test_two_ranks_give_the_logits_of_one(pair: tuple[Path, Engine, Engine]) -> None:
    _, single, split = pair
    for prompt in PROMPTS:
        runners = [e.backend.runner for e in (single, split)]  # type: ignore[attr-defined]
        one, two = (r.logits(r.prefill_hidden_states(prompt)) for r in runners)
        torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-4)


def test_two_ranks_generate_the_greedy_tokens_of_one(pair: tuple[Path, Engine, Engine]) -> None:
    _, single, split = pair
    expected = [c.token_ids for c in single.generate(PROMPTS, GREEDY)]
    assert [c.token_ids for c in split.generate(PROMPTS, GREEDY)] == expected


def test_a_rank_holds_its_heads_and_its_share_of_the_mlp(tiny_qwen3: Path,
                                                          one_kv_head: Path) -> None:
    full = ModelConfig.from_dir(tiny_qwen3)
    for rank in range(2):
        cfg = Shard(rank, 2).config(full)
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (
            full.num_attention_heads // 2, full.num_key_value_heads // 2,
            full.intermediate_size // 2)
    kv1 = ModelConfig.from_dir(one_kv_head)
    assert Shard(1, 2).config(kv1).num_key_value_heads == 1  # replicated on both ranks
    runner = ModelRunner(one_kv_head, SETTINGS, shard=Shard(1, 2))
    qkv = runner.weights.layers[0].qkv.weight  # type: ignore[union-attr]
    assert qkv.shape[0] == (2 + 1 + 1) * kv1.head_dim
    assert runner.weights.embed.shape[0] == kv1.vocab_size // 2  # its vocabulary rows
    assert runner.weights.vocab_rows == slice(512, 1024)


def test_shapes_that_do_not_divide_are_refused_naming_them(tiny_qwen3: Path) -> None:
    full = ModelConfig.from_dir(tiny_qwen3)
    with pytest.raises(ModelConfigError, match="4 attention heads.*--tensor-parallel"):
        Shard(0, 3).config(full)


def test_a_step_travels_as_integers_and_comes_back_whole() -> None:
    from worker.backends.base import SequenceChunk

    chunks = [SequenceChunk("a", [5, 6, 7], 0, [3, 9], True, GREEDY),
              SequenceChunk("b", [8], 17, [1, 2], False, GREEDY)]
    back = decode(encode(chunks))
    assert [(c.token_ids, c.start_pos, c.block_table, c.sample) for c in back] == [
        (c.token_ids, c.start_pos, c.block_table, c.sample) for c in chunks]


@pytest.mark.parametrize("quant", [W8A16, W8A8], ids=["w8a16", "w8a8"])
def test_int8_checkpoints_split_too(tiny_qwen3: Path, tmp_path: Path,
                                    quant: QuantConfig) -> None:
    from worker.quant.quantize import quantize_model

    model = tmp_path / "int8"
    quantize_model(tiny_qwen3, model, quant, progress=False)
    single, split = engine(model, 1), engine(model, 2)
    try:
        for prompt in PROMPTS:
            runners = [e.backend.runner for e in (single, split)]  # type: ignore[attr-defined]
            one, two = (r.logits(r.prefill_hidden_states(prompt)) for r in runners)
            if quant is W8A16:  # int8 weights: only the reduction order differs
                torch.testing.assert_close(two, one, rtol=1e-3, atol=1e-3)
            else:  # w8a8 quantizes each rank's share of an activation row on its own scale
                cosine = torch.nn.functional.cosine_similarity(one, two, dim=-1)
                assert cosine.min() > 0.999
                assert (one.argmax(-1) == two.argmax(-1)).float().mean() >= 0.85
        if quant is W8A16:
            expected = [c.token_ids for c in single.generate(PROMPTS, GREEDY)]
            assert [c.token_ids for c in split.generate(PROMPTS, GREEDY)] == expected
    finally:
        split.backend.close()
