"""A model directory appears whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.checkpoints.atomic import atomic_directory, is_complete_model


def test_directory_appears_only_when_the_build_finishes(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not out.exists()
    assert (out / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_failed_build_leaves_neither_output_nor_temporary_files(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt), atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_the_previous_model(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        raise RuntimeError("interrupted")
    assert (out / "config.json").read_text() == "old"


def test_rebuild_replaces_the_previous_model_entirely(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "stale.txt").write_text("old")
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_model_is_complete_only_with_config_weights_and_tokenizer(tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("x")
        assert not is_complete_model(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("x")
    assert is_complete_model(tmp_path)
