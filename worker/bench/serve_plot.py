"""The figure of `npuserve bench serve`: throughput and latency percentiles against load.

Four panels sharing the load axis (one tick per level): output tokens per second, and TTFT,
ITL and E2E at p50, p90 and p99. The engine's run of the same requests (--compare-engine) is
drawn dashed in grey beside the stack's, and the throughput panel names the ratio per level;
levels with errors or unfinished requests are marked in red.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.bench.serve_report import served_text

SHADES = {"p50": "#08519c", "p90": "#3182bd", "p99": "#9ecae1"}
ENGINE = "#636363"


def plot(results: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = results["mode"]
    stack = results["levels"]
    engine = results.get("engine_levels")
    x = list(range(len(stack)))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    tput, ttft, itl, e2e = axes.flat

    tput.plot(x, [lv["output_tokens_per_s"] for lv in stack], "o-", color=SHADES["p50"],
              label="stack")
    tput.plot(x, [_nan(lv["steady_output_tokens_per_s"]) for lv in stack], "o:",
              color=SHADES["p99"], label="stack, steady (no ramp up or drain)")
    if engine:
        tput.plot(x, [lv["output_tokens_per_s"] for lv in engine], "s--", color=ENGINE,
                  label="engine in-process")
        for i, c in enumerate(results["comparison"]):
            ratio = c["stack_over_engine_throughput"]
            if ratio is not None:
                tput.annotate(f"{ratio:.2f}x", (i, stack[i]["output_tokens_per_s"] or 0),
                              textcoords="offset points", xytext=(0, -16), ha="center",
                              fontsize=8, color=SHADES["p50"])
    for i, lv in enumerate(stack):
        bad = lv["error_count"] + lv["unfinished"]
        if bad:
            tput.annotate(f"{bad} failed", (i, lv["output_tokens_per_s"] or 0), color="red",
                          textcoords="offset points", xytext=(0, -28), ha="center",
                          fontsize=8)
    tput.set_ylabel("output tokens / s")
    tput.set_ylim(bottom=0)
    tput.set_title("Throughput" + (" (labels: stack / engine)" if engine else ""))
    tput.margins(x=0.1)
    tput.legend(fontsize=8)

    for ax, metric, title in ((ttft, "ttft_ms", "Time to first token"),
                              (itl, "itl_ms", "Inter-token latency"),
                              (e2e, "e2e_ms", "End-to-end latency")):
        _percentiles(ax, x, stack, engine, metric)
        ax.set_title(title)
        ax.set_ylabel("ms")
    for ax in (itl, e2e):
        ax.set_xticks(x, [f"{lv[label]:g}" for lv in stack])
        ax.set_xlabel("streams in flight" if label == "concurrency" else "requests / s (Poisson)")
    m = results["machine"]
    fig.suptitle(f"npuserve bench serve: {served_text(results)} ({results['target']})\n"
                 f"{m['cpu']}, {m['cores']} cores; {_workload(results)}", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _percentiles(ax: Any, x: list[int], stack: list[dict[str, Any]],
                 engine: list[dict[str, Any]] | None, metric: str) -> None:
    for q, shade in SHADES.items():
        ax.plot(x, [_nan(lv[metric][q]) for lv in stack], "o-", color=shade, label=f"stack {q}")
    if engine:
        for q, style in (("p50", "s--"), ("p99", "^:")):
            ax.plot(x, [_nan(lv[metric][q]) for lv in engine], style, color=ENGINE,
                    label=f"engine {q}")
    values = [v for lv in stack for v in lv[metric].values() if v]
    if values and max(values) / max(min(values), 1e-3) > 30:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    ax.margins(x=0.1)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _workload(results: dict[str, Any]) -> str:
    w = results["workload"]
    return (f"prompts ~{w['input_len']} tokens ({w['zh_fraction']:.0%} Chinese), outputs "
            f"{w['output_len']} tokens ({w['distribution']}, spread {w['spread']:g}), "
            f"levels of {results['duration_s']:g} s")
