"""`npuserve doctor`: what this machine has for serving, and whether a model fits on it.

It prints the software a worker depends on (Python, torch, transformers; torch_npu and the
CANN toolkit for Ascend, CUDA devices), then the memory plan of one model under the given
torch-backend settings: weights per rank (tensor parallelism splits attention, MLP,
embedding and lm_head), a step's activations, and what is left for the KV
cache, in tokens and full-length sequences. When something does not fit it says which
setting to change and to what. The worker's NPU start-up failure report uses the same probe.

torch_npu is never imported here unless a probe of the NPU is asked for: installed without
CANN it breaks `import torch` itself, so npuserve turns torch's automatic loading of device
backends off (TORCH_DEVICE_BACKEND_AUTOLOAD=0) and imports it only for an npu device.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import EngineConfig
from common.errors import ModelConfigError
from common.flags import add_flags, from_args
from worker.backends.torch_settings import TorchSettings
from worker.model.config import ModelConfig

CANN_HOMES = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")
DEFAULT_CANN = Path("/usr/local/Ascend/ascend-toolkit/latest")
GIB = float(1 << 30)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cann_version() -> str | None:
    """The CANN toolkit's version, from its install info, or None when none is found."""
    homes = [Path(os.environ[v]) for v in CANN_HOMES if os.environ.get(v)] + [DEFAULT_CANN]
    for home in homes:
        for info in [home / "version.cfg", *sorted(home.glob("*/ascend_toolkit_install.info"))]:
            if info.is_file():
                for line in info.read_text(errors="replace").splitlines():
                    key, _, value = line.partition("=")
                    if key.strip() in ("version", "toolkit_version", "Version"):
                        return f"{value.strip()} ({home})"
    return None


def environment() -> dict[str, Any]:
    """Versions of what a worker runs on; devices torch can see (CUDA only: the NPU is
    probed by `npu_probe`)."""
    import torch

    found: dict[str, Any] = {
        "python": platform.python_version(), "machine": platform.machine(),
        "torch": torch.__version__, "transformers": _version("transformers"),
        "torch_npu": _version("torch-npu"), "cann": cann_version(),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "cpu_threads": torch.get_num_threads(),
    }
    return found


def npu_probe() -> dict[str, Any]:
    """torch_npu's view of the Ascend devices: SoC, count, free memory (imports torch_npu)."""
    import torch
    import torch_npu

    count = torch.npu.device_count()  # type: ignore[attr-defined]
    torch.npu.set_device(0)  # type: ignore[attr-defined]
    free, total = torch.npu.mem_get_info(0)  # type: ignore[attr-defined]
    return {"soc_version": torch_npu.npu.get_soc_version(), "devices": count,
            "name": torch.npu.get_device_name(0),  # type: ignore[attr-defined]
            "free_gib": free / GIB, "total_gib": total / GIB}


def npu_unavailable(device: str, exc: BaseException) -> str:
    """The message a worker gives when torch_npu cannot be loaded: what was found, what to do."""
    env = environment()
    cann = env["cann"] or f"not found (looked in $ASCEND_TOOLKIT_HOME and {DEFAULT_CANN})"
    return (
        f"device {device} needs torch_npu on Ascend CANN, and loading it failed: {exc!r}. "
        f"Found torch {env['torch']}, torch_npu {env['torch_npu'] or 'not installed'}, CANN "
        f"{cann}. "
        f"Install the CANN toolkit and kernels for your SoC, `source "
        f"/usr/local/Ascend/ascend-toolkit/set_env.sh`, and `pip install torch-npu=="
        f"{env['torch'].split('+')[0]}` in this venv; or serve on cpu or cuda")


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    ranks: int
    weight_bytes_per_rank: int
    activation_bytes: int
    kv_bytes_per_token_per_rank: int
    free_bytes: int | None
    """Free device memory per rank as the device reports it (None: not probed)."""
    kv_budget_bytes: int | None
    max_model_len: int
    fitting_ranks: int | None = None
    """The fewest ranks over which weights and activations would fit (None: none found, or
    they fit already)."""

    @property
    def kv_tokens(self) -> int | None:
        if self.kv_budget_bytes is None:
            return None
        return self.kv_budget_bytes // self.kv_bytes_per_token_per_rank

    def problems(self, settings: TorchSettings) -> list[str]:
        """What does not fit, each with the change that makes it fit."""
        out = []
        need = self.weight_bytes_per_rank + self.activation_bytes
        if self.free_bytes is not None and need > self.free_bytes:
            more = (f"--tensor-parallel {self.fitting_ranks}" if self.fitting_ranks
                    else "more devices")
            out.append(
                f"weights and activations need {need / GIB:.1f} GiB per rank but "
                f"{self.free_bytes / GIB:.1f} GiB are free: use {more} or an int8 checkpoint "
                "(npuserve quantize)")
        if self.kv_tokens is not None and self.kv_tokens < self.max_model_len:
            want = self.max_model_len * self.kv_bytes_per_token_per_rank / GIB
            out.append(
                f"the KV cache holds {self.kv_tokens} tokens, less than one sequence of "
                f"{self.max_model_len}: raise --kv-cache-gb to at least {want:.2f} or lower "
                "--max-model-len")
        if (self.free_bytes is not None and self.kv_budget_bytes is not None
                and need <= self.free_bytes < need + self.kv_budget_bytes):
            room = (self.free_bytes - need) / GIB
            out.append(f"weights, activations and a KV cache of "
                       f"{self.kv_budget_bytes / GIB:.1f} GiB exceed the "
                       f"{self.free_bytes / GIB:.1f} GiB free: set --kv-cache-gb "
                       f"{max(room, 0.0):.1f} or less")
        return out


