"""The per-machine GEMM dispatch: timed once and cached, every route computing the same
projection, and the one-call decode step covering only the buckets where the kernel keeps up
(w8a16's int8 routes and settings: test_dispatch_int8.py)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.worker.kernels.conftest import projections
from worker.backends.torch_runner import ModelRunner
from worker.backends.torch_settings import TorchSettings
from worker.kernels import attention_tuning, dispatch
from worker.kernels.build import cpu_model
from worker.kernels.cpu import CpuKernels
from worker.kernels.cpu_ops import KernelOps
from worker.kernels.dispatch import CANDIDATES
from worker.kernels.dispatch_table import (
    ATTENTION_PREFETCH,
    ATTENTION_PREFETCH_WHAT,
    BF16,
    BUCKETS,
    DispatchTable,
    attention_key,
    key_of,
)
from worker.model import linear
from worker.model.linear import BF16_ROUTE_BUCKETS, Projection


def test_tuned_once_per_machine_then_read_from_the_cache(k: CpuKernels, cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    projs = projections(k, (96, 64), (96, 64), (64, 192))
    table = dispatch.tune(k, projs)
    assert table.threads == torch.get_num_threads() and table.cpu
    for shape in ((96, 64), (64, 192)):
        chosen = table.routes(f"{shape[0]}x{shape[1]}", packed=True)
        assert chosen is not None and len(chosen) == len(BUCKETS)
        assert set(chosen) <= set(CANDIDATES)
        times = table.timings_us[f"{shape[0]}x{shape[1]}"]
        for b, c in enumerate(chosen):  # each the fastest of its bucket
            assert times[c][b] == min(t[b] for t in times.values())
    assert set(table.timings_us["prefetch"]) == {"t0", "l2", "nta"}
    prefetch = table.timings_us["prefetch"]  # the fastest setting over its passes
    assert sum(prefetch[table.prefetch]) == min(sum(t) for t in prefetch.values())
    assert k.cpuk_get_prefetch() == dispatch.PREFETCH_MODES[table.prefetch]
    stream = table.timings_us["row-stream"]  # one row: the faster of tiles and streaming
    assert table.row_stream == (stream["stream"][0] < stream["tiles"][0])
    assert k.cpuk_get_row_stream() == table.row_stream
    files = list(cache.glob("dispatch-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["choices"] == table.choices

    def no_timing(*args: object) -> None:
        raise AssertionError("timed again")

    monkeypatch.setattr(dispatch, "_time_shape", no_timing)
    monkeypatch.setattr(dispatch, "_tune_prefetch", no_timing)
    assert dispatch.tune(k, projs).choices == table.choices  # the cache, no timing

    timed: list[tuple[int, ...]] = []
    monkeypatch.setattr(dispatch, "_tune_prefetch",  # a bigger model times it again
                        lambda kernels, by_shape, t: t.prefetch)
    monkeypatch.setattr(dispatch, "_tune_row_stream",  # (to the same choices here)
                        lambda kernels, by_shape, t: t.row_stream)
    monkeypatch.setattr(dispatch, "_time_shape", lambda ps: timed.append(
        tuple(ps[0].weight.shape)) or ({c: [1.0] * len(BUCKETS) for c in CANDIDATES}, BUCKETS))
    grown = dispatch.tune(k, [*projs, *projections(k, (32, 64))])
    assert timed == [(32, 64)] and "32x64" in grown.choices and "96x64" in grown.choices

    monkeypatch.setenv("NPUSERVE_KERNEL_RETUNE", "1")
    monkeypatch.setattr(dispatch, "_tune_prefetch", lambda kernels, by_shape, table: "nta")
    timed.clear()
    retuned = dispatch.tune(k, projs)
    assert sorted(timed) == [(64, 192), (96, 64)] and retuned.prefetch == "nta"
    k.cpuk_set_prefetch(1)
    k.cpuk_set_row_stream(0)


def test_an_unreadable_cache_is_timed_again(k: CpuKernels, cache: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    projs = projections(k, (48, 32))
    dispatch.cache_path(k, torch.get_num_threads()).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="worker.kernels.dispatch"):
        table = dispatch.tune(k, projs)
    assert "unreadable dispatch table" in caplog.text and "48x32" in table.choices


@pytest.mark.parametrize("choice", CANDIDATES)
@pytest.mark.parametrize("m", [1, 3, 40, 100])
def test_every_route_computes_the_projection(k: CpuKernels, choice: str, m: int) -> None:
    """A route per bucket; rows past the last bucket (100) keep the built-in rule."""
    (p,) = projections(k, (72, 40))
    p.route((choice,) * len(BUCKETS))
    x = torch.randn(m, 40, generator=torch.Generator().manual_seed(m))
    torch.testing.assert_close(p(x), F.linear(x, p.weight, p.bias), rtol=1e-5, atol=1e-4)


def test_routes_that_cannot_run_are_refused(k: CpuKernels) -> None:
    (unpacked,) = projections(k, (8, 16), pack=False)
    with pytest.raises(ValueError, match="packed"):
        unpacked.route(("onednn",) * len(BUCKETS))
    bare = Projection(torch.randn(8, 16))
    with pytest.raises(ValueError, match="kernels"):
        bare.route(("kernel",) * len(BUCKETS))
    with pytest.raises(ValueError, match="choices"):
        bare.route(("torch",))


@pytest.mark.parametrize(("limit", "native"), [(linear.BF16_KERNEL_ROWS, True),
                                               (linear.AMX_KERNEL_ROWS, True),
                                               (linear.KERNEL_ROWS, False)])
def test_bfloat16_calls_take_the_kernel_up_to_the_cpus_limit(
        k: CpuKernels, monkeypatch: pytest.MonkeyPatch, limit: int, native: bool) -> None:
    """oneDNN's bfloat16 GEMM takes calls of more rows than the CPU's limit; without native
    bfloat16, PyTorch's float32 GEMM on x and W widened for the call does (prefill), and no
    packed copy is held."""
    monkeypatch.setattr(linear, "bf16_kernel_rows", lambda kernels: limit)
    monkeypatch.setattr(linear, "native_bf16", lambda kernels: native)
    p = Projection(torch.randn(24, 32).bfloat16(), pack=True, kernels=k)
    calls: list[int] = []

    def spy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append(x.shape[0])
        return CpuKernels.linear_bf16(k, x, weight, bias)

    monkeypatch.setattr(k, "linear_bf16", spy)
    rows = (1, linear.BF16_KERNEL_ROWS, linear.KERNEL_ROWS + 1, linear.AMX_KERNEL_ROWS,
            linear.AMX_KERNEL_ROWS + 1)
    for m in rows:
        x = torch.randn(m, 32).bfloat16()
        y = p(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), F.linear(x.float(), p.weight.float()),
                                   rtol=2e-2, atol=2e-2)
        if m > limit and not native:  # float32 sums of the exact products, rounded once
            assert torch.equal(y, F.linear(x.float(), p.weight.float()).bfloat16())
        # float32 x, as the kernels' op set passes it: a float32 result (oneDNN's bfloat16
        # GEMM takes x rounded and returns its result widened)
        y32 = p(x.float())
        assert y32.dtype == torch.float32
        torch.testing.assert_close(y32, F.linear(x.float(), p.weight.float()),
                                   rtol=2e-2, atol=2e-2)
    assert calls == [m for m in rows if m <= limit]
    assert p.packed == native
    if not native:  # no call reads a packed copy, so none is held
        assert p.resident_bytes == p.nbytes


@pytest.mark.parametrize(("isa", "limit", "native"), [
    ("avx512f avx512bf16 avx2 fma amxbf16", linear.AMX_KERNEL_ROWS, True),
    ("avx512f avx512bf16 avx2 fma", linear.BF16_KERNEL_ROWS, True),
    ("avx512f avx2 fma", linear.KERNEL_ROWS, False), ("avx2 fma", linear.KERNEL_ROWS, False),
    ("neon", linear.KERNEL_ROWS, False)])
def test_the_bfloat16_limit_follows_how_the_cpu_multiplies_bfloat16(isa: str, limit: int,
                                                                    native: bool) -> None:
    cpu = SimpleNamespace(isa=isa)
    assert linear.bf16_kernel_rows(cpu) == limit  # type: ignore[arg-type]
    assert linear.native_bf16(cpu) == native  # type: ignore[arg-type]


def bf16_projections(k: CpuKernels, *shapes: tuple[int, int]) -> list[Projection]:
    g = torch.Generator().manual_seed(0)
    return [Projection(torch.randn(*shape, generator=g).bfloat16(),
                       torch.randn(shape[0], generator=g).bfloat16(), pack=True, kernels=k)
            for shape in shapes]


@pytest.mark.parametrize("choice", CANDIDATES)
@pytest.mark.parametrize("m", [1, 5, 100, 600])
def test_every_bfloat16_route_computes_the_projection(k: CpuKernels, choice: str, m: int
                                                      ) -> None:
    """A bfloat16 route has the prefill buckets too, the last one's choice serving every
    larger call (600 rows)."""
    (p,) = bf16_projections(k, (72, 40))
    if choice == "onednn" and not p.packed:
        pytest.skip("this CPU has no native bfloat16, so no packed copy is kept")
    p.route((choice,) * len(BF16_ROUTE_BUCKETS))
    x = torch.randn(m, 40, generator=torch.Generator().manual_seed(m)).bfloat16()
    assert p.bias is not None
    torch.testing.assert_close(p(x).float(), F.linear(x.float(), p.weight.float(),
                                                      p.bias.float()), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="choices"):
        p.route((choice,) * len(BUCKETS))


def test_bfloat16_shapes_are_timed_apart_from_float32_ones(k: CpuKernels, cache: Path) -> None:
    """The same shape in bfloat16 is a key of its own, timed over BF16_ROUTE_BUCKETS with
    bfloat16 x, each choice the fastest of its bucket, and shown in a block of its own."""
    f32 = projections(k, (96, 64))
    bf16 = bf16_projections(k, (96, 64), (96, 64))
    table = dispatch.tune(k, f32 + bf16)
    assert [key_of(p) for p in f32 + bf16] == ["96x64", "bf16:96x64", "bf16:96x64"]
    assert len(table.choices["96x64"]) == len(BUCKETS)
    times = table.timings_us["bf16:96x64"]
    chosen = table.routes("bf16:96x64", packed=bf16[0].packed)
    assert chosen is not None and len(chosen) == len(BF16_ROUTE_BUCKETS)
    for b, c in enumerate(chosen):
        assert times[c][b] == min(t[b] for name, t in times.items()
                                  if bf16[0].packed or name != "onednn")
    if not bf16[0].packed:  # nothing to time oneDNN's bfloat16 GEMM with
        assert all(t == float("inf") for t in times["onednn"])
    described = table.describe().splitlines()
    assert any(line.startswith("bf16:96x64") for line in described)
    assert any(line.split()[-2:] == ["128", "512"] for line in described)
    assert dispatch.load(dispatch.cache_path(k, table.threads)).choices["bf16:96x64"] == \
        table.choices["bf16:96x64"]
    # the same shape as an lm_head (no prefill buckets): timed again over its own buckets
    head = Projection(bf16[0].weight, pack=True, kernels=k, prefill=False)
    again = dispatch.tune(k, [head])
    assert len(again.choices["bf16:96x64"]) == len(head.route_buckets) == len(BUCKETS)
    head.route(again.routes("bf16:96x64", packed=head.packed))
    x = torch.randn(600, 64).bfloat16()  # more rows than any bucket: the last one's choice
    torch.testing.assert_close(head(x).float(), F.linear(x.float(), head.weight.float()),
                               rtol=2e-2, atol=2e-2)


def test_a_bfloat16_model_routes_its_projections_by_the_table(tiny_model_dir, cache: Path
                                                             ) -> None:
    """The table routes a bfloat16 model's projections (the lm_head without prefill buckets,
    as serving asks it for sampled rows only), between the kernel, oneDNN where it multiplies
    bfloat16 (a packed copy is kept) and PyTorch's GEMM (in float32 elsewhere)."""
    runner = ModelRunner(tiny_model_dir("qwen3"), TorchSettings(kv_cache_gb=0.02,
                                                                dtype="bfloat16"))
    lm_head = runner.weights.lm_head
    assert isinstance(lm_head, Projection)
    table = runner.dispatch
    # decode attention's split too where the model runs on the kernels' op set (float32
    # activations: no native bfloat16)
    assert table is not None
    assert bool(table.attention_parts) == isinstance(runner.ops, KernelOps)
    layer = runner.weights.layers[0]
    for p in (layer.qkv, layer.o_proj, layer.gate_up, layer.down, lm_head):
        key = key_of(p)
        assert key.startswith(BF16) and p._routes == table.routes(key, p.packed)
    assert len(layer.qkv._routes or ()) == len(BF16_ROUTE_BUCKETS)
    assert len(lm_head._routes or ()) == len(BUCKETS)


