"""The torch backend's own settings: device placement, dtype, KV cache and CPU options.

Kept apart from the backend so the CLI can list them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.config import setting
from common.errors import InvalidRequestError

if TYPE_CHECKING:
    from worker.model.config import ModelConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "bfloat16")


@dataclass(frozen=True, slots=True)
class TorchSettings:
    """How the torch backend places one model on one device."""

    device: str = "cpu"
    """cpu, cuda[:N] or npu[:N] (Ascend, through torch_npu); with --tensor-parallel also a
    range or list, one device per rank (npu:0-7, cuda:0,1)."""
    dtype: str = setting("auto", choices=DTYPES)
    """Compute and weight dtype; auto: the checkpoint's where the device computes it well
    (a bfloat16 checkpoint in bfloat16 on an x86 CPU with AVX2 and the CPU kernels, and on
    CUDA; float16 on CUDA), else float32; on Ascend the SoC's (bfloat16 on 910B/A2/A3,
    float16 on 310P). worker/backends/dtype_choice.py has the rule."""
    kv_cache_dtype: str = setting("auto", choices=KV_CACHE_DTYPES)
    """The KV cache's dtype: auto, the model's; bfloat16 halves a float32 model's cache (the
    bytes decode attention reads every step, and the memory a token holds), each key and
    value rounded once as it is stored; for float32 on the CPU kernels (a bfloat16 model's
    cache is bfloat16 already)."""
    block_size: int | None = None
    """Tokens per KV cache block; unset: the op set's default (16 for PyTorch's ops and the
    CPU kernels)."""
    kv_cache_gb: float | None = None
    """KV cache size in GiB; unset sizes it from kv_cache_fraction of free memory. Either way
    it is capped at what max_num_seqs sequences of the full context length can use."""
    kv_cache_fraction: float = 0.3
    """Share of free device memory for the KV cache when kv_cache_gb is not set."""
    threads: int | None = None
    """CPU threads for torch, fixed. Unset on a CPU: the CPUs the process may use, capped by
    its cgroup CPU quota, and fewer while other processes keep some of them busy (checked
    about once a second); elsewhere torch's default."""
    cpu_packed_weights: bool = True
    """On CPU, keep a oneDNN-packed second copy of each projection for steps of 3+ tokens:
    2-3x faster batched decode, 20% faster prefill, twice the weight memory."""
    tensor_parallel: int = 1
    """Ranks one model is split over (attention heads and MLP), one process and device
    each: cpu, or consecutive devices from the one given (cuda:0 with 2: cuda:0 and cuda:1)."""
    tp_timeout_s: float = 120.0
    """Under tensor parallelism, how long rank 0 waits for the others in a step before it
    gives up and the worker exits, handing its requests back (at start the ranks get up to
    10 minutes to load and join)."""
    cpu_kernels: bool = True
    """On CPU in float32, run decode-time projections, attention and the elementwise steps
    with npuserve's C kernels (compiled for the machine on first use; needs a C compiler,
    else PyTorch's ops run with a warning). Off uses PyTorch's ops throughout."""
    cpu_split_steps: bool = True
    """While other processes leave this worker one thread (threads unset), run a step that
    prefills several prompts as two independent halves on two threads, which the scheduler
    then gives their share of the cores (worker/backends/split_step.py). Off keeps every
    step on the one thread."""
    cpu_dispatch: bool = True
    """With the CPU kernels, time each float32 or bfloat16 projection's GEMMs (npuserve's
    kernel, oneDNN, MKL) and each w8a16 one's (the int8 kernel, F.linear on the widened
    weight) per row bucket, and decode attention's context split, the first time a model
    starts on this CPU (seconds, cached beside the compiled kernels) and route each to the
    fastest. Off keeps the built-in rule (kernel up to 16 rows, oneDNN above; bfloat16 by
    how the CPU multiplies it, worker/model/linear.py; the int8 kernel throughout)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidRequestError("dtype", f"must be one of {', '.join(DTYPES)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise InvalidRequestError("kv_cache_dtype",
                                      f"must be one of {', '.join(KV_CACHE_DTYPES)}")
        if self.block_size is not None and self.block_size < 1:
            raise InvalidRequestError("block_size", "must be >= 1")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise InvalidRequestError("kv_cache_gb", "must be > 0")
        if not 0 < self.kv_cache_fraction <= 1:
            raise InvalidRequestError("kv_cache_fraction", "must be in (0, 1]")
        if self.tensor_parallel < 1:
            raise InvalidRequestError("tensor_parallel", "must be >= 1")
        kind, _, index = self.device.partition(":")
        if kind not in ("cpu", "cuda", "npu"):
            raise InvalidRequestError("device", f"{self.device!r}: use cpu, cuda[:N] or npu[:N]")
        try:
            listed = device_indices(index)
        except ValueError:
            raise InvalidRequestError("device", f"{self.device!r}: the index must be N, a "
                                      "range N-M or a list N,M") from None
        if listed is not None and len(listed) != self.tensor_parallel:
            raise InvalidRequestError(
                "device", f"{self.device!r} names {len(listed)} devices but "
                f"--tensor-parallel is {self.tensor_parallel}: name one device per rank")
        if self.tp_timeout_s <= 0:
            raise InvalidRequestError("tp_timeout_s", "must be > 0")
        if self.threads is not None and self.threads < 1:
            raise InvalidRequestError("threads", "must be >= 1")

    def dtype_name(self, checkpoint: ModelConfig, soc_version: int | None = None) -> str:
        """The dtype a worker with these settings computes `checkpoint` in: the one set, else
        auto's (an NPU's by its SoC, as torch_npu reports it: float16 on 310P, bfloat16 on
        the others; both 2 bytes)."""
        if self.dtype != "auto":
            return self.dtype
        from worker.backends.dtype_choice import auto_dtype

        npu = "bfloat16"
        if self.device.startswith("npu") and soc_version is not None:
            from worker.model.npu_ops import soc_family

            npu = "float16" if soc_family(soc_version) == "310p" else "bfloat16"
        cuda_bf16 = True
        if self.device.startswith("cuda") and checkpoint.torch_dtype == "bfloat16":
            import torch

            cuda_bf16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
        return auto_dtype(checkpoint.torch_dtype, checkpoint.quantization is not None,
                          self.device, npu_default=npu, cpu_kernels=self.cpu_kernels,
                          cuda_bf16=cuda_bf16)

    def kv_dtype_name(self, checkpoint: ModelConfig, soc_version: int | None = None) -> str:
        """The KV cache's dtype for these settings (dtype_name's unless bfloat16 is set)."""
        if self.kv_cache_dtype == "bfloat16":
            return "bfloat16"
        return self.dtype_name(checkpoint, soc_version)


def device_indices(index: str) -> list[int] | None:
    """"0-7" -> [0..7], "0,2,4" -> [0, 2, 4]; None for a single index (or none)."""
    if "-" in index:
        first, _, last = index.partition("-")
        return list(range(int(first), int(last) + 1))
    if "," in index:
        return [int(i) for i in index.split(",")]
    if index:
        int(index)
    return None