def memory_plan(model_dir: Path, settings: TorchSettings, engine: EngineConfig,
                free_bytes: int | None = None) -> MemoryPlan:
    """The plan for `model_dir` on one rank of `settings.tensor_parallel`."""
    cfg = ModelConfig.from_dir(model_dir)
    ranks = settings.tensor_parallel
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2}
    size, kv_size = sizes[settings.dtype_name(cfg)], sizes[settings.kv_dtype_name(cfg)]
    weights, activations, kv_token = _per_rank(cfg, ranks, size, engine, kv_size)
    fitting = None
    if free_bytes is not None and weights + activations > free_bytes:
        for more in range(ranks + 1, cfg.num_attention_heads + 1):
            try:
                w, a, _ = _per_rank(cfg, more, size, engine, kv_size)
            except ModelConfigError:
                continue  # heads or the MLP do not divide among `more` ranks
            if w + a <= free_bytes:
                fitting = more
                break
    max_len = min(cfg.max_position_embeddings, engine.max_model_len or 1 << 30)
    budget = (int(settings.kv_cache_gb * GIB) if settings.kv_cache_gb is not None
              else int(free_bytes * settings.kv_cache_fraction) if free_bytes is not None
              else None)
    return MemoryPlan(ranks, weights, activations, kv_token, free_bytes, budget, max_len,
                      fitting)