def _table(kernel: list[float], other: list[float]) -> DispatchTable:
    times = {"kernel": kernel, "onednn": other, "torch": [x * 2 for x in other]}
    chosen = [min(times, key=lambda c: times[c][b]) for b in range(len(BUCKETS))]
    return DispatchTable(cpu="test", threads=1, choices={"8x4": chosen},
                         timings_us={"8x4": times})


def test_the_one_call_step_covers_the_buckets_where_the_kernel_keeps_up() -> None:
    #                  1    2    4    8    16   32   64
    table = _table([10, 10, 10, 10.5, 30, 40, 50], [11, 11, 11, 10, 10, 10, 10])
    assert table.routes("8x4", packed=True) == ("kernel",) * 3 + ("onednn",) * 4
    assert table.plan_rows({"8x4": 4}) == 8  # 10.5 is within PLAN_SLACK of 10
    assert _table([20] * 7, [10] * 7).plan_rows({"8x4": 4}) == 0
    assert table.plan_rows({"8x4": 4, "9x9": 1}) == 0  # a shape never timed
    # without the packed copy, torch (twice onednn's times here) or the kernel
    assert table.routes("8x4", packed=False) == ("kernel",) * 4 + ("torch",) * 3
    assert "8x4" in table.describe() and "every cache level" in table.describe()


