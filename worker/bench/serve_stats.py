"""What `npuserve bench serve` records per request, and the figures of one load level.

Latencies follow vLLM's serving benchmark: time to first token (TTFT) from sending the
request to its first token; inter-token latency (ITL), every gap between two consecutive
streamed messages of a request (the gateway sends one message per token); time per output
token (TPOT), a request's (E2E - TTFT) / (tokens - 1); end-to-end latency (E2E), from sending
to the last message. Throughput counts the finished requests' output tokens over the level's
wall time, from its first request sent to its last one finished; the steady throughput, the
tokens of every request that arrived while the load was at its level (from the first request
finished to the last one sent) over that time, leaving out the ramp up and the drain.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it; times in seconds of time.perf_counter()."""

    index: int
    sent: float
    times: list[float] = field(default_factory=list)
    """When each message carrying tokens arrived."""
    sizes: list[int] = field(default_factory=list)
    """Tokens each of those messages carried (one, unless the gateway held text back)."""
    output_tokens: int = 0
    prompt_tokens: int = 0
    """As the gateway counted them (its last message's usage)."""
    error: str = ""
    """The gRPC status name of a failed stream; empty when it finished."""
    unfinished: bool = False
    """Still streaming when the level's hard cap cancelled it."""
    queue_wait_s: float | None = None
    """The gateway's figure: from queueing the request to a worker taking it."""
    gateway_ttft_s: float | None = None
    """The gateway's figure: from receiving the call to relaying the first token."""

    @property
    def first(self) -> float | None:
        return self.times[0] if self.times else None

    @property
    def last(self) -> float | None:
        return self.times[-1] if self.times else None

    @property
    def gaps(self) -> list[float]:
        """Seconds between consecutive messages."""
        t = self.times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def ok(self) -> bool:
        return not self.error and not self.unfinished and bool(self.times)

    def message(self, now: float, tokens: int) -> None:
        """A message with `tokens` token ids arrived at `now`."""
        self.times.append(now)
        self.sizes.append(tokens)
        self.output_tokens += tokens


@dataclass(slots=True)
class LevelRun:
    """The records of one level and its wall time."""

    label: str
    """"concurrency" or "rate"."""
    value: float
    records: list[RequestRecord]
    wall_s: float
    sent_until: float | None = None
    """When the level sent its last request (perf_counter seconds)."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, numpy's default; nan if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def distribution_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """Mean and PERCENTILES of durations, in milliseconds (None where there are none)."""
    if not seconds:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    out = {"mean": round(sum(seconds) / len(seconds) * 1e3, 3)}
    out |= {f"p{q}": round(percentile(seconds, q) * 1e3, 3) for q in PERCENTILES}
    return dict(out)


def summarize(run: LevelRun) -> dict[str, Any]:
    """The level's figures, as they go into the JSON file."""
    done = [r for r in run.records if r.ok]
    errors = Counter(r.error for r in run.records if r.error)
    out_tokens = sum(r.output_tokens for r in done)
    ttft = [r.first - r.sent for r in done if r.first is not None]
    e2e = [r.last - r.sent for r in done if r.last is not None]
    tpot = [(r.last - r.first) / (r.output_tokens - 1) for r in done
            if r.first is not None and r.last is not None and r.output_tokens > 1]
    itl = [g for r in done for g in r.gaps]
    queue_wait = [r.queue_wait_s for r in done if r.queue_wait_s is not None]
    gateway_ttft = [r.gateway_ttft_s for r in done if r.gateway_ttft_s is not None]
    return {
        run.label: run.value,
        "requests": len(run.records),
        "completed": len(done),
        "unfinished": sum(r.unfinished for r in run.records),
        "errors": dict(sorted(errors.items())),
        "error_count": sum(errors.values()),
        "duration_s": round(run.wall_s, 3),
        "requests_per_s": _rate(len(done), run.wall_s, 3),
        "output_tokens": out_tokens,
        "output_tokens_per_s": _rate(out_tokens, run.wall_s, 2),
        "steady_output_tokens_per_s": steady_rate(run),
        "mean_prompt_tokens": round(sum(r.prompt_tokens for r in done) / len(done), 1)
        if done else None,
        "mean_output_tokens": round(out_tokens / len(done), 1) if done else None,
        "ttft_ms": distribution_ms(ttft),
        "itl_ms": distribution_ms(itl),
        "tpot_ms": distribution_ms(tpot),
        "e2e_ms": distribution_ms(e2e),
        "queue_wait_ms": distribution_ms(queue_wait),
        "gateway_ttft_ms": distribution_ms(gateway_ttft),
    }


def steady_rate(run: LevelRun, least_s: float = 1.0) -> float | None:
    """Output tokens per second that arrived from the first request finished to the last
    one sent, or None if that is under `least_s` seconds."""
    ends = [r.last for r in run.records if r.ok and r.last is not None]
    if not ends or run.sent_until is None or run.sent_until - min(ends) < least_s:
        return None
    lo, hi = min(ends), run.sent_until
    tokens = sum(n for r in run.records for t, n in zip(r.times, r.sizes, strict=True)
                 if lo <= t <= hi)
    return round(tokens / (hi - lo), 2)


def _rate(count: float, seconds: float, digits: int) -> float | None:
    return round(count / seconds, digits) if seconds > 0 else None


def compare(stack: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any]:
    """The stack's level against the engine's run of the same requests: the throughput
    ratio and the latency the stack adds per token and to the first token."""

    def diff(metric: str, q: str) -> float | None:
        a, b = stack[metric][q], engine[metric][q]
        return None if a is None or b is None else round(a - b, 3)

    ours, theirs = stack["output_tokens_per_s"], engine["output_tokens_per_s"]
    return {
        "stack_over_engine_throughput":
            round(ours / theirs, 4) if ours is not None and theirs else None,
        "added_itl_p50_ms": diff("itl_ms", "p50"),
        "added_itl_p90_ms": diff("itl_ms", "p90"),
        "added_itl_p99_ms": diff("itl_ms", "p99"),
        "added_ttft_p50_ms": diff("ttft_ms", "p50"),
    }
