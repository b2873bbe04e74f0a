"""Tiny random checkpoints: shapes that cover the loader's branches, real weights, determinism."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from worker.checkpoints.atomic import is_complete_model
from worker.checkpoints.tiny import ARCHS, VOCAB_SIZE, build_tiny_checkpoint, tiny_config

EXPECTED = {
    # arch: (model_type, head_dim, tied, layers)
    "qwen3": ("qwen3", 32, False, 3),
    "qwen2": ("qwen2", 16, True, 2),
    "llama": ("llama", 16, False, 4),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_has_config_weights_tokenizer_and_generation_config(
    arch: str, tiny_model_dir: Callable[..., Path]
) -> None:
    path = tiny_model_dir(arch)
    assert is_complete_model(path)
    assert (path / "generation_config.json").is_file()
    config = json.loads((path / "config.json").read_text())
    model_type, head_dim, tied, layers = EXPECTED[arch]
    assert config["model_type"] == model_type
    assert config["vocab_size"] == VOCAB_SIZE
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is tied
    assert config["num_hidden_layers"] == layers
    assert config["rope_parameters"]["rope_theta"] > 0
    # Qwen2 configs have no head_dim field: it is hidden_size / num_attention_heads.
    assert config.get("head_dim", config["hidden_size"] // 4) == head_dim


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_are_float32_and_lm_head_is_stored_only_when_untied(
    arch: str, tiny_model_dir: Callable[..., Path]
) -> None:
    tensors = load_file(tiny_model_dir(arch) / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert tensors["model.embed_tokens.weight"].shape == (VOCAB_SIZE, 64)
    assert ("lm_head.weight" in tensors) is not EXPECTED[arch][2]


def test_qwen3_has_query_key_norms_and_qwen2_has_projection_biases(
    tiny_qwen3: Path, tiny_qwen2: Path, tiny_llama: Path
) -> None:
    qwen3 = load_file(tiny_qwen3 / "model.safetensors")
    qwen2 = load_file(tiny_qwen2 / "model.safetensors")
    llama = load_file(tiny_llama / "model.safetensors")
    assert qwen3["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    assert qwen3["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert qwen2["model.layers.0.self_attn.k_proj.bias"].shape == (2 * 16,)
    assert not any(name.endswith(".bias") for name in llama)


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_weights_and_biases_are_random_not_their_init_values(
    arch: str, tiny_model_dir: Callable[..., Path]
) -> None:
    tensors = load_file(tiny_model_dir(arch) / "model.safetensors")
    for name, tensor in tensors.items():
        if "norm" in name:
            assert not torch.allclose(tensor, torch.ones_like(tensor)), name
        elif name.endswith(".bias"):
            assert not torch.allclose(tensor, torch.zeros_like(tensor)), name


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_it_and_produces_finite_logits(
    arch: str, tiny_model_dir: Callable[..., Path]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = AutoTokenizer.from_pretrained(path)("Hello, 世界", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    # Random but not degenerate: the next-token distribution is far from uniform.
    assert logits[0, -1].std() > 0.1


def test_the_same_seed_gives_the_same_weights_and_another_seed_different_ones(
    tmp_path: Path, tiny_qwen2: Path
) -> None:
    cached = load_file(tiny_qwen2 / "model.safetensors")
    again = load_file(
        build_tiny_checkpoint(tmp_path / "same", "qwen2", seed=0) / "model.safetensors"
    )
    other = load_file(
        build_tiny_checkpoint(tmp_path / "other", "qwen2", seed=1) / "model.safetensors"
    )
    assert all(torch.equal(cached[name], again[name]) for name in cached)
    assert not torch.equal(cached["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_generation_config_lists_both_qwen3_stop_ids(tiny_qwen3: Path, tiny_llama: Path) -> None:
    qwen3 = json.loads((tiny_qwen3 / "generation_config.json").read_text())
    llama = json.loads((tiny_llama / "generation_config.json").read_text())
    assert qwen3["eos_token_id"] == [151645, 151643]
    assert llama["eos_token_id"] == 151645


def test_unknown_arch_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="qwen3, qwen2, llama"):
        tiny_config("mistral")  # type: ignore[arg-type]