def test_a_model_routes_its_projections_by_the_table(tiny_model_dir, cache: Path) -> None:
    runner = ModelRunner(tiny_model_dir("qwen3"), TorchSettings(kv_cache_gb=0.02),
                         max_num_seqs=16)
    table = runner.dispatch
    assert table is not None
    layer = runner.weights.layers[0]
    for p in (layer.qkv, layer.o_proj, layer.gate_up, layer.down, runner.weights.lm_head):
        assert p._routes == table.routes(key_of(p), p.packed)
    rows = table.plan_rows(Counter(key_of(p) for lw in runner.weights.layers
                                   for p in (lw.qkv, lw.o_proj, lw.gate_up, lw.down)))
    assert (runner.plan.max_rows if runner.plan is not None else 0) == min(16, rows)
    off = ModelRunner(tiny_model_dir("qwen3"), TorchSettings(kv_cache_gb=0.02,
                                                             cpu_dispatch=False))
    assert off.dispatch is None and off.weights.layers[0].qkv._routes is None


def test_decode_attention_split_is_timed_once_per_shape(k: CpuKernels, cache: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_tuning, "PARTS_CASES", ((1, 128), (2, 256)))
    monkeypatch.setattr(attention_tuning, "PREFETCH_CASES", ((2, 128), (1, 256)))
    monkeypatch.setattr(attention_tuning, "PREFETCH_BYTES", 1 << 20)
    projs = projections(k, (32, 64))
    table = dispatch.tune(k, projs, (4, 2, 16))
    parts = table.attention_parts["4x2x16"]
    assert parts in attention_tuning.PARTS and k.cpuk_get_attention_parts() == parts
    times = table.timings_us["attention:4x2x16"]
    assert set(times) == {str(p) for p in attention_tuning.PARTS}
    assert all(len(t) == 2 for t in times.values())
    prefetch = table.attention_prefetch["4x2x16"]
    assert k.cpuk_get_attention_prefetch() == ATTENTION_PREFETCH[prefetch]
    prefetch_times = table.timings_us["attention-prefetch:4x2x16"]
    assert set(prefetch_times) == set(ATTENTION_PREFETCH)
    assert all(len(t) == 2 and min(t) > 0 for t in prefetch_times.values())
    assert (f"decode attention (4 heads, 2 kv heads, d 16): "
            f"{f'{parts} tasks per thread' if parts else 'no split'}, prefetching "
            f"{ATTENTION_PREFETCH_WHAT[prefetch]}") in table.describe()
    assert table.subset({"4x2x16"}).timings_us.keys() >= {"attention:4x2x16",
                                                          "attention-prefetch:4x2x16"}

    def no_timing(*args: object) -> None:
        raise AssertionError("timed again")

    monkeypatch.setattr(attention_tuning, "tune_parts", no_timing)
    monkeypatch.setattr(attention_tuning, "tune_prefetch", no_timing)
    k.cpuk_set_attention_parts(7)
    k.cpuk_set_attention_prefetch(1 - ATTENTION_PREFETCH[prefetch])
    again = dispatch.tune(k, projs, (4, 2, 16))
    assert again.attention_parts == {"4x2x16": parts}
    assert again.attention_prefetch == {"4x2x16": prefetch}
    assert k.cpuk_get_attention_parts() == parts  # applied from the cache
    assert k.cpuk_get_attention_prefetch() == ATTENTION_PREFETCH[prefetch]
    k.cpuk_set_attention_parts(2)
    k.cpuk_set_attention_prefetch(0)


