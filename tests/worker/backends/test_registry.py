"""Backends by name, each with the settings class its flags come from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common.config import EngineConfig
from common.errors import ModelConfigError
from worker.backends.registry import BACKENDS, backend_entry, create_backend
from worker.backends.torch_backend import TorchBackend
from worker.backends.torch_settings import TorchSettings


def test_every_entry_names_a_frozen_settings_dataclass_with_defaults() -> None:
    for entry in BACKENDS.values():
        assert dataclasses.is_dataclass(entry.settings)
        settings = entry.settings()  # every field has a default
        first = dataclasses.fields(settings)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(settings, first, getattr(settings, first))


def test_the_torch_backend_takes_its_settings_and_the_engine_limits(tiny_qwen3: Path) -> None:
    backend = create_backend("torch", tiny_qwen3, EngineConfig(max_num_seqs=3,
                                                               max_num_batched_tokens=64),
                             TorchSettings(kv_cache_gb=0.01, block_size=8))
    assert isinstance(backend, TorchBackend)
    assert backend.settings.block_size == 8
    c = backend.capacity
    assert (c.max_batch, c.max_tokens_per_step, c.block_size) == (3, 64, 8)
    assert c.num_blocks == backend.runner.num_blocks


def test_an_unknown_backend_or_foreign_settings_are_refused(tiny_qwen3: Path) -> None:
    with pytest.raises(ModelConfigError,
                       match="unknown backend 'ascend'; choose one of torch, sophon"):
        backend_entry("ascend")
    with pytest.raises(ModelConfigError, match="takes TorchSettings, not EngineConfig"):
        create_backend("torch", tiny_qwen3, settings=EngineConfig())


def test_the_sophon_backend_refuses_a_directory_that_is_not_a_compiled_bmodel(
        tiny_qwen3: Path) -> None:
    with pytest.raises(ModelConfigError, match="npuserve model bmodel"):
        create_backend("sophon", tiny_qwen3)
