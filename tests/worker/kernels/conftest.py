"""What the kernel tests share: the process's compiled kernels and seeded generators."""

from __future__ import annotations

import pytest
import torch

from worker.kernels.cpu import CpuKernels, cpu_kernels


@pytest.fixture(scope="module")
def k() -> CpuKernels:
    kernels = cpu_kernels()
    assert kernels is not None, "the CPU kernels did not build on this machine"
    return kernels


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