def _per_rank(cfg: ModelConfig, ranks: int, size: int, engine: EngineConfig, kv_size: int
              ) -> tuple[int, int, int]:
    """(weight bytes, activation bytes, KV bytes per token) of one of `ranks` ranks: layers
    sharded by heads and MLP, embedding and lm_head by vocabulary rows (as
    worker.model.sharding does)."""
    from worker.model.sharding import Shard

    rank = Shard(0, ranks).config(cfg) if ranks > 1 else cfg
    weight = 1 if cfg.quantization is not None else size  # int8 weights: a byte each
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    per_layer = (h * (rank.q_size + 2 * rank.kv_size) + rank.q_size * h
                 + 3 * h * rank.intermediate_size)
    embed = -(-cfg.vocab_size // ranks) * h  # this rank's vocabulary rows
    vocab_and_norms = (embed * (1 if cfg.tie_word_embeddings else 2) * size
                       + (2 * layers + 1) * h * size)
    tokens = engine.max_num_batched_tokens
    activations = tokens * (4 * h + 2 * rank.intermediate_size + rank.q_size + 2 * rank.kv_size
                            ) * size + engine.max_num_seqs * cfg.vocab_size * 4
    kv_token = 2 * layers * rank.num_key_value_heads * rank.head_dim * kv_size
    return layers * per_layer * weight + vocab_and_norms, activations, kv_token


def _free_bytes(settings: TorchSettings) -> int | None:
    from worker.backends.tensor_parallel import rank_device
    from worker.backends.torch_runner import free_memory_bytes, resolve_device

    device = rank_device(settings.device, 0)
    if device.startswith("npu"):
        return int(npu_probe()["free_gib"] * GIB)
    resolved = resolve_device(device)
    if resolved.type == "cpu":  # the ranks share the host's memory
        return free_memory_bytes(resolved) // settings.tensor_parallel
    return free_memory_bytes(resolved) if resolved.type == "cuda" else None


def report(model_dir: Path | None, settings: TorchSettings, engine: EngineConfig) -> dict[str, Any]:
    found: dict[str, Any] = {"environment": environment()}
    if settings.device.startswith("npu"):
        try:
            found["npu"] = npu_probe()
        except Exception as exc:  # reported: the doctor's job is to say what is missing
            found["npu"] = {"error": npu_unavailable(settings.device, exc)}
    if model_dir is not None:
        free = None if "error" in found.get("npu", {}) else _free_bytes(settings)
        plan = memory_plan(model_dir, settings, engine, free)
        soc = found.get("npu", {}).get("soc_version")
        checkpoint = ModelConfig.from_dir(model_dir)
        found["plan"] = {
            "ranks": plan.ranks, "device": settings.device,
            "dtype": settings.dtype_name(checkpoint, soc),
            "kv_cache_dtype": settings.kv_dtype_name(checkpoint, soc),
            "weights_gib_per_rank": plan.weight_bytes_per_rank / GIB,
            "activations_gib": plan.activation_bytes / GIB,
            "kv_bytes_per_token_per_rank": plan.kv_bytes_per_token_per_rank,
            "free_gib_per_rank": None if free is None else free / GIB,
            "kv_cache_gib": None if plan.kv_budget_bytes is None else plan.kv_budget_bytes / GIB,
            "kv_tokens": plan.kv_tokens, "max_model_len": plan.max_model_len,
            "full_length_sequences": None if plan.kv_tokens is None
            else plan.kv_tokens // plan.max_model_len,
            "problems": plan.problems(settings)}
    return found


def format_report(found: dict[str, Any]) -> str:
    env = found["environment"]
    lines = [f"python {env['python']} ({env['machine']}), torch {env['torch']}, transformers "
             f"{env['transformers']}",
             f"torch_npu {env['torch_npu'] or 'not installed'}, CANN {env['cann'] or 'not found'}",
             f"CUDA devices: {', '.join(env['cuda']) or 'none'}; CPU threads {env['cpu_threads']}"]
    if "npu" in found:
        npu = found["npu"]
        lines.append(npu["error"] if "error" in npu else
                     f"NPU: {npu['devices']} x {npu['name']} (SoC {npu['soc_version']}), "
                     f"{npu['free_gib']:.1f} of {npu['total_gib']:.1f} GiB free")
    if "plan" in found:
        p = found["plan"]
        free = "unknown" if p["free_gib_per_rank"] is None else f"{p['free_gib_per_rank']:.1f}"
        lines += [
            f"memory plan, {p['ranks']} rank(s) of {p['device']} in {p['dtype']}:",
            f"  weights {p['weights_gib_per_rank']:.2f} GiB per rank, activations "
            f"{p['activations_gib']:.2f} GiB, free {free} GiB per rank",
            f"  KV ({p['kv_cache_dtype']}) {p['kv_bytes_per_token_per_rank']} bytes per token "
            f"per rank; cache "
            f"{'unsized' if p['kv_cache_gib'] is None else format(p['kv_cache_gib'], '.2f')} "
            f"GiB = {p['kv_tokens']} tokens = {p['full_length_sequences']} sequences of "
            f"{p['max_model_len']}"]
        lines += [f"  PROBLEM: {problem}" for problem in p["problems"]] or ["  fits"]
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "doctor", help="print the serving environment and a model's memory plan",
        description="Print Python/torch/transformers/torch_npu/CANN versions and the devices, "
                    "and with --model the memory plan of that model under the given settings "
                    "(weights per rank, activations, KV cache tokens), saying what to change "
                    "when it does not fit. Exits 1 when it does not.")
    p.add_argument("--model", type=Path, default=None, help="Hugging Face checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_flags(p, EngineConfig)
    add_flags(p.add_argument_group("torch backend settings"), TorchSettings)
    p.set_defaults(handler=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    found = report(args.model, from_args(TorchSettings, args), from_args(EngineConfig, args))
    print(json.dumps(found, indent=1) if args.json else format_report(found))
    problems = found.get("plan", {}).get("problems") or "error" in found.get("npu", {})
    return 1 if problems else 0

