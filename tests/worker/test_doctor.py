"""`npuserve doctor`: the memory plan against what a runner really allocates, the advice when
a model does not fit, and the NPU start-up failure a worker reports instead of a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.config import EngineConfig
from worker.backends.torch_runner import ModelRunner
from worker.backends.torch_settings import TorchSettings
from worker.doctor import format_report, memory_plan, report
from worker.model.sharding import Shard

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_planned_weights_are_what_a_rank_holds(tiny_model_dir, ranks: int) -> None:
    for arch in ("qwen3", "qwen2", "llama"):
        model = tiny_model_dir(arch)
        settings = TorchSettings(tensor_parallel=ranks, kv_cache_gb=0.01,
                                 cpu_packed_weights=False, cpu_kernels=False)
        plan = memory_plan(model, settings, EngineConfig())
        runner = ModelRunner(model, settings, shard=Shard(0, ranks) if ranks > 1 else None)
        held = runner.weights.resident_bytes()
        assert abs(plan.weight_bytes_per_rank - held) / held < 0.01, arch
        assert plan.kv_bytes_per_token_per_rank * runner.cache.num_slots == \
            runner.cache.data.nbytes


def test_a_bfloat16_kv_cache_is_planned_at_its_own_size(tiny_qwen3: Path) -> None:
    settings = TorchSettings(kv_cache_gb=0.01, kv_cache_dtype="bfloat16")
    plan = memory_plan(tiny_qwen3, settings, EngineConfig())
    full = memory_plan(tiny_qwen3, TorchSettings(kv_cache_gb=0.01), EngineConfig())
    assert 2 * plan.kv_bytes_per_token_per_rank == full.kv_bytes_per_token_per_rank
    assert plan.weight_bytes_per_rank == full.weight_bytes_per_rank
    runner = ModelRunner(tiny_qwen3, settings)
    assert plan.kv_bytes_per_token_per_rank * runner.cache.num_slots == \
        runner.cache.data.nbytes


def test_what_does_not_fit_is_said_with_the_setting_to_change(tiny_qwen3: Path) -> None:
    settings = TorchSettings(kv_cache_gb=0.0001)
    plan = memory_plan(tiny_qwen3, settings, EngineConfig(max_model_len=2048),
                       free_bytes=1 << 20)
    problems = plan.problems(settings)
    assert any("use more devices or an int8 checkpoint" in p for p in problems)
    assert any("raise --kv-cache-gb to at least" in p for p in problems)
    big = memory_plan(tiny_qwen3, TorchSettings(), EngineConfig(max_num_batched_tokens=8,
                                                               max_num_seqs=1),
                      free_bytes=78_800_000)  # two ranks fit (the replicated vocabulary
    # of 152k rows is most of the tiny model's weights)
    assert big.fitting_ranks == 2
    assert "use --tensor-parallel 2 or an int8" in big.problems(TorchSettings())[0]
    found = report(tiny_qwen3, TorchSettings(kv_cache_gb=0.01), EngineConfig())
    text = format_report(found)
    assert "memory plan, 1 rank(s) of cpu in float32" in text and "fits" in text


def test_a_worker_on_an_npu_without_torch_npu_says_what_to_install(
        tiny_qwen3: Path, redis_url: str) -> None:
    """With Redis reachable (a worker checks it first), the device is what fails."""
    run = subprocess.run([sys.executable, "-m", "common.cli", "worker", "--model",
                          str(tiny_qwen3), "--device", "npu:0", "--redis", redis_url],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "needs torch_npu on Ascend CANN" in run.stderr
    assert "pip install torch-npu==" in run.stderr
