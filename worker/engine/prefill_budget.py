"""How many prefill tokens a step may carry while requests decode, learned from step times.

A step that carries a prefill chunk makes every running stream wait for the whole chunk, so
while requests are decoding the engine caps a step's prefill tokens at

    cap = stall * decode_s / per_token_s

where `decode_s` is the time of a step of as many decodes alone and `per_token_s` what each
prefill token added to a step that also decoded, both learned from the engine's own step
times. `decode_s` is the median of the latest DECODE_WINDOW decode-only steps of that many
decodes: the streams' usual gap, which a stall is measured against (a running average is
pulled up by every step another process slowed, and the cap with it: in one SmolLM2 run on a
Zen 4 it read 33.8 ms where decode steps took 30.7 on average, and mixed steps took 1.6x
their usual gap for a stall of 0.5). Per number of decodes, because 8 decodes took 28-31 ms
and 9 took 40-43 in one run there; a count not yet seen takes the nearest one's.
`per_token_s` is a running average. A step is then about (1 + stall) decode steps long,
whatever the machine, the model or the batch. The estimate is the step's measured extra time
over its prefill tokens, fixed costs included (a mixed step may leave a faster decode-only
path), so the cap settles where the measured step, not a model of it, meets the target.

A decode step's time is only as good as its latest measurement: streams' contexts grow, and
while prompts keep arriving every step may carry prefill. One SmolLM2 run on a Zen 4 whose
streams decoded on for two thousand tokens kept a decode step of 31 ms measured early, while
its steps' attention over the longer contexts had doubled them: every mixed step's extra
time was charged to its one or two prompt tokens (39 ms a token), the cap sat at one token,
and arrivals waited a minute for their first. So:

- when this many decodes (or the nearest count) have not run alone for REFRESH_STEPS steps,
  the cap is DECODE_ONLY: the next step runs the decodes alone and is measured;
- the median is of the samples taken within MAX_AGE_STEPS of the count's latest: while
  every step but the refreshes carries prefill, nine samples span 288 steps, and on a Zen 5
  (SmolLM2, 8 streams at contexts of 500-700 tokens) their median stayed at 29 ms while the
  refreshes took 34-44, which made one prompt token beside the decodes look 10 ms dear (2 ms
  when measured on its own) and held the cap at one token;
- a mixed step teaches the per-token cost only when its own number of decodes ran alone
  within REFRESH_STEPS: a ninth decode row charged to a prompt token of a step that the
  nearest count's time stands for would be another 3-4 ms.

Until a step has both decoded and prefilled, a prefill-only step (its whole time over its
tokens) seeds the per-token cost; with no prefill cost measured yet the cap is 0, which the
scheduler takes as one KV block a step (a smaller first guess would make the first mixed
steps' fixed costs look like a high cost per token). Once measured, the cap may be any
number of tokens down to one: on a CPU where a block of prefill is as much arithmetic as the
decodes (SmolLM2 at 8 streams on 2 Zen 4 cores: 16 tokens doubled a 28 ms step) only a
fraction of a block meets the stall. Where even one token adds more than the stall, the cap
stays at one token a step.

The cap is never below what keeps up with the prompts arriving: KEEP_UP times the prompt
tokens that arrive per second (over ARRIVAL_WINDOW_S) times the decode step's time. Over
time a step prefills what arrives whatever the cap, so a cap below the arrival rate spreads
nothing; it only queues prompts until their first-token bounds (the scheduler's) set the
pace. The rate is per second and the step is a decode step's, not the mixed steps' own
length, so the floor does not feed on itself: a mixed step is then at most (1 + KEEP_UP *
load) decode steps, where load is the share of the machine the arrivals' prefill takes
(tokens per second times seconds per token). No torch here.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable

from worker.engine.scheduler import DECODE_ONLY, StepStats

DECODE_WINDOW = 9
"""Decode-only steps (of one number of decodes) whose median is the decode step's time: a
change of batch or machine shows within five steps, and up to four slowed ones show not at
all."""

REFRESH_STEPS = 32
"""Steps after which a decode step's measurement is stale: a decode-only step every this many
costs prompts beside decodes about 3% of their steps."""

NEAR = 0.125
"""A number of decodes within this share of another (one at least) stands for it while its own
time is stale: where requests come and go every few steps (64 in flight, SmolLM2 on 2 Zen 5
cores) the count changed most steps between 56 and 64, and a decode-only step for each count
gone stale kept one step in eight from prefilling while prompts waited."""

MAX_AGE_STEPS = 3 * REFRESH_STEPS
"""Samples of a number of decodes taken this many steps before its latest are left out of the
median: its window is then the latest three or four refreshes where prefill runs beside
every other step, and the latest nine steps where the decodes run alone."""

SMOOTHING = 0.25
"""Weight of the newest step in the per-token running averages: a change of load or batch
shows within a few steps. A step slowed by another process lowers the cap for a few steps (the
safe side: shorter steps), and a quick one raises it by about a third."""


KEEP_UP = 2.0
"""The cap is at least this many times the prompt tokens that arrive during a decode step
(at the rate of the last ARRIVAL_WINDOW_S seconds). SmolLM2 on 2 Zen 5 cores, the engine in
a closed loop (prompts of 64-192 tokens, 32-96 out; the first tokens of requests that
replaced finished ones), with the floor counted per step:
- 64 in flight: at 1.25x the arrivals the first token took 1.8 s (9 steps: the prompts
  come in bunches, as requests finish together); at 2x, 0.61 s (3 steps) against 0.29 s
  uncapped, with a p99 gap of 406 against 453 ms, x1.04 throughput;
