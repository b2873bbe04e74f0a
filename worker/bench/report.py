"""Presenting an engine benchmark: the JSON file, the terminal table and the PNG plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.backends.torch_settings import TorchSettings

Results = dict[str, Any]
"""The flat JSON object `npuserve bench engine` writes; see engine_bench.run for the keys."""


def dtype_of(settings: TorchSettings, model_dir: str | Path) -> str:
    """The dtype npuserve computes this checkpoint in with these settings (`--dtype auto`
    looks at the checkpoint), which the transformers references load it in too."""
    from worker.model.config import ModelConfig

    return settings.dtype_name(ModelConfig.from_dir(Path(model_dir)))


def environment(settings: TorchSettings, model_dir: str | Path, load_start: float) -> Results:
    """The keys every benchmark records about where it ran: threads, CPUs, the load average
    at its start and end, dtype (and the KV cache's) and device."""
    import torch

    from worker.model.config import ModelConfig

    checkpoint = ModelConfig.from_dir(Path(model_dir))
    return {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_start": load_start,
        "load_average_1m_end": os.getloadavg()[0],
        "dtype": settings.dtype_name(checkpoint),
        "kv_cache_dtype": settings.kv_dtype_name(checkpoint),
        "device": settings.device,
    }


def placement(r: Results) -> str:
    """"float32 on cpu", with the KV cache's dtype where it is not the model's."""
    kv = r.get("kv_cache_dtype", r["dtype"])
    return f"{r['dtype']}{'' if kv == r['dtype'] else f' (KV cache {kv})'} on {r['device']}"


def write_json(results: Results, path: str | Path) -> None:
    """Write the results, creating the parent folder when missing."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _threads(r: Results) -> str:
    return f"{r['threads']} torch thread{'' if r['threads'] == 1 else 's'}"


def _spread(samples: list[float] | None, unit: str) -> str:
    """ "; 3 rounds: 22.1-25.3 ms" for a measurement taken more than once."""
    if not samples or len(samples) < 2:
        return ""
    return f"; {len(samples)} rounds: {min(samples):.1f}-{max(samples):.1f} {unit}"


def _against(copies: list[float] | None) -> str:
    """ " against 28.9-50.2 GB/s": the copy bandwidths measured before those rounds."""
    if not copies or len(copies) < 2:
        return ""
    return f" against {min(copies):.1f}-{max(copies):.1f} GB/s"


def _decode_rows(r: Results) -> list[tuple[str, str, str]]:
    rows = [
        (
            "npuserve batch-1 decode",
            f"{r['decode_ms_per_token_batch1']:.2f} ms/tok",
            f"{r['decode_vs_floor']:.2f}x the floor"
            + _spread(r.get("decode_ms_per_token_batch1_samples"), "ms"),
        ),
        (
            f"bandwidth floor ({r['bandwidth_gb_s']:.1f} GB/s)",
            f"{r['bandwidth_floor_ms_per_token']:.2f} ms/tok",
            f"{r['weight_bytes_per_decode_step'] / 1e6:.0f} MB/step"
            + _spread(r.get("bandwidth_gb_s_samples"), "GB/s"),
        ),
    ]
    if "quantized_decode_ms_per_token_batch1" in r:
        against = r["quantized_reference_decode_ms_per_token_batch1"]
        rows.append((
            f"{r['quantized_model']} batch-1 decode",
            f"{r['quantized_decode_ms_per_token_batch1']:.2f} ms/tok",
            f"x{r['quantized_decode_speedup']:.2f} vs float {against:.2f} ms/tok, alternated",
        ))
    if "quantized_decode_vs_floor" in r:
        rows.append((
            f"{r['quantized_model']} floor ({r['quantized_bandwidth_gb_s']:.1f} GB/s)",
            f"{r['quantized_bandwidth_floor_ms_per_token']:.2f} ms/tok",
            f"{r['quantized_weight_bytes_per_decode_step'] / 1e6:.0f} MB/step; its round's "
            f"decode {r['quantized_floor_round_decode_ms']:.2f} ms, "
            f"{r['quantized_decode_vs_floor']:.2f}x"
            + _spread(r.get("quantized_decode_ms_rounds"), "ms")
            + _against(r.get("quantized_bandwidth_gb_s_rounds")),
        ))
    return rows


def format_table(r: Results) -> str:
    """A short human summary; the ratios are the numbers to quote (absolute times drift)."""
    if r.get("decode_only"):
        rows = _decode_rows(r)
        head = (f"{r['model']}: decode only, batches up to {r['max_batch']}, {_threads(r)}, "
                f"{placement(r)}")
    else:
        rows = [
            ("npuserve (continuous batching)",
             f"{r['npuserve_output_tokens_per_s']:.1f} tok/s", ""),
            (
                f"transformers, one at a time ({r['hf_sequential_requests_measured']} requests)",
                f"{r['hf_sequential_output_tokens_per_s']:.1f} tok/s",
                f"npuserve x{r['speedup_vs_hf_sequential']:.2f}",
            ),
            (
                f"transformers, static batches of {r['max_batch']}",
                f"{r['hf_batched_output_tokens_per_s']:.1f} tok/s",
                f"npuserve x{r['speedup_vs_hf_batched']:.2f}",
            ),
            *_decode_rows(r),
        ]
        head = (
            f"{r['model']}: {r['requests']} requests, {r['total_prompt_tokens']} prompt + "
            f"{r['total_output_tokens']} output tokens, max batch {r['max_batch']}, "
            f"{_threads(r)}, {placement(r)}"
        )
    width = max(len(name) for name, _, _ in rows)
    lines = [head] + [f"  {name:<{width}}  {value:>14}  {note}" for name, value, note in rows]
    if not r.get("decode_only"):
        lines.append(
            f"  greedy outputs identical to transformers one-at-a-time: npuserve "
            f"{r['npuserve_outputs_matching_hf_sequential']}/"
            f"{r['hf_sequential_requests_measured']}, static batches "
            f"{r['hf_batched_outputs_matching_hf_sequential']}/"
            f"{r['hf_sequential_requests_measured']}"
        )
    if r.get("decode_tokens_per_s_by_batch"):
        by_batch = r["decode_tokens_per_s_by_batch"]
        lines.append("  npuserve decode by batch size (32-token prompts): " + ", ".join(
            f"{b}: {v:.0f}" for b, v in by_batch.items()) + " tok/s")
    if r.get("cpu_model"):
        lines.append(f"  CPU: {r['cpu_model']}; kernels use: {r['kernel_isa'] or 'none'}; "
                     f"one-call decode steps up to {r['one_call_decode_rows']} rows")
    if r.get("dispatch"):
        lines.append("  GEMM per projection shape (out x in) and rows:")
        lines.extend("    " + line for line in str(r["dispatch"]).splitlines())
    # the start value is the only one free of this benchmark's own threads
    if r["load_average_1m_start"] > 0.5 * (r["cpu_count"] or 1):
        lines.append(
            f"  note: load average {r['load_average_1m_start']:.1f} on {r['cpu_count']} CPUs "
            "before the run: other processes shared the cores, and torch threads that wait on "
            "each other slow down badly then (try --threads 1)"
        )
    return "\n".join(lines)


def plot(r: Results, path: str | Path) -> None:
    """Two panels: the three throughputs (decode only: decode tokens/s by batch size), and
    batch-1 decode time against its floor, the quantized model's beside it when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), width_ratios=(3, 2))
    if r.get("decode_only"):
        by_batch = r["decode_tokens_per_s_by_batch"]
        bars = left.bar(range(len(by_batch)), list(by_batch.values()), color="tab:blue")
        left.set_xticks(range(len(by_batch)), [str(b) for b in by_batch])
        left.set_xlabel("requests decoding together")
        left.set_title("npuserve decode throughput by batch size")
    else:
        names = [
            "npuserve\ncontinuous",
            "transformers\nsequential",
            f"transformers\nbatch {r['max_batch']}",
        ]
        values = [
            r["npuserve_output_tokens_per_s"],
            r["hf_sequential_output_tokens_per_s"],
            r["hf_batched_output_tokens_per_s"],
        ]
        bars = left.bar(names, values, color=["tab:blue", "tab:gray", "tab:orange"])
        left.set_title(f"Throughput, {r['requests']} requests")
    left.bar_label(bars, fmt="%.1f")
    left.set_ylabel("output tokens / s")

    names = ["npuserve\nbatch-1 decode", "bandwidth\nfloor"]
    decode = [r["decode_ms_per_token_batch1"], r["bandwidth_floor_ms_per_token"]]
    colors = ["tab:blue", "tab:green"]
    if "quantized_decode_vs_floor" in r:
        names += ["quantized\nbatch-1 decode", "quantized\nfloor"]
        decode += [r["quantized_floor_round_decode_ms"],
                   r["quantized_bandwidth_floor_ms_per_token"]]
        colors += ["tab:purple", "tab:olive"]
    bars = right.bar(names, decode, color=colors)
    right.bar_label(bars, fmt="%.2f")
    right.set_ylabel("ms / token")
    right.set_title(
        f"Decode: {r['decode_vs_floor']:.2f}x the floor ({r['bandwidth_gb_s']:.1f} GB/s)"
    )

    fig.suptitle(
        f"{r['model']} · {placement(r)} · {_threads(r)} · torch {r['torch_version']}"
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
