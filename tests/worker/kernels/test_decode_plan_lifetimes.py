"""What DecodePlan's C structs point at stays alive and large enough."""

from __future__ import annotations

import ctypes

import pytest
import torch

from worker.kernels.cpu import CpuKernels, cpu_kernels
from worker.kernels.cpu_ops import KernelOps
from worker.kernels.decode_plan import DecodePlan
from worker.model.attention import AttentionMetadata, KVCache
from worker.model.config import ModelConfig
from worker.model.rope import RotaryEmbedding
from worker.model.weights import load_weights

CPU = torch.device("cpu")


@pytest.fixture
def planned(tiny_model_dir) -> tuple[DecodePlan, KVCache]:
    kernels = cpu_kernels()
    assert kernels is not None
    model_dir = tiny_model_dir("qwen3")
    cfg = ModelConfig.from_dir(model_dir)
    weights = load_weights(model_dir, cfg, torch.float32, CPU, pack=False, kernels=kernels)
    cache = KVCache(cfg.num_hidden_layers, 64, 4, cfg.num_key_value_heads, cfg.head_dim,
                    torch.float32, CPU)
    rope = RotaryEmbedding(cfg, 256, CPU, torch.float32)
    built = DecodePlan.build(kernels, cfg, weights, cache, rope, max_rows=4)
    assert built is not None
    return built, cache


def step(kernels: CpuKernels, cache: KVCache, lens: list[int]
         ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    n, bs = len(lens), cache.block_size
    width = max(-(-x // bs) for x in lens)
    g = torch.Generator().manual_seed(n)
    cache.data.copy_(torch.randn(cache.data.shape, generator=g))
    tables = torch.randperm(cache.num_blocks, generator=g)[:n * width].view(n, width)
    lens_t = torch.tensor(lens)
    pos = lens_t - 1
    slots = tables[torch.arange(n), pos // bs] * bs + pos % bs
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=n, prefills=[],
                             decode=KernelOps(kernels).decode_metadata(tables, lens_t, cache))
    return torch.randint(0, 100, (n,), generator=g), pos, meta


def pointers(plan: DecodePlan) -> list[int]:
    """Every non-NULL pointer in the plan's step and layer structs."""
    structs: list[ctypes.Structure] = [plan._step]
    for layer in plan._layers:
        structs += [layer, layer.qkv, layer.o, layer.gate_up, layer.down]
    return [getattr(s, name) for s in structs for name, kind in s._fields_
            if kind is ctypes.c_void_p and getattr(s, name) is not None]


def test_every_pointer_the_plan_stores_points_into_a_tensor_it_holds(
    planned: tuple[DecodePlan, KVCache],
) -> None:
    plan, cache = planned
    kernels = cpu_kernels()
    assert kernels is not None
    ids, pos, meta = step(kernels, cache, [5, 9])
    with torch.inference_mode():
        plan.forward(ids, pos.to(torch.int32), meta)  # C reads an int64 copy of positions
    del ids, pos, meta
    held = [*plan._held, plan._work, *plan._inputs]
    spans = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in held]
    for pointer in pointers(plan):
        assert any(lo <= pointer < hi for lo, hi in spans), hex(pointer)


def test_a_plan_short_of_scratch_grows_it_and_computes_the_same(
    planned: tuple[DecodePlan, KVCache],
) -> None:
    plan, cache = planned
    kernels = cpu_kernels()
    assert kernels is not None
    ids, pos, meta = step(kernels, cache, [7, 30])
    cache_before = cache.data.clone()
    with torch.inference_mode():
        ref = plan.forward(ids, pos, meta)
        cache.data.copy_(cache_before)
        plan._grow(64)  # as if the contexts had outgrown it
        ours = plan.forward(ids, pos, meta)
    assert plan._work.nbytes > 64
    assert torch.equal(ours, ref)
