"""Backends by name. Each entry names the backend's class, imported only when chosen (so
vendor SDKs stay optional), and its settings class, light enough for the CLI to list."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import EngineConfig
from common.errors import ModelConfigError
from worker.backends.base import Backend
from worker.backends.sophon.settings import SophonSettings
from worker.backends.synthetic_settings import SyntheticSettings
from worker.backends.torch_settings import TorchSettings


@dataclass(frozen=True, slots=True)
class BackendEntry:
    name: str
    target: str
    """"module:Class" of the Backend."""
    settings: type
    """Frozen dataclass of the backend's own settings; its fields become worker flags."""


BACKENDS: dict[str, BackendEntry] = {e.name: e for e in (
    BackendEntry("torch", "worker.backends.torch_backend:TorchBackend", TorchSettings),
    BackendEntry("sophon", "worker.backends.sophon.backend:SophonBackend", SophonSettings),
    # no model: a fixed step time and deterministic tokens, for load tests of the serving path
    BackendEntry("synthetic", "worker.backends.synthetic:SyntheticBackend", SyntheticSettings),
)}


def backend_entry(name: str) -> BackendEntry:
    if name not in BACKENDS:
        raise ModelConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def create_backend(name: str, model_dir: str | Path, engine: EngineConfig | None = None,
                   settings: Any = None) -> Backend:
    """The backend `name` serving model_dir within the engine's limits; settings: an
    instance of the entry's settings class (None: its defaults)."""
    entry = backend_entry(name)
    settings = entry.settings() if settings is None else settings
    if not isinstance(settings, entry.settings):
        raise ModelConfigError(f"backend {name!r} takes {entry.settings.__name__}, "
                               f"not {type(settings).__name__}")
    module, _, cls = entry.target.partition(":")
    backend_cls = getattr(importlib.import_module(module), cls)
    backend: Backend = backend_cls(model_dir, engine or EngineConfig(), settings)
    return backend
