"""The dispatch of w8a16 models: every int8 route computes the dequantized product, and the
int8 settings (the one-row stream, AMX tiles from some number of rows) are timed on the
model's own projections, cached, and timed again only for more int8 bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.worker.kernels.conftest import projections
from worker.backends.torch_runner import ModelRunner
from worker.backends.torch_settings import TorchSettings
from worker.kernels import dispatch
from worker.kernels.cpu import CpuKernels
from worker.kernels.dispatch import INT8_CANDIDATES
from worker.kernels.dispatch_table import BUCKETS, key_of
from worker.quant.int8_linear import INT8_ROUTE_BUCKETS, W8A16Projection, dequantize


def w8a16(k: CpuKernels | None, shape: tuple[int, int], group: int = 0) -> W8A16Projection:
    g = torch.Generator().manual_seed(shape[0])
    q = torch.randint(-127, 128, shape, dtype=torch.int8, generator=g)
    groups = shape[1] // group if group else 1
    return W8A16Projection(q, torch.rand(shape[0], groups, generator=g).squeeze(1) / 50,
                           torch.randn(shape[0], generator=g), k)


@pytest.mark.parametrize("choice", INT8_CANDIDATES)
@pytest.mark.parametrize("m", [1, 5, 100, 300])
def test_every_w8a16_route_computes_the_projection(k: CpuKernels, choice: str, m: int) -> None:
    """Both are the dequantized product (the kernel rounds x to 15 bits); rows past the
    prefill bucket (300) take its choice."""
    p = w8a16(k, (48, 64))
    x = torch.randn(m, 64, generator=torch.Generator().manual_seed(m))
    want = F.linear(x, dequantize(p.qweight, p.scale), p.bias)
    p.route((choice,) * len(INT8_ROUTE_BUCKETS))
    torch.testing.assert_close(p(x), want, rtol=1e-5, atol=float(want.abs().max()) * 2**-11)


def test_w8a16_routes_that_cannot_run_are_refused(k: CpuKernels) -> None:
    with pytest.raises(ValueError, match="per-channel"):
        w8a16(k, (8, 64), group=32).route(("torch",) * len(INT8_ROUTE_BUCKETS))
    with pytest.raises(ValueError, match="kernels"):
        w8a16(None, (8, 64)).route(("kernel",) * len(INT8_ROUTE_BUCKETS))
    with pytest.raises(ValueError, match="choices"):
        w8a16(k, (8, 64)).route(("torch",) * len(BUCKETS))


@pytest.mark.parametrize(("tiles", "vector", "rows"), [
    ([1, 1, 1, 1], [2, 2, 2, 2], 1),   # the tiles win everywhere
    ([3, 3, 1, 1], [2, 2, 2, 2], 4),   # from 4 rows
    ([1, 3, 1, 1], [2, 2, 2, 2], 4),   # a win at 1 row alone does not count
    ([1, 1, 1, 3], [2, 2, 2, 2], 16),  # never at every larger count: not at all
    ([2, 2, 2, 2], [2, 2, 2, 2], 1)])  # a tie takes the tiles
def test_int8_takes_the_tiles_from_the_fewest_rows_they_win_from(
        tiles: list[float], vector: list[float], rows: int) -> None:
    assert dispatch.first_winning(dispatch.AMX_I8_ROWS, tiles, vector) == rows


def test_w8a16_models_time_the_int8_tiles_where_the_cpu_has_them(
        k: CpuKernels, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Timed on the model's own w8a16 projections, applied to the kernels, kept in the cache
    and timed again only for a model with more w8a16 bytes."""
    before = k.cpuk_get_amx_i8_rows()
    projs = [w8a16(k, (96, 64)), w8a16(k, (96, 64)), *projections(k, (96, 64))]
    try:
        table = dispatch.tune(k, projs)
        stream = table.timings_us["row-stream-int8"]  # one row: the faster way, applied
        assert table.row_stream_i8 == (stream["stream"][0] < stream["tiles"][0])
        assert k.cpuk_get_row_stream_i8() == table.row_stream_i8
        assert table.row_stream_i8_bytes == sum(p.nbytes for p in projs[:2])
        if "amxint8" not in k.isa.split():
            assert table.amx_i8_rows == 0 and "amx-int8" not in table.timings_us
            return
        times = table.timings_us["amx-int8"]
        assert table.amx_i8_rows == dispatch.first_winning(dispatch.AMX_I8_ROWS, times["tiles"],
                                                           times["vector"])
        assert k.cpuk_get_amx_i8_rows() == table.amx_i8_rows
        assert f"AMX tiles from {table.amx_i8_rows} rows" in table.describe()

        def no_timing(*args: object) -> None:
            raise AssertionError("timed again")

        monkeypatch.setattr(dispatch, "_tune_amx_i8", no_timing)
        assert dispatch.tune(k, projs).amx_i8_rows == table.amx_i8_rows  # from the cache
        monkeypatch.setattr(dispatch, "_tune_amx_i8", lambda kernels, by_shape, t: 8)
        bigger = dispatch.tune(k, [*projs, w8a16(k, (32, 64))])
        assert bigger.amx_i8_rows == 8 and k.cpuk_get_amx_i8_rows() == 8
    finally:
        k.cpuk_set_amx_i8_rows(before)
        k.cpuk_set_row_stream_i8(0)


