"""What `npuserve bench serve` shows: a progress bar per level, and the results as a
table (the JSON file and the figure, serve_plot, carry the same figures)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from worker.bench.serve_stats import RequestRecord
from worker.kernels.build import cpu_model


class Progress:
    """A one-line progress bar on stderr for one level; yields the per-request callback."""

    def __init__(self, desc: str, total: int | None) -> None:
        self.desc, self.total = desc, total

    def __enter__(self) -> Any:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, desc=self.desc, unit="req", file=sys.stderr,
                        dynamic_ncols=True, mininterval=0.5)
        self.start, self.tokens, self.errors = time.perf_counter(), 0, 0

        def on_done(record: RequestRecord) -> None:
            self.tokens += record.output_tokens
            self.errors += bool(record.error)
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s, {self.errors} errors", refresh=False)
            self.bar.update(1)

        return on_done

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def machine() -> dict[str, Any]:
    """The CPU, its cores and the load average before the run."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_1m": os.getloadavg()[0]}


def format_table(results: dict[str, Any]) -> str:
    """The levels as a table, the engine's beside them and the comparison, if run."""
    label = results["mode"]
    head = (f"{label:>11}  {'req/s':>7}  {'out tok/s':>9}  {'steady':>9}  {'TTFT p50/p99 ms':>17}  "
            f"{'ITL p50/p99 ms':>15}  {'E2E p50/p99 ms':>17}  errors")
    lines = [f"{results['target']}: {served_text(results)}, levels of {results['duration_s']:g} s"]
    for title, key in (("stack", "levels"), ("engine in-process, same requests",
                                             "engine_levels")):
        if key not in results:
            continue
        lines += [f"{title}:", head]
        lines += [_row(label, level) for level in results[key]]
    for c in results.get("comparison", []):
        lines.append(f"  {label} {c[label]:g}: stack/engine throughput "
                     f"{_num(c['stack_over_engine_throughput'], '.3f')}, added ITL p50 "
                     f"{_num(c['added_itl_p50_ms'], '+.2f')} ms, p99 "
                     f"{_num(c['added_itl_p99_ms'], '+.2f')} ms")
    m = results["machine"]
    lines.append(f"{m['cpu']}, {m['cores']} cores, load average {m['load_average_1m']:.1f} "
                 f"before the run; {results['wall_s']:g} s in all")
    return "\n".join(lines)


def served_text(results: dict[str, Any]) -> str:
    """What the target served, as ListModels said: model on backend device (batch N)."""

    def worker(w: dict[str, Any]) -> str:
        where = w["backend"] if w["device"] == w["backend"] else f"{w['backend']} {w['device']}"
        return f"{where} (batch {w['capacity']})"

    return "; ".join(f"{m['name']} on " + ", ".join(worker(w) for w in m["workers"])
                     for m in results["served"])


def _row(label: str, level: dict[str, Any]) -> str:
    def pair(metric: str) -> str:
        d = level[metric]
        return f"{_num(d['p50'], '.1f')} / {_num(d['p99'], '.1f')}"

    errors = ", ".join(f"{k} {v}" for k, v in level["errors"].items()) or "0"
    if level["unfinished"]:
        errors += f"; {level['unfinished']} unfinished"
    return (f"{level[label]:>11g}  {_num(level['requests_per_s'], '.2f'):>7}  "
            f"{_num(level['output_tokens_per_s'], ',.1f'):>9}  "
            f"{_num(level['steady_output_tokens_per_s'], ',.1f'):>9}  {pair('ttft_ms'):>17}  "
            f"{pair('itl_ms'):>15}  {pair('e2e_ms'):>17}  {errors}")


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
