"""Tiny random checkpoints (Qwen3, Qwen2, Llama) with the real Qwen tokenizer, for tests.

They exercise loading, batching, streaming and numerics against the transformers reference
in a couple of seconds; their output is noise. The three architectures differ where real
checkpoints differ, so one test matrix covers the loader's branches:

| arch  | layers | head_dim              | embeddings | other                                 |
| ----- | ------ | --------------------- | ---------- | ------------------------------------- |
| qwen3 | 3      | 32 (≠ hidden / heads) | untied     | q/k RMSNorm; eos list in generation   |
| qwen2 | 2      | 16                    | tied       | q/k/v bias                            |
| llama | 4      | 16                    | untied     | rope_theta 10000 (the others 1e6)     |

All use hidden 64, 4 query heads over 2 KV heads (GQA), intermediate 128, 2048 positions and
Qwen's 151,936-row embedding (151,669 tokens padded, as in real Qwen checkpoints).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from worker.checkpoints.atomic import atomic_directory
from worker.checkpoints.qwen_tokenizer import SPECIAL_START_ID, build_qwen_tokenizer

log = logging.getLogger(__name__)

Arch = Literal["qwen3", "qwen2", "llama"]
ARCHS: tuple[Arch, ...] = ("qwen3", "qwen2", "llama")

TINY_VERSION = "1"
"""Bump when the builder's output changes, so cached test checkpoints are rebuilt."""

VOCAB_SIZE = 151936
ENDOFTEXT_ID = SPECIAL_START_ID
IM_END_ID = SPECIAL_START_ID + 2

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    # Larger than the 0.02 default so attention is far from uniform and a wrong mask or
    # rotary embedding changes the logits visibly.
    "initializer_range": 0.1,
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": IM_END_ID,
    "pad_token_id": ENDOFTEXT_ID,
}

_ARCH_CONFIGS: dict[Arch, dict[str, Any]] = {
    "qwen3": {
        "num_hidden_layers": 3,
        "head_dim": 32,
        "tie_word_embeddings": False,
        "rope_theta": 1e6,
    },
    "qwen2": {"num_hidden_layers": 2, "tie_word_embeddings": True, "rope_theta": 1e6},
    "llama": {"num_hidden_layers": 4, "tie_word_embeddings": False, "rope_theta": 10000.0},
}


def tiny_config(arch: Arch) -> Any:
    """The transformers config of the tiny `arch` model."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    config_cls = {"qwen3": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig}
    if arch not in config_cls:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return config_cls[arch](**_COMMON, **_ARCH_CONFIGS[arch])


def _randomize_norms_and_biases(model: Any) -> None:
    """Give norm weights and biases random values: they start at 1 and 0, which would let a
    loader that drops them pass every comparison."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)


def _generation_config(arch: Arch) -> Any:
    from transformers import GenerationConfig

    if arch == "qwen3":
        # As Qwen3 ships it: two stop ids, sampling defaults.
        return GenerationConfig(
            bos_token_id=ENDOFTEXT_ID,
            eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
            pad_token_id=ENDOFTEXT_ID,
            do_sample=True,
            temperature=0.6,
            top_k=20,
            top_p=0.95,
        )
    return GenerationConfig(
        bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID
    )


def build_tiny_checkpoint(out_dir: Path, arch: Arch = "qwen3", seed: int = 0) -> Path:
    """Build a tiny random `arch` checkpoint in `out_dir` and return it.

    Writes config.json, model.safetensors (float32), generation_config.json and the Qwen3
    tokenizer. The same `seed` gives the same weights. `out_dir` is replaced atomically.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_norms_and_biases(model)
    model.eval()
    with atomic_directory(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _generation_config(arch).save_pretrained(tmp)
        build_qwen_tokenizer(tmp)
    log.info("built tiny %s checkpoint (seed %d) in %s", arch, seed, out_dir)
    return Path(out_dir)
