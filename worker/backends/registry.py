"""Backends by name. Each entry is imported only when chosen, so vendor SDKs stay optional."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from common.errors import ModelConfigError
from worker.backends.base import Backend

BACKENDS: dict[str, str] = {
    "torch": "worker.backends.torch_backend:TorchBackend",
}


def create_backend(name: str, model_dir: str | Path, **options: Any) -> Backend:
    if name not in BACKENDS:
        raise ModelConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, _, cls = BACKENDS[name].partition(":")
    backend_cls = getattr(importlib.import_module(module), cls)
    backend: Backend = backend_cls(model_dir, **options)
    return backend
