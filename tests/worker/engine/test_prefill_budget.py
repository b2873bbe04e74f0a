"""The prefill cap learned from step times, fed made-up timings and a made-up clock: no model."""

from __future__ import annotations

import pytest

from common.sampling_params import SamplingParams
from worker.backends.base import BackendCapacity
from worker.engine import prefill_budget
from worker.engine.prefill_budget import (
    ARRIVAL_WINDOW_S,
    DECODE_WINDOW,
    KEEP_UP,
    MAX_AGE_STEPS,
    REFRESH_STEPS,
    PrefillBudget,
)
from worker.engine.request import Request
from worker.engine.scheduler import DECODE_ONLY, Scheduler, StepStats

DECODES = 8


def decode(seconds: float) -> tuple[StepStats, float]:
    return StepStats(DECODES, 0, DECODES), seconds


def mixed(prompt_tokens: int, seconds: float) -> tuple[StepStats, float]:
    return StepStats(DECODES + 1, prompt_tokens, DECODES), seconds


def prefill_only(prompt_tokens: int, seconds: float) -> tuple[StepStats, float]:
    return StepStats(1, prompt_tokens, 0), seconds


def test_a_stall_of_zero_means_no_cap() -> None:
    budget = PrefillBudget(0.0)
    budget.observe(*decode(0.05))
    budget.observe(*mixed(64, 0.2))
    assert budget.tokens(DECODES) is None


def test_unmeasured_decodes_run_alone_once_and_then_the_cap_is_the_schedulers_floor() -> None:
    budget = PrefillBudget(1.0)
    assert budget.tokens(DECODES) == DECODE_ONLY
    budget.observe(*decode(0.05))
    assert budget.tokens(DECODES) == 0  # no prefill cost known yet


def test_a_decode_step_measured_refresh_steps_ago_is_measured_again() -> None:
    """Streams' steps grow with their contexts; while every step carries prefill, the decode
    step's time would stay what it was and each mixed step's growth be charged to prefill."""
    budget = PrefillBudget(1.0)
    budget.observe(*decode(0.05))
    for _ in range(REFRESH_STEPS - 1):
        budget.observe(*mixed(50, 0.1))
        assert budget.tokens(DECODES) == 50
    budget.observe(*mixed(50, 0.1))
    assert budget.tokens(DECODES) == DECODE_ONLY
    assert budget.tokens(DECODES, refresh=False) == 50  # the cap as measured, for reports
    budget.observe(*decode(0.08))  # the decodes' own step has grown
    assert budget.tokens(DECODES) == 65  # 1 ms a token, the median of 50 and 80 ms


def test_a_prefill_only_step_seeds_the_cost_per_token_until_a_mixed_step_is_measured() -> None:
    budget = PrefillBudget(1.0)
    budget.observe(*prefill_only(500, 1.0))  # 2 ms a token
    budget.observe(*decode(0.05))
    assert budget.tokens(DECODES) == 25
    budget.observe(*mixed(25, 0.15))  # the 25 tokens added 100 ms: 4 ms a token
    assert budget.per_token_s == pytest.approx(0.004)
    budget.observe(*prefill_only(500, 1.0))  # measured mixed steps are not overridden
    assert budget.per_token_s == pytest.approx(0.004)
    assert budget.tokens(DECODES) == 12


@pytest.mark.parametrize("stall", [0.5, 1.0, 2.0])
def test_the_cap_settles_where_a_mixed_step_takes_one_plus_stall_decode_steps(
        stall: float) -> None:
    # a machine whose mixed steps leave a faster decode-only path (40 ms) and then pay 2 ms
    # a prefill token beside decode steps of 75 ms
    def step_s(prompt_tokens: int) -> float:
        return 0.075 + (0.040 + 0.002 * prompt_tokens if prompt_tokens else 0.0)

    budget = PrefillBudget(stall)
    budget.observe(*prefill_only(512, 0.040 + 0.002 * 512))
    for _ in range(60):
        budget.observe(*decode(step_s(0)))
        cap = max(budget.tokens(DECODES) or 0, 1)
        budget.observe(*mixed(cap, step_s(cap)))
    assert step_s(cap) == pytest.approx((1 + stall) * step_s(0), rel=0.05)


def test_where_prefill_is_arithmetic_bound_the_cap_settles_below_one_kv_block() -> None:
    # SmolLM2 at 8 streams on 2 Zen 4 cores: 28 ms decode steps, a mixed step 3 ms more
    # and 1.5 ms a prefill token
    def step_s(prompt_tokens: int) -> float:
        return 0.028 + (0.003 + 0.0015 * prompt_tokens if prompt_tokens else 0.0)

    budget = PrefillBudget(0.5)
    budget.observe(*prefill_only(512, 0.4))
    for _ in range(60):
        budget.observe(*decode(step_s(0)))
        cap = budget.tokens(DECODES)
        assert cap is not None and cap >= 1
        budget.observe(*mixed(cap, step_s(cap)))
    assert cap == 7  # (0.5 x 28 - 3) / 1.5 = 7.3
    assert step_s(cap) <= 1.5 * step_s(0)


