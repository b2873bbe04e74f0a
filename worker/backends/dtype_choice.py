"""`--dtype auto`: the dtype a model computes in when none is set.

As vLLM's `auto`, the checkpoint's own dtype where the device computes it well, else the
nearest that it does:
- CPU: a bfloat16 checkpoint in bfloat16 where npuserve's CPU kernels run it (x86 with AVX2;
  they widen its weights as they read them, so decode reads half of float32's bytes: 1.6-2x
  faster at batch 1 on every CPU measured, AVX2 included, and 0.9-2.3x batched, the 0.9 at 32
  sequences on a Xeon without AVX512-BF16, where its `--quick` throughput was 1.0-1.2x
  float32's in runs minutes apart, prefill being bound by arithmetic in either, and 0.9-1.1x
  through the whole stack on a second such Xeon; see the README's --dtype row). Otherwise
  float32, the exact widening:
  float16 checkpoints too (bfloat16 would drop three bits of their mantissa), and int8 ones,
  whose kernels take float32 activations.
- CUDA: a bfloat16 or float16 checkpoint in its own dtype (a bfloat16 one in float32 on a GPU
  without bfloat16); float32 stays float32.
- NPU: the SoC's (bfloat16 on 910B/A2/A3, float16 on 310P, which has no bfloat16).

Pure functions of the checkpoint's config and the machine, so the worker, `npuserve doctor`
and the benchmarks' references agree without loading anything.
"""

from __future__ import annotations

HALF = ("bfloat16", "float16")


def auto_dtype(checkpoint: str, quantized: bool, device: str, *, npu_default: str = "bfloat16",
               cpu_kernels: bool = True, cpu_flags: str | None = None,
               cuda_bf16: bool = True) -> str:
    """The dtype `--dtype auto` takes for a checkpoint stored in `checkpoint` (its config's
    torch_dtype) on `device` (cpu, cuda[:N], npu[:N]). `npu_default`: the SoC's dtype;
    `cpu_kernels`: whether the settings allow the compiled CPU kernels; `cpu_flags`:
    /proc/cpuinfo's flags line (read when None); `cuda_bf16`: whether the GPU computes
    bfloat16."""
    kind = device.partition(":")[0]
    if kind == "npu":
        return npu_default
    if kind == "cuda":
        if checkpoint == "bfloat16" and not cuda_bf16:
            return "float32"
        return checkpoint if checkpoint in HALF else "float32"
    if checkpoint == "bfloat16" and not quantized and cpu_kernels \
            and cpu_runs_bfloat16(cpu_flags):
        return "bfloat16"
    return "float32"


def cpu_runs_bfloat16(flags: str | None = None) -> bool:
    """Whether npuserve's CPU kernels can run a bfloat16 model here: x86 with AVX2 and FMA
    (AVX512-BF16 and AMX make it faster still; the kernels widen bfloat16 without them)."""
    if flags is None:
        from worker.kernels.build import cpu_flags

        flags = cpu_flags()
    words = set(flags.split())
    return {"avx2", "fma"} <= words
