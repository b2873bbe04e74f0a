"""Random shaped checkpoints: built once, seeded, sized as the shape says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from worker.bench import shapes


def test_the_tiny_shape_builds_a_seeded_float32_checkpoint_without_a_tokenizer(
        tmp_path: Path) -> None:
    a = shapes.checkpoint("qwen3-tiny", tmp_path / "a")
    b = shapes.build(tmp_path / "b" / "qwen3-tiny", shapes.SHAPES["qwen3-tiny"])
    assert a == tmp_path / "a" / "qwen3-tiny"
    config = json.loads((a / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["head_dim"]) == ("qwen3", 64, 16)
    assert not list(a.glob("tokenizer*"))
    weights, again = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights.keys() == again.keys()
    assert all(weights[k].equal(again[k]) for k in weights)
    assert sum(t.numel() * 4 for t in weights.values()) == shapes.float32_bytes(
        shapes.SHAPES["qwen3-tiny"])


def test_a_built_checkpoint_is_reused(tmp_path: Path) -> None:
    path = shapes.checkpoint("qwen3-tiny", tmp_path)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert shapes.checkpoint("qwen3-tiny", tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_qwen3_shapes_have_their_models_parameter_counts() -> None:
    # Qwen3-0.6B: 0.6B parameters (0.44B without embeddings); Qwen3-1.7B: 1.7B (1.4B)
    assert shapes.float32_bytes(shapes.SHAPES["qwen3-0.6b"]) / 4 == pytest.approx(0.6e9, rel=0.02)
    assert shapes.float32_bytes(shapes.SHAPES["qwen3-1.7b"]) / 4 == pytest.approx(1.72e9, rel=0.02)


def test_an_unknown_shape_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qwen3-1.7b"):
        shapes.checkpoint("qwen3-8b", tmp_path)