def test_a_stall_that_no_prefill_token_meets_leaves_one_token_a_step() -> None:
    budget = PrefillBudget(0.5)  # 10 ms, where any mixed step takes 15 ms more
    budget.observe(*decode(0.02))
    for _ in range(30):
        cap = budget.tokens(DECODES) or 16  # the scheduler's block while nothing is measured
        budget.observe(*mixed(cap, 0.02 + 0.015 + 0.001 * cap))
    assert budget.tokens(DECODES) == 1


def test_decode_steps_are_timed_per_number_of_decodes() -> None:
    budget = PrefillBudget(1.0)
    budget.observe(StepStats(8, 0, 8), 0.0305)
    budget.observe(StepStats(9, 0, 9), 0.0425)  # 9 rows cost more than 8 on that CPU
    budget.observe(StepStats(9, 10, 8), 0.0405)  # 10 tokens beside 8 decodes: 1 ms a token
    assert budget.per_token_s == pytest.approx(0.001)
    assert budget.tokens(8) == 30
    assert budget.tokens(9) == 42
    assert budget.decode_s(12) == pytest.approx(0.0425)  # the nearest count measured
    assert budget.decode_s(1) == pytest.approx(0.0305)


def test_decode_steps_slowed_by_another_process_leave_the_decode_step_time_as_it_was() -> None:
    budget = PrefillBudget(1.0)
    for _ in range(9):
        budget.observe(*decode(0.030))
    for _ in range(4):
        budget.observe(*decode(0.090))
    assert budget.decode_s(DECODES) == pytest.approx(0.030)
    for _ in range(5):  # the batch's steps really are slower now
        budget.observe(*decode(0.040))
    assert budget.decode_s(DECODES) == pytest.approx(0.040)


def test_prefill_that_costs_nothing_measurable_is_not_capped() -> None:
    budget = PrefillBudget(1.0)
    budget.observe(*decode(0.01))
    budget.observe(*mixed(100, 0.009))
    assert budget.tokens(DECODES) is None


def test_a_step_slowed_by_another_process_lowers_the_cap_for_a_while_only() -> None:
    budget = PrefillBudget(1.0)
    budget.observe(*decode(0.05))
    for _ in range(20):
        budget.observe(*mixed(50, 0.1))  # 1 ms a token: cap 50
    assert budget.tokens(DECODES) == 50
    budget.observe(*mixed(50, 10.0))  # another process took the cores for a moment
    assert budget.tokens(DECODES) == 1  # the safe side: shorter steps
    budget.observe(*decode(0.05))  # the decode-only step a stale measurement asks for
    for _ in range(25):
        budget.observe(*mixed(50, 0.1))
    assert 45 <= (budget.tokens(DECODES) or 0) <= 50


def test_the_decode_step_time_follows_the_refreshes_where_prefill_runs_beside_every_step(
) -> None:
    """Nine refreshes span 288 steps: their median lags the streams' growing contexts (on a
    Zen 5, 29 ms against refreshes of 34-44), and one prompt token looked 10 ms dear."""
    budget = PrefillBudget(1.0)
    for _ in range(DECODE_WINDOW):
        budget.observe(*decode(0.030))
    for _ in range(4):
        for _ in range(REFRESH_STEPS):
            budget.observe(*mixed(10, 0.050))
        assert budget.tokens(DECODES) == DECODE_ONLY
        budget.observe(*decode(0.040))  # the streams' steps have grown
    # the 30 ms samples are more than MAX_AGE_STEPS older than the latest: left out
    assert (REFRESH_STEPS + 1) * 4 > MAX_AGE_STEPS
    assert budget.decode_s(DECODES) == pytest.approx(0.040)


def test_a_mixed_step_of_decodes_not_timed_alone_lately_teaches_nothing() -> None:
    budget = PrefillBudget(1.0)
    budget.observe(*decode(0.0305))
    budget.observe(*mixed(10, 0.0405))  # 1 ms a token
    # a ninth decode: its row would be charged to the prompt tokens against 8 decodes' time
    budget.observe(StepStats(10, 10, 9), 0.045)
    assert budget.per_token_s == pytest.approx(0.001)
    assert budget.tokens(9) == 30  # 8 decodes' time stands for 9 in the cap meanwhile
    for _ in range(REFRESH_STEPS + 1):
        budget.observe(*decode(0.0305))  # 8 decodes only: 9's would be stale anyway
    budget.observe(StepStats(9, 0, 9), 0.035)
    budget.observe(StepStats(10, 10, 9), 0.055)  # now charged: 2 ms a token
    assert budget.per_token_s > 0.001


