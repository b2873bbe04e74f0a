"""The torch backend's defaults that depend on the machine."""

from __future__ import annotations

import pytest
import torch

from common.config import LATENCY_PREFILL_STALL
from worker.backends.torch_backend import default_prefill_stall


@pytest.mark.parametrize(("device", "capability", "stall"), [
    ("cpu", "AVX512", LATENCY_PREFILL_STALL),
    ("cpu", "AVX2", 0.0),
    ("cpu", "DEFAULT", 0.0),
    ("cuda", "AVX512", 0.0),
])
def test_the_prefill_cap_is_on_by_default_only_on_a_cpu_with_avx512(
        monkeypatch: pytest.MonkeyPatch, device: str, capability: str, stall: float) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert default_prefill_stall(torch.device(device)) == stall
