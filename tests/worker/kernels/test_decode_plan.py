"""The one-call decode step against the per-operator kernel path it replaces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import EngineConfig
from worker.backends.torch_backend import TorchBackend
from worker.model.attention import AttentionMetadata
from worker.model.transformer import forward
from worker.quant.quantize import quantize_model
from worker.quant.scheme import Activations, QuantConfig, Scheme


def decode_step(backend: TorchBackend, lens: list[int]) -> tuple[torch.Tensor, ...]:
    """Fill each sequence's cache with random keys/values, then one decode step of each."""
    n = len(lens)
    width = max(-(-x // backend.cache.block_size) for x in lens)
    g = torch.Generator().manual_seed(n)
    backend.cache.data.copy_(torch.randn(backend.cache.data.shape, generator=g))
    tables = torch.randperm(backend.cache.num_blocks, generator=g)[:n * width].view(n, width)
    lens_t = torch.tensor(lens)
    pos = lens_t - 1
    bs = backend.cache.block_size
    slots = tables[torch.arange(n), pos // bs] * bs + pos % bs
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=n,
                             decode=backend.ops.decode_metadata(tables, lens_t, backend.cache),
                             prefills=[])
    ids = torch.randint(0, 1000, (n,), generator=g)
    return ids, pos, meta


@pytest.mark.parametrize("lens", [[5], [1, 40, 17], list(range(3, 19))])
def test_one_call_equals_the_per_operator_kernels(tiny_model_dir, lens: list[int]) -> None:
    backend = TorchBackend(tiny_model_dir("qwen3"), EngineConfig(kv_cache_gb=0.02, block_size=4))
    ids, pos, meta = decode_step(backend, lens)
    assert backend.plan is not None and backend.plan.covers(meta)
    cache_before = backend.cache.data.clone()
    with torch.inference_mode():
        ours = backend.plan.forward(ids, pos, meta)
        cache_after = backend.cache.data.clone()
        backend.cache.data.copy_(cache_before)
        ref = forward(backend.model_config, backend.weights, backend.rope, ids, pos,
                      backend.cache, meta, backend.ops)
    assert torch.equal(ours, ref)
    assert torch.equal(cache_after, backend.cache.data)  # the same keys and values stored


def test_w8a16_runs_in_one_call_and_w8a8_does_not(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("qwen2")  # q/k/v biases
    for quant, planned in ((QuantConfig(Scheme.W8A16), True),
                           (QuantConfig(Scheme.W8A8, activations=Activations.DYNAMIC), False)):
        out = tmp_path / quant.scheme.value
        quantize_model(src, out, quant)
        backend = TorchBackend(out, EngineConfig(kv_cache_gb=0.02, block_size=4))
        assert (backend.plan is not None) is planned
        if planned:
            ids, pos, meta = decode_step(backend, [9, 2])
            with torch.inference_mode():
                ours = backend.plan.forward(ids, pos, meta)  # stores the step's k, v
                ref = forward(backend.model_config, backend.weights, backend.rope, ids, pos,
                              backend.cache, meta, backend.ops)
            torch.testing.assert_close(ours, ref)