def test_a_prefetch_flip_keeps_decode_attentions_settings_and_their_timings(
        k: CpuKernels, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    projs = projections(k, (32, 64))
    attention = {"attention:4x2x16": {"2": [1.0]}, "attention-prefetch:4x2x16": {"pages": [1.0]}}
    table = DispatchTable(cpu=cpu_model(), threads=torch.get_num_threads(), prefetch="t0",
                          attention_parts={"4x2x16": 2}, attention_prefetch={"4x2x16": "pages"},
                          timings_us={**attention, "attention:9x3x64": {"0": [1.0]}})
    dispatch.save(table, dispatch.cache_path(k, torch.get_num_threads()))
    monkeypatch.setattr(dispatch, "_tune_prefetch", lambda kernels, by_shape, t: "nta")
    monkeypatch.setattr(dispatch, "_tune_row_stream", lambda kernels, by_shape, t: False)
    monkeypatch.setattr(dispatch, "_time_shape", lambda ps: (
        {c: [1.0] * len(BUCKETS) for c in CANDIDATES}, BUCKETS))
    try:
        flipped = dispatch.tune(k, projs, (4, 2, 16))  # the kernel's shapes timed again
    finally:
        k.cpuk_set_prefetch(1)
        k.cpuk_set_attention_parts(2)
        k.cpuk_set_attention_prefetch(0)
    assert flipped.prefetch == "nta"
    assert flipped.attention_parts == {"4x2x16": 2}
    assert flipped.attention_prefetch == {"4x2x16": "pages"}
    assert {key: flipped.timings_us[key] for key in attention} == attention
    assert "attention:9x3x64" not in flipped.timings_us  # another model's, left out
    assert attention_key("32x64") is None and attention_key("attention:9x3x64") == "9x3x64"


def test_a_bigger_model_times_the_prefetch_again(k: CpuKernels, cache: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    small = projections(k, (32, 64))
    monkeypatch.setattr(dispatch, "_tune_prefetch", lambda kernels, by_shape, t: "t0")
    assert dispatch.tune(k, small).prefetch_bytes == small[0].nbytes
    big = projections(k, (96, 64), (64, 192))
    monkeypatch.setattr(dispatch, "_tune_prefetch", lambda kernels, by_shape, t: "l2")
    table = dispatch.tune(k, big)
    assert table.prefetch == "l2" and k.cpuk_get_prefetch() == 2
    assert set(table.choices) == {"96x64", "64x192"}  # only this model's entries
    stored = dispatch.load(next(cache.glob("dispatch-*.json")))
    assert stored is not None and set(stored.choices) == {"96x64", "64x192"}  # 32x64 dropped

    def no_timing(*args: object) -> None:
        raise AssertionError("timed again")

    monkeypatch.setattr(dispatch, "_tune_prefetch", no_timing)
    assert set(dispatch.tune(k, small).choices) == {"32x64"}  # smaller: only its shape
    k.cpuk_set_prefetch(1)
