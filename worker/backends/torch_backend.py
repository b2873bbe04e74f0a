"""The PyTorch backend: CPU, CUDA, and Ascend NPUs through torch_npu, ragged batches.

An adapter between the engine and one `ModelRunner`: it declares the runner's capacity and
capabilities to the scheduler and hands each step's chunks to it. The engine samples the
logits it returns, so every sampling parameter is honoured.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from common.capabilities import Capabilities
from common.config import LATENCY_PREFILL_STALL, EngineConfig
from worker.backends.base import (
    Backend,
    BackendCapacity,
    DeviceStats,
    SequenceChunk,
    StepResult,
)
from worker.backends.torch_runner import ModelRunner
from worker.backends.torch_settings import TorchSettings
from worker.model.ops import DecoderOps

log = logging.getLogger(__name__)


def default_prefill_stall(device: torch.device) -> float:
    """The engine's max_prefill_stall when none is set: LATENCY_PREFILL_STALL on a CPU that
    PyTorch runs with AVX-512, else 0 (off). SmolLM2 through the whole stack, 16 requests in
    flight (128 prompt tokens, 64 out), on 2 cores: on a Zen 5 (AVX-512) the cap gave
    x0.88-1.04 the uncapped throughput, twice the first token's wait and 0.4-0.6x the p99
    inter-token gap; on an AVX2 Zen 3 x0.65-0.78, 3.5x and 0.55-0.65x, every step carrying
    20-30 prompt tokens beside the decodes. CUDA and NPUs are unmeasured. The processor is
    a stand-in for what the measurements turned on, from the two CPUs measured."""
    if device.type != "cpu":
        return 0.0
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return LATENCY_PREFILL_STALL if avx512 else 0.0


class TorchBackend(Backend):
    name = "torch"
    capabilities = Capabilities()

    def __init__(self, model_dir: str | Path, engine: EngineConfig | None = None,
                 settings: TorchSettings | None = None, ops: DecoderOps | None = None) -> None:
        engine = engine or EngineConfig()
        self.settings = settings = settings or TorchSettings()
        if settings.tensor_parallel > 1:
            from worker.backends.tensor_parallel import TensorParallelRunner

            runner: ModelRunner = TensorParallelRunner(
                model_dir, settings, max_model_len=engine.max_model_len,
                max_num_seqs=engine.max_num_seqs)
        else:
            runner = ModelRunner(model_dir, settings, max_model_len=engine.max_model_len,
                                 max_num_seqs=engine.max_num_seqs, ops=ops)
        self.runner = runner
        self.model_config = runner.model_config
        self.device = runner.device
        self.capacity = BackendCapacity(
            max_batch=engine.max_num_seqs,
            max_seq_len=runner.max_seq_len,
            max_tokens_per_step=engine.max_num_batched_tokens,
            block_size=runner.block_size,
            num_blocks=runner.num_blocks,
            one_call_tokens=plan.max_rows if (plan := getattr(runner, "plan", None)) else 0,
            # every op set reads the paged cache through block tables, and a prefill chunk
            # after cached context is what chunked prefill already runs
            prefix_caching=engine.enable_prefix_caching,
            prefill_stall=default_prefill_stall(self.device),
        )
        log.info("torch backend on %s (%s, %s ops): weights %.1f MiB (%.1f MiB read per step), "
                 "KV cache %.1f MiB (%s) in %d blocks of %d, prefix caching %s", self.device,
                 runner.dtype, runner.ops.name, self.weight_memory_bytes() / 2**20,
                 self.weight_bytes() / 2**20, self.kv_cache_bytes() / 2**20,
                 str(runner.kv_dtype).removeprefix("torch."), runner.num_blocks,
                 runner.block_size, "on" if engine.enable_prefix_caching else "off")

    def weight_bytes(self) -> int:
        return self.runner.weight_bytes()

    def weight_memory_bytes(self) -> int:
        return self.runner.weight_memory_bytes()

    def kv_cache_bytes(self) -> int:
        return self.runner.kv_cache_bytes()

    def device_stats(self) -> DeviceStats | None:
        """CUDA: memory from the driver; utilisation and temperature through NVML where
        `pynvml` is installed (NaN and None otherwise). The CPU has no device counters (the
        process metrics cover it)."""
        if getattr(self.device, "type", "") != "cuda":
            return None
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        utilization, temperature = float("nan"), None
        try:
            utilization = torch.cuda.utilization(self.device) / 100.0
            temperature = float(torch.cuda.temperature(self.device))
        except (ModuleNotFoundError, RuntimeError) as exc:  # pynvml missing or NVML refused
            log.debug("no NVML readings: %s", exc)
        return DeviceStats(total, total - free, utilization, temperature)

    def execute(self, chunks: Sequence[SequenceChunk]) -> StepResult:
        return StepResult(logits=self.runner.execute(chunks))

    def close(self) -> None:
        self.runner.close()
