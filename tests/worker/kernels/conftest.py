"""What the kernel tests share: the process's compiled kernels, seeded generators, float
projections, and a dispatch cache of the test's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.kernels import dispatch
from worker.kernels.cpu import CpuKernels, cpu_kernels
from worker.model.linear import Projection


@pytest.fixture(scope="module")
def k() -> CpuKernels:
    kernels = cpu_kernels()
    assert kernels is not None, "the CPU kernels did not build on this machine"
    return kernels


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The dispatch table's cache in the test's own directory, never retuned by the
    environment."""
    monkeypatch.setattr(dispatch, "cache_dir", lambda: tmp_path)
    monkeypatch.delenv("NPUSERVE_KERNEL_RETUNE", raising=False)
    return tmp_path


def projections(k: CpuKernels, *shapes: tuple[int, int], pack: bool = True) -> list[Projection]:
    g = torch.Generator().manual_seed(0)
    return [Projection(torch.randn(*shape, generator=g), torch.randn(shape[0], generator=g),
                       pack=pack, kernels=k) for shape in shapes]