def test_the_int8_row_stream_is_timed_again_for_more_int8_bytes_only(
        k: CpuKernels, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept in the cache; a model with more w8a16 bytes times it again, and where that flips
    it, the int8 shapes (whose kernel at one row was timed the other way) are timed again."""
    projs = [w8a16(k, (96, 64)), *projections(k, (96, 64))]
    try:
        first = dispatch.tune(k, projs)

        def no_timing(*args: object) -> None:
            raise AssertionError("timed again")

        monkeypatch.setattr(dispatch, "_tune_row_stream_i8", no_timing)
        assert dispatch.tune(k, projs).row_stream_i8 == first.row_stream_i8
        flipped = not first.row_stream_i8
        monkeypatch.setattr(dispatch, "_tune_row_stream_i8", lambda kernels, by_shape, t: flipped)
        monkeypatch.setattr(dispatch, "_tune_prefetch",  # the float settings as they were
                            lambda kernels, by_shape, t: t.prefetch)
        monkeypatch.setattr(dispatch, "_tune_row_stream", lambda kernels, by_shape, t: t.row_stream)
        timed: list[str] = []
        time_shape = dispatch._time_shape
        monkeypatch.setattr(dispatch, "_time_shape", lambda ps: timed.append(
            dispatch.key_of(ps[0])) or time_shape(ps))
        bigger = dispatch.tune(k, [*projs, w8a16(k, (32, 64))])
        assert bigger.row_stream_i8 == flipped and k.cpuk_get_row_stream_i8() == flipped
        assert sorted(timed) == ["w8a16:32x64", "w8a16:96x64"]  # not the float shape
        streams = [line for line in bigger.describe().splitlines() if "streams" in line]
        assert any("int8 weights" in line for line in streams) == flipped
    finally:
        k.cpuk_set_row_stream_i8(0)


def test_w8a16_shapes_are_timed_with_a_prefill_bucket(k: CpuKernels, cache: Path) -> None:
    projs = [w8a16(k, (96, 64)), w8a16(k, (96, 64)), *projections(k, (96, 64))]
    table = dispatch.tune(k, projs)
    assert set(table.choices) == {"96x64", "w8a16:96x64"}
    chosen = table.routes("w8a16:96x64", packed=False)
    assert chosen is not None and len(chosen) == len(INT8_ROUTE_BUCKETS)
    assert set(table.timings_us["w8a16:96x64"]) == set(INT8_CANDIDATES)
    text = table.describe()
    assert "w8a16:96x64" in text and "256" in text and "96x64 " in text
    assert table.plan_rows({"w8a16:96x64": 2, "96x64": 1}) in (0, *BUCKETS)


def test_a_quantized_model_routes_its_int8_projections(tiny_model_dir, tmp_path: Path,
                                                       cache: Path) -> None:
    from worker.quant.quantize import quantize_model
    from worker.quant.scheme import QuantConfig, Scheme

    out = tmp_path / "w8a16"
    quantize_model(tiny_model_dir("qwen3"), out, QuantConfig(Scheme.W8A16), progress=False)
    runner = ModelRunner(out, TorchSettings(kv_cache_gb=0.02), max_num_seqs=16)
    table = runner.dispatch
    assert table is not None
    layer = runner.weights.layers[0]
    assert isinstance(layer.gate_up, W8A16Projection)
    assert layer.gate_up._routes == table.routes(key_of(layer.gate_up), False)
    assert layer.gate_up._routes is not None
