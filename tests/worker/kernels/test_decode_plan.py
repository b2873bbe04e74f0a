"""The one-call decode step against the per-operator kernel path it replaces."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from common.config import EngineConfig
from worker.backends.torch_backend import TorchBackend
from worker.kernels.decode_plan import DecodePlan
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


def _pointers(plan: DecodePlan) -> list[int]:
    """Every non-NULL pointer in the plan's step and layer structs."""
    structs: list[ctypes.Structure] = [plan._step]
    for layer in plan._layers:
        structs += [layer, layer.qkv, layer.o, layer.gate_up, layer.down]
    return [getattr(s, name) for s in structs for name, kind in s._fields_
            if kind is ctypes.c_void_p and getattr(s, name) is not None]


def test_every_pointer_the_plan_stores_points_into_a_tensor_it_holds(tiny_model_dir) -> None:
    backend = TorchBackend(tiny_model_dir("qwen3"), EngineConfig(kv_cache_gb=0.02, block_size=4))
    plan = backend.plan
    assert plan is not None
    ids, pos, meta = decode_step(backend, [5, 9])
    with torch.inference_mode():
        plan.forward(ids, pos.to(torch.int32), meta)  # an int64 copy of positions is made
    del ids, pos, meta
    held = [*plan._held, plan._work, *plan._inputs]
    spans = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in held]
    for pointer in _pointers(plan):
        assert any(lo <= pointer < hi for lo, hi in spans), hex(pointer)


def test_a_plan_short_of_scratch_grows_it_and_computes_the_same(tiny_model_dir) -> None:
    backend = TorchBackend(tiny_model_dir("qwen3"), EngineConfig(kv_cache_gb=0.02, block_size=4))
    plan = backend.plan
    assert plan is not None
    ids, pos, meta = decode_step(backend, [7, 30])
    cache_before = backend.cache.data.clone()
    with torch.inference_mode():
        ref = plan.forward(ids, pos, meta)
        backend.cache.data.copy_(cache_before)
        plan._grow(64)  # as if the contexts had outgrown it
        ours = plan.forward(ids, pos, meta)
    assert plan._work.nbytes > 64
    assert torch.equal(ours, ref)