def test_a_count_near_it_that_ran_alone_lately_stands_for_a_stale_one() -> None:
    """Where requests come and go every few steps the count of decodes changes most steps:
    a decode-only step for each count gone stale would keep prompts waiting."""
    budget = PrefillBudget(1.0)
    budget.observe(StepStats(60, 0, 60), 0.100)
    for _ in range(REFRESH_STEPS):
        budget.observe(StepStats(61, 50, 60), 0.150)
    assert budget.tokens(60) == DECODE_ONLY  # nothing near it ran alone lately
    budget.observe(StepStats(62, 0, 62), 0.104)
    assert budget.decode_s(60) == pytest.approx(0.104)  # the fresh neighbour's time
    assert all(budget.tokens(n) != DECODE_ONLY for n in (56, 60, 64))  # within an eighth
    for _ in range(REFRESH_STEPS):
        budget.observe(StepStats(63, 50, 62), 0.154)
    assert budget.tokens(60) == DECODE_ONLY


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_cap_keeps_up_with_the_prompt_tokens_arriving_per_second() -> None:
    clock = Clock()
    budget = PrefillBudget(0.5, clock=clock)
    budget.observe(*decode(0.05))
    budget.observe(*mixed(10, 0.07))  # 2 ms a token: the stall's cap is 12
    assert budget.limits(DECODES) == (12, 0)
    for _ in range(10):  # 200 tokens a second
        clock.now += 2.0
        budget.arrived(400)
    assert budget.arrival_rate() == pytest.approx(4000 / ARRIVAL_WINDOW_S)
    # what arrives during a decode step, KEEP_UP times over
    # the cap itself is the stall's; the floor what arrives during a decode step, twice
    assert budget.limits(DECODES) == (12, round(KEEP_UP * 200 * 0.05))
    clock.now += ARRIVAL_WINDOW_S  # no more arrivals
    assert budget.arrival_rate() == 0
    assert budget.limits(DECODES) == (12, 0)
    off = PrefillBudget(0.0, clock=clock)
    off.arrived(400)
    assert off.limits(DECODES) == (None, 0) and off.arrival_rate() == 0  # no cap, no floor


def run_closed_loop(arrival_tokens: int, interval_s: float, seconds: float
                    ) -> tuple[list[float], list[float]]:
    """8 streams on an engine whose decode steps take 50 ms and each prompt token beside them
    2 ms more, while a prompt of `arrival_tokens` arrives every `interval_s`: the engine's
    loop (scheduler and budget) on a made-up clock. Returns the mixed steps' seconds and the
    arrivals' waits for their first tokens, both over the second half of the run."""
    decode_s, per_token_s = 0.05, 0.002
    clock = Clock()
    budget = PrefillBudget(0.5, clock=clock)
    s = Scheduler(BackendCapacity(max_batch=32, max_seq_len=8192, max_tokens_per_step=512,
                                  block_size=16, num_blocks=4096))

    def add(rid: str, tokens: int, max_tokens: int) -> Request:
        req = Request(rid, [10] * tokens, SamplingParams(max_tokens=max_tokens),
                      frozenset({2}), 8192)
        s.add(req)
        budget.arrived(tokens)
        return req

    for i in range(8):
        add(f"s{i}", 128, 4000)
    arrivals = 0
    mixed_s, waits = [], []
    came: dict[str, float] = {}  # arrival waiting for its first token -> when it came
    while clock.now < seconds:
        if clock.now >= interval_s * (arrivals + 1):
            arrivals += 1
            came[add(f"p{arrivals}", arrival_tokens, 2).request_id] = clock.now
        out = s.schedule(*budget.limits(s.num_decoding()))
        stats = out.stats()
        step_s = (decode_s if stats.decode_seqs else 0.0) + per_token_s * stats.prompt_tokens
        clock.now += step_s
        for req in s.update(out, [7] * sum(c.sample for c in out.chunks)):
            if req.request_id in came and req.num_output_tokens == 1:
                at = came.pop(req.request_id)
                if at > seconds / 2:
                    waits.append(clock.now - at)
        budget.observe(stats, step_s)
        if stats.decode_seqs and stats.prompt_tokens and clock.now > seconds / 2:
            mixed_s.append(step_s)
    return mixed_s, waits


def test_the_keep_up_floor_does_not_feed_on_the_mixed_steps_it_lengthens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill takes four tenths of the machine (200 tokens a second at 2 ms a token). A floor
    counted in tokens per step grew with the steps it lengthened (on 2 Zen 3 cores, mixed
    steps of 3-4 decode steps); counted per second, a mixed step stays within
    (1 + KEEP_UP x 0.4) decode steps and the prompts keep up, where the stall's cap alone
    (12 tokens a step) leaves them to their first-token bounds."""
    mixed_s, waits = run_closed_loop(400, 2.0, 120.0)
    assert len(waits) >= 25
    assert max(mixed_s) <= (1 + KEEP_UP * 0.4) * 0.05 * 1.05
    assert max(waits) < 2.0  # each has its first token before the next arrives
    monkeypatch.setattr(prefill_budget, "KEEP_UP", 0.0)
    _, bound_only = run_closed_loop(400, 2.0, 120.0)
    assert min(bound_only) > 2.0


def test_a_light_load_is_prefilled_within_the_stall() -> None:
    mixed_s, waits = run_closed_loop(100, 2.0, 60.0)  # 50 tokens a second: a tenth
    assert max(mixed_s) <= 1.5 * 0.05 * 1.01
    assert waits and max(waits) < 1.0
