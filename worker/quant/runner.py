"""A model runner sized for teacher-forced passes over whole texts.

Calibration and verification need what serving never produces, the output of every position
of a prompt, so they use the torch backend's model runner directly
(`ModelRunner.prefill_hidden_states`, then `ModelRunner.logits`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from worker.backends.torch_runner import ModelRunner
from worker.backends.torch_settings import TorchSettings
from worker.model.config import ModelConfig
from worker.model.ops import DecoderOps


def load_runner(model_dir: str | Path, max_tokens: int, *, device: str = "cpu",
                dtype: str = "float32", threads: int | None = None) -> ModelRunner:
    """A runner whose KV cache holds one sequence of `max_tokens` (plus a block or two)."""
    cfg = ModelConfig.from_dir(model_dir)
    block = DecoderOps.default_block_size
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    kv_gb = (max_tokens + 2 * block) * per_token * getattr(torch, dtype).itemsize / 2**30
    settings = TorchSettings(device=device, dtype=dtype, kv_cache_gb=kv_gb, threads=threads)
    return ModelRunner(model_dir, settings, max_model_len=max_tokens + 2 * block)

