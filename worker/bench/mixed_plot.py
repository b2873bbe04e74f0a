"""The figure of `npuserve bench engine --mixed-load`: the streams' inter-token gaps over time.

Two panels sharing both axes, the run without the prefill cap above the capped one: every gap
between two tokens of a stream as a dot at the time it ended (log scale, so that the usual
gap and a prefill's stall show together), the run's p50 and twice it as lines (the target is
a p99 under twice the p50), and each arriving prompt as a shaded span from its arrival to its
first token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GAP = "#3182bd"
ARRIVAL = "#fdae6b"


def plot(results: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True, sharey=True)
    runs = (("_no_cap", "no cap"),
            ("_cap", f"cap (--max-prefill-stall {results['max_prefill_stall']:g})"))
    for ax, (suffix, name) in zip(axes, runs, strict=True):
        series = results["series" + suffix]
        for i, (came, answered) in enumerate(series["arrivals_s"]):
            ax.axvspan(came, answered, color=ARRIVAL, alpha=0.5, lw=0,
                       label="a prompt arriving, until its first token" if i == 0 else None)
        ax.scatter(series["itl_at_s"], series["itl_ms"], s=4, color=GAP,
                   label="a stream's gap between two tokens")
        p50 = results["itl_p50_ms" + suffix]
        ax.axhline(p50, color="black", lw=0.8, label="p50")
        ax.axhline(2 * p50, color="black", lw=0.8, ls="--", label="2 x p50")
        ax.set_yscale("log")
        ax.set_ylabel("inter-token gap (ms)")
        ax.set_title(
            f"{name}: p99 / p50 {results['itl_p99_over_p50' + suffix]:.2f}, "
            f"{results['output_tokens_per_s' + suffix]:.1f} output tokens/s, first token "
            f"{results['arrival_ttft_mean_ms' + suffix]:.0f} ms on average", fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
    axes[-1].set_xlabel("seconds since the streams began")
    fig.suptitle(f"{results['model']}: {results['streams']} streams decoding while "
                 f"{results['arrivals']} prompts of {results['arrival_prompt_tokens']} tokens "
                 f"arrive ({results['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