- 16 in flight, at 2x: 0.32 s (4 steps) against 0.16 s uncapped, a p99 gap of 116 against
  285 ms, x0.99 throughput.
Counted per step it fed on itself where prefill takes a large share of the machine: on 2
Zen 3 cores, 8 streams beside a 512-token prompt every ~3 s (about 2 ms a prompt token
beside 50-70 ms decode steps: prefill is four tenths of the work), the floor grew with the
mixed steps it lengthened, from 24 to 40 tokens a step, and they took 3-4x a decode step."""

ARRIVAL_WINDOW_S = 20.0
"""Seconds over which the arrival rate is averaged: a 512-token prompt every 3 s reads as
150-180 tokens a second, where a window of a few seconds would swing between none and a
whole prompt's worth. In an engine's first 20 s it reads low (the safe side: the cap and the
first-token bound set the pace)."""


class PrefillBudget:
    def __init__(self, stall: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall = stall
        """Prefill time a step may add while decoding, in decode steps; 0: no cap."""
        self._decode_s: dict[int, deque[tuple[int, float]]] = {}
        """Number of decodes -> the latest decode-only steps': (step count, seconds)."""
        self._steps = 0
        """Steps observed."""
        self._extra_s: float | None = None
        """Running average of the seconds prefill added to a mixed step."""
        self._extra_tokens: float | None = None
        """Running average of those steps' prefill tokens (same weights as _extra_s)."""
        self._seed_per_token_s: float | None = None
        """A prefill-only step's seconds per token, until a mixed step is measured."""
        self._clock = clock
        self._arrivals: deque[tuple[float, int]] = deque()
        """(clock, tokens to prefill) of the requests that arrived in the last
        ARRIVAL_WINDOW_S seconds."""
        self._arrival_tokens = 0
        """The tokens in `_arrivals`."""

    def arrived(self, tokens: int) -> None:
        """A request with this many tokens to prefill joined the engine (kept only where there
        is a cap)."""
        if self.stall <= 0:
            return
        now = self._clock()
        self._forget_arrivals(now)
        self._arrivals.append((now, tokens))
        self._arrival_tokens += tokens

    def arrival_rate(self) -> float:
        """Prompt tokens arriving per second, over the last ARRIVAL_WINDOW_S seconds."""
        self._forget_arrivals(self._clock())
        return self._arrival_tokens / ARRIVAL_WINDOW_S

    def _forget_arrivals(self, now: float) -> None:
        while self._arrivals and self._arrivals[0][0] <= now - ARRIVAL_WINDOW_S:
            self._arrival_tokens -= self._arrivals.popleft()[1]

    @property
    def per_token_s(self) -> float | None:
        """Estimated seconds one prefill token adds to a step that decodes."""
        if self._extra_s is not None and self._extra_tokens:
            return self._extra_s / self._extra_tokens
        return self._seed_per_token_s

    def decode_s(self, decodes: int) -> float | None:
        """Estimated seconds of a step of `decodes` decodes alone: the median of their
        latest, else of the nearest count's measured (the smaller on a tie), within
        MAX_AGE_STEPS of the latest; None before any decode-only step."""
        nearest = self._nearest(decodes)
        return None if nearest is None else self._median(nearest)

    def _median(self, decodes: int) -> float:
        """The median time of this many decodes alone, over the samples within MAX_AGE_STEPS
        of its latest."""
        samples = self._decode_s[decodes]
        latest = samples[-1][0]
        return statistics.median(s for at, s in samples if latest - at < MAX_AGE_STEPS)

    def _age(self, decodes: int) -> int:
        """Steps since this many decodes last ran alone."""
        return self._steps - self._decode_s[decodes][-1][0]

    def _nearest(self, decodes: int) -> int | None:
        """The measured number of decodes nearest this one (the smaller on a tie), one run
        alone within REFRESH_STEPS first if any is within NEAR of it."""
        if not self._decode_s:
            return None
        near = max(int(decodes * NEAR), 1)
        return min(self._decode_s, key=lambda c: (
            abs(c - decodes) > near or self._age(c) >= REFRESH_STEPS, abs(c - decodes), c))

    def tokens(self, decodes: int, refresh: bool = True) -> int | None:
        """Most prefill tokens for the next step if it runs `decodes` decodes; None for no
        cap, DECODE_ONLY while their decode step is unmeasured or stale (the step then runs
        them alone), 0 while no prefill cost is measured (the scheduler then takes one KV
        block), else at least 1. `refresh=False`: the cap from the measurements as they are
        (for a report), never DECODE_ONLY."""
        return self.limits(decodes, refresh)[0]

    def limits(self, decodes: int, refresh: bool = True) -> tuple[int | None, int]:
        """(cap, floor) for the next step if it runs `decodes` decodes, from one look-up of
        their decode step: the cap as `tokens` gives it, and the keep-up floor under it,
        KEEP_UP times the prompt tokens arriving during that decode step (0 with no cap, for
        a step that runs its decodes alone, or before a decode step is measured). Like the
        first-token bound, the floor lifts the cap beyond the rows a one-call step has left
        beside the decodes."""
        if self.stall <= 0:
            return None, 0
        nearest = self._nearest(decodes)
        if refresh and (nearest is None or self._age(nearest) >= REFRESH_STEPS):
            return DECODE_ONLY, 0
        if nearest is None:
            return 0, 0
        decode_s = self._median(nearest)
        floor = math.ceil(KEEP_UP * self.arrival_rate() * decode_s)
        per_token = self.per_token_s
        if per_token is None:
            return 0, floor
        if per_token <= 0:  # prefill added nothing measurable (a synthetic backend)
            return None, 0
        return max(int(self.stall * decode_s / per_token), 1), floor

    def observe(self, step: StepStats, seconds: float) -> None:
        """Learn from one step: what it ran (`Engine.last_step`) and how long it took."""
        self._steps += 1
        if step.prompt_tokens == 0:
            if step.decode_seqs:
                window = self._decode_s.setdefault(step.decode_seqs,
                                                   deque(maxlen=DECODE_WINDOW))
                window.append((self._steps, seconds))
            return
        if step.decode_seqs == 0:
            if self._extra_s is None:
                self._seed_per_token_s = seconds / step.prompt_tokens
            return
        if (step.decode_seqs not in self._decode_s
                or self._age(step.decode_seqs) > REFRESH_STEPS):
            return  # its decodes' own time is not known well enough to tell prefill's
        decode_s = self._median(step.decode_seqs)
        # the ratio of averages weighs each step by its tokens: a 3-token tail chunk, whose
        # extra time is mostly noise and fixed cost, moves the estimate little
        extra = max(seconds - decode_s, 0.0)
        self._extra_s = _average(self._extra_s, extra)
        self._extra_tokens = _average(self._extra_tokens, float(step.prompt_tokens))


def _average(mean: float | None, value: float) -> float:
    return value if mean is None else mean + SMOOTHING * (value - mean)
