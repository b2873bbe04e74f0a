"""Random checkpoints shaped like the models npuserve serves, for benchmarks and device checks.

Random weights are enough where two implementations of the same weights are compared or speed
is measured: speed depends on shapes, not values. A checkpoint is built once (seeded, float32,
from the config alone: no network) and reused; it has no tokenizer, so whatever runs on it
deals in token ids only.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from common.errors import ResourceExhaustedError

log = logging.getLogger(__name__)

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-tiny": dict(arch="qwen3", vocab_size=1024, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, tie_word_embeddings=False),
    "smollm2-135m": dict(arch="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True),
    "qwen3-0.6b": dict(arch="qwen3", vocab_size=151936, hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-1.7b": dict(arch="qwen3", vocab_size=151936, hidden_size=2048,
                       intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
}
"""transformers config fields of each shape, and `arch`: qwen3 or llama."""


def default_dir() -> Path:
    """Where `npuserve bench engine --shape` keeps the checkpoints it builds."""
    return Path.home() / ".cache" / "npuserve" / "shapes"


def float32_bytes(shape: dict[str, Any]) -> int:
    """Size of the shape's weights in float32: what its checkpoint takes on disk and in memory."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = shape.get("head_dim", hidden // shape["num_attention_heads"])
    q = shape["num_attention_heads"] * head_dim
    kv = shape["num_key_value_heads"] * head_dim
    layer = (hidden * (q + 2 * kv) + q * hidden  # q, k, v, o projections
             + 3 * hidden * inter  # gate, up, down
             + 2 * hidden  # the two RMSNorms
             + (2 * head_dim if shape["arch"] == "qwen3" else 0))  # q and k norms
    embed = shape["vocab_size"] * hidden
    params = (shape["num_hidden_layers"] * layer + hidden
              + embed * (1 if shape["tie_word_embeddings"] else 2))
    return 4 * params


def build(path: Path, shape: dict[str, Any]) -> Path:
    """A random checkpoint of `shape` in `path` (seeded); reused when `path` already holds one.

    Written into a temporary sibling and renamed into place, so an interrupted build is never
    mistaken for a finished one.
    """
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from worker.checkpoints.atomic import atomic_directory

    need = float32_bytes(shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < need * 1.1:
        raise ResourceExhaustedError(f"building {path.name} needs {need / 1e9:.1f} GB on disk, "
                      f"{path.parent} has {free / 1e9:.1f} GB free: choose another --shape-dir")
    log.info("building a random %s checkpoint (%.1f GB) in %s", path.name, need / 1e9, path)
    torch.manual_seed(0)
    fields = {k: v for k, v in shape.items() if k != "arch"}
    common: dict[str, Any] = dict(max_position_embeddings=4096, rms_norm_eps=1e-6,
                                  initializer_range=0.02, bos_token_id=1, eos_token_id=2,
                                  rope_theta=1e6)
    config = (Qwen3Config(**fields, **common) if shape["arch"] == "qwen3"
              else LlamaConfig(**fields, **common))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
    return path


def checkpoint(name: str, root: Path | None = None) -> Path:
    """The checkpoint of shape `name` under `root` (default_dir()), built on first use."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return build((root or default_dir()) / name, SHAPES[name])
