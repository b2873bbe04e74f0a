"""Teacher-forced passes over whole texts: the hidden state and logits at every position.

Calibration and verification need what serving never produces, the output of every position
of a prompt, so they call the forward pass directly on a torch backend sized for one text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.config import EngineConfig
from worker.backends.torch_backend import TorchBackend
from worker.model.attention import AttentionMetadata, PrefillSegment
from worker.model.config import ModelConfig
from worker.model.transformer import compute_logits


def load_backend(model_dir: str | Path, max_tokens: int, *, device: str = "cpu",
                 dtype: str = "float32", threads: int | None = None) -> TorchBackend:
    """A torch backend whose KV cache holds one sequence of `max_tokens` (plus a block)."""
    cfg = ModelConfig.from_dir(model_dir)
    block = EngineConfig().block_size
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    itemsize = getattr(torch, dtype).itemsize
    kv_gb = (max_tokens + 2 * block) * per_token * itemsize / 2**30
    config = EngineConfig(device=device, dtype=dtype, kv_cache_gb=kv_gb, threads=threads,
                          max_model_len=max_tokens + 2 * block)
    return TorchBackend(model_dir, config)


@torch.inference_mode()
def hidden_states(backend: TorchBackend, ids: list[int]) -> torch.Tensor:
    """Prefill `ids` as one fresh sequence -> final hidden states [T, hidden]."""
    t = len(ids)
    if t > backend.capacity.max_seq_len:
        raise ValueError(f"text of {t} tokens is longer than the {backend.capacity.max_seq_len} "
                         "this backend was sized for")
    dev = backend.device
    positions = torch.arange(t, device=dev)
    meta = AttentionMetadata(slot_mapping=positions, num_decodes=0, decode=None,
                             prefills=[PrefillSegment(0, t, None)])
    return backend.forward(torch.tensor(ids, device=dev), positions, meta)


@torch.inference_mode()
def logits(backend: TorchBackend, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [n, hidden] -> float32 logits [n, vocab] on the CPU."""
    return compute_logits(backend.weights, hidden).cpu()
