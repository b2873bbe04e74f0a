"""The one-call decode step against the per-operator kernel path it replaces."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from worker.backends.torch_runner import ModelRunner
from worker.backends.torch_settings import TorchSettings
from worker.model.attention import AttentionMetadata
from worker.model.transformer import forward
from worker.quant.quantize import quantize_model
from worker.quant.scheme import Activations, QuantConfig, Scheme


def _tables(runner: ModelRunner, lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables [n, width] of scattered blocks for contexts of `lens` tokens, and lens."""
    n = len(lens)
    width = max(-(-x // runner.cache.block_size) for x in lens)
    g = torch.Generator().manual_seed(n)
    tables = torch.randperm(runner.cache.num_blocks, generator=g)[:n * width].view(n, width)
    return tables, torch.tensor(lens)


def decode_step(runner: ModelRunner, lens: list[int]) -> tuple[torch.Tensor, ...]:
    """Fill each sequence's cache with random keys/values, then one decode step of each."""
    n = len(lens)
    g = torch.Generator().manual_seed(n)
    runner.cache.data.copy_(torch.randn(runner.cache.data.shape, generator=g))
    tables, lens_t = _tables(runner, lens)
    pos = lens_t - 1
    bs = runner.cache.block_size
    slots = tables[torch.arange(n), pos // bs] * bs + pos % bs
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=n,
                             decode=runner.ops.decode_metadata(tables, lens_t, runner.cache),
                             prefills=[])
    ids = torch.randint(0, 1000, (n,), generator=g)
    return ids, pos, meta


@pytest.mark.parametrize("lens", [[5], [1, 40, 17], list(range(3, 19))])
def test_one_call_equals_the_per_operator_kernels(tiny_model_dir, lens: list[int]) -> None:
    """The built-in routes (no dispatch table): every projection on the kernel, as in the
    one-call step, so the two agree bit for bit."""
    runner = ModelRunner(tiny_model_dir("qwen3"),
                         TorchSettings(kv_cache_gb=0.02, block_size=4, cpu_dispatch=False),
                         max_num_seqs=16)
    ids, pos, meta = decode_step(runner, lens)
    assert runner.plan is not None and runner.plan.covers(meta)
    cache_before = runner.cache.data.clone()
    with torch.inference_mode():
        ours = runner.plan.forward(ids, pos, meta)
        cache_after = runner.cache.data.clone()
        runner.cache.data.copy_(cache_before)
        ref = forward(runner.model_config, runner.weights, runner.rope, ids, pos,
                      runner.cache, meta, runner.ops)
    assert torch.equal(ours, ref)
    assert torch.equal(cache_after, runner.cache.data)  # the same keys and values stored


def test_w8a16_runs_in_one_call_and_w8a8_does_not(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("qwen2")  # q/k/v biases
    for quant, planned in ((QuantConfig(Scheme.W8A16), True),
                           (QuantConfig(Scheme.W8A8, activations=Activations.DYNAMIC), False)):
        out = tmp_path / quant.scheme.value
        quantize_model(src, out, quant)
        runner = ModelRunner(out, TorchSettings(kv_cache_gb=0.02, block_size=4,
                                                cpu_dispatch=False), max_num_seqs=16)
        assert (runner.plan is not None) is planned
        if planned:
            ids, pos, meta = decode_step(runner, [9, 2])
            with torch.inference_mode():
                ours = runner.plan.forward(ids, pos, meta)  # stores the step's k, v
                ref = forward(runner.model_config, runner.weights, runner.rope, ids, pos,
                              runner.cache, meta, runner.ops)
            torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])  # q/k norms; q/k/v biases
def test_bfloat16_steps_run_in_one_call_close_to_pytorchs_bfloat16(tiny_model_dir,
                                                                     arch: str) -> None:
    """Weights and cache in bfloat16, activations in float32: within bfloat16's rounding of
    PyTorch's bfloat16 operators (which round every intermediate), keys and values stored
    alike. Several rows round the projections' x to bfloat16 where the CPU has AVX512-BF16.
    The final hidden states come out in the activations' dtype."""
    settings = TorchSettings(kv_cache_gb=0.02, block_size=4, dtype="bfloat16")
    runner = ModelRunner(tiny_model_dir(arch), settings, max_num_seqs=16)
    # PyTorch's operators alone: gathered attention, SDPA, bfloat16 norms and rotary tables
    torch_ref = ModelRunner(tiny_model_dir(arch), replace(settings, cpu_kernels=False),
                            max_num_seqs=16)
    plan = runner.plan
    # max_num_seqs and a block of prefill beside them, under BF16_PLAN_ROWS
    assert plan is not None and plan.max_rows == 16 + 4
    for lens in ([5], [1, 40, 17]):
        ids, pos, meta = decode_step(runner, lens)
        torch_ref.cache.data.copy_(runner.cache.data)
        cache_before = runner.cache.data.clone()
        with torch.inference_mode():
            ours = plan.forward(ids, pos, meta)
            gathered = torch_ref.ops.decode_metadata(*_tables(runner, lens), torch_ref.cache)
            ref = forward(torch_ref.model_config, torch_ref.weights, torch_ref.rope, ids, pos,
                          torch_ref.cache, replace(meta, decode=gathered), torch_ref.ops)
        assert ours.dtype == runner.activation_dtype and ref.dtype == torch.bfloat16
        err = float((ours.float() - ref.float()).norm() / ref.float().norm())
        assert err < 2e-2, err
        stored = (runner.cache.data.float() - torch_ref.cache.data.float()).abs().max()
        assert float(stored) <= 2e-2 * float(runner.cache.data.float().abs().max())
        # the step stored its keys and values
        assert not torch.equal(runner.cache.data, cache_before)
