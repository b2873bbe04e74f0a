"""The scheduler alone: no device, no model; requests are plain token lists."""

from __future__ import annotations

import pytest

from common.sampling_params import SamplingParams
from worker.backends.base import BackendCapacity
from worker.engine.request import FinishReason, Request, RequestStatus
from worker.engine.scheduler import (
    FIRST_TOKEN_RATE,
    FIRST_TOKEN_STEPS,
    Scheduler,
    SchedulerOutput,
)

EOS = 2


def capacity(**overrides: int | bool) -> BackendCapacity:
    base: dict = {"max_batch": 4, "max_seq_len": 256, "max_tokens_per_step": 64,
                  "block_size": 4, "num_blocks": 64}
    base.update(overrides)
    return BackendCapacity(**base)


def request(rid: str, prompt_len: int, max_tokens: int = 8, **params: object) -> Request:
    return Request(rid, list(range(10, 10 + prompt_len)),
                   SamplingParams(max_tokens=max_tokens, **params), frozenset({EOS}), 256)


def run_step(s: Scheduler, token: int = 7, prefill_cap: int | None = None) -> SchedulerOutput:
    out = s.schedule(prefill_cap)
    s.update(out, [token] * sum(c.sample for c in out.chunks))
    return out


@pytest.fixture
def cap_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap without the first-token bound, which would set the pace of these tests' short
    prompts (a step for every FIRST_TOKEN_RATE tokens)."""
    monkeypatch.setattr(Scheduler, "_first_token_tokens", lambda self, awaiting: 0)


def test_new_requests_join_the_running_batch_between_decode_steps() -> None:
    s = Scheduler(capacity())
    s.add(request("a", 5))
    run_step(s)
    s.add(request("b", 3))
    out = run_step(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 3)]


def test_decodes_are_scheduled_before_prefill_and_long_prompts_are_chunked() -> None:
    s = Scheduler(capacity(max_tokens_per_step=16))
    s.add(request("a", 4))
    run_step(s)
    s.add(request("long", 40))
    shapes = []
    for _ in range(4):
        out = s.schedule()
        shapes.append([(c.request.request_id, c.num_tokens, c.sample) for c in out.chunks])
        s.update(out, [7] * sum(c.sample for c in out.chunks))
    assert shapes[0] == [("a", 1, True), ("long", 15, False)]
    assert shapes[1] == [("a", 1, True), ("long", 15, False)]
    assert shapes[2] == [("a", 1, True), ("long", 10, True)]
    assert shapes[3] == [("a", 1, True), ("long", 1, True)]


def test_finished_requests_leave_at_once_and_free_their_blocks() -> None:
    s = Scheduler(capacity())
    s.add(request("a", 5, max_tokens=2))
    free_before = s.blocks.num_free_blocks
    run_step(s)
    assert s.running and s.blocks.num_free_blocks < free_before
    run_step(s)
    assert not s.running and s.blocks.num_free_blocks == free_before


def test_eos_stops_unless_ignored_and_stop_token_ids_always_stop() -> None:
    s = Scheduler(capacity())
    eos, ignored, stop_id = request("eos", 3), request("ign", 3, ignore_eos=True), \
        request("stop", 3, stop_token_ids=(9,))
    for r in (eos, ignored, stop_id):
        s.add(r)
    out = s.schedule()
    s.update(out, [EOS, EOS, 9])
    assert eos.finish_reason == FinishReason.STOP
    assert ignored.status == RequestStatus.RUNNING
    assert stop_id.finish_reason == FinishReason.STOP


def test_max_tokens_and_context_end_with_length() -> None:
    s = Scheduler(capacity())
    short = request("short", 3, max_tokens=1)
    near_context = Request("ctx", list(range(10, 19)), SamplingParams(max_tokens=100),
                           frozenset(), max_len=10)
    s.add(short)
    s.add(near_context)
    run_step(s)
    assert short.finish_reason == FinishReason.LENGTH
    assert near_context.finish_reason == FinishReason.LENGTH
    assert near_context.num_tokens == 10


def test_batch_size_is_capped_and_waiting_requests_start_when_a_slot_frees() -> None:
    s = Scheduler(capacity(max_batch=2))
    for rid, n in (("a", 1), ("b", 5), ("c", 5)):
        s.add(request(rid, 3, max_tokens=n))
    out = run_step(s)
    assert {c.request.request_id for c in out.chunks} == {"a", "b"}
    out = run_step(s)
    assert {c.request.request_id for c in out.chunks} == {"b", "c"}


def test_full_kv_cache_preempts_the_newest_request_which_resumes_with_its_tokens() -> None:
    # 4 blocks of 4 tokens: two requests of 6 prompt tokens fit (2 blocks each) until they grow.
    s = Scheduler(capacity(num_blocks=4))
    a, b = request("a", 6, max_tokens=6), request("b", 6, max_tokens=6)
    s.add(a)
    s.add(b)
    for _ in range(3):  # prefill 6 tokens, then decode the 7th and 8th: 2 blocks each
        assert not run_step(s).preempted
    out = run_step(s)  # the 9th token needs a third block each: b, the newest, is preempted
    assert out.preempted == [b]
    assert b.status == RequestStatus.PREEMPTED and b.block_ids == []
    assert b.num_computed_tokens == 0 and b.num_output_tokens == 3
    while a.status == RequestStatus.RUNNING:
        run_step(s)
    out = run_step(s)
    assert out.chunks[0].request is b and out.chunks[0].num_tokens == 9  # prompt + its 3 tokens
    while s.has_unfinished():
        run_step(s)
    assert b.num_output_tokens == 6 and s.blocks.num_free_blocks == 4


def test_abort_frees_a_waiting_or_running_request() -> None:
    s = Scheduler(capacity(max_batch=1))
    a, b = request("a", 3), request("b", 3)
    s.add(a)
    s.add(b)
    run_step(s)
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    s.finish(b, RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished() and s.blocks.num_free_blocks == 64
    assert a.finish_reason == FinishReason.CANCELLED


def test_unmixed_backends_get_prefill_and_decode_in_separate_steps() -> None:
    s = Scheduler(capacity(mixed_batches=False, chunked_prefill=False))
    s.add(request("a", 3))
    run_step(s)
    s.add(request("b", 3))
    prefill = run_step(s)
    decode = run_step(s)
    assert [c.request.request_id for c in prefill.chunks] == ["b"]
    assert [c.request.request_id for c in decode.chunks] == ["a", "b"]


def test_prompt_over_the_budget_waits_when_the_backend_cannot_chunk() -> None:
    s = Scheduler(capacity(chunked_prefill=False, max_tokens_per_step=8))
    s.add(request("a", 9))
    assert s.schedule().chunks == []


def shared(rid: str, prefix_len: int, own: list[int], max_tokens: int = 8) -> Request:
    return Request(rid, list(range(10, 10 + prefix_len)) + own,
                   SamplingParams(max_tokens=max_tokens), frozenset({EOS}), 256)


def test_a_cached_prefix_is_skipped_and_only_the_rest_is_prefilled() -> None:
    s = Scheduler(capacity(prefix_caching=True))
    s.add(shared("a", 16, [90, 91], max_tokens=1))
    run_step(s)
    b = shared("b", 16, [80, 81, 82])
    s.add(b)
    out = run_step(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("b", 3)]
    assert b.num_cached_tokens == 16 and b.num_computed_tokens == 19
    assert s.stats.prompt_tokens == 18 + 19 and s.stats.cached_tokens == 16


def test_a_cached_prefix_is_chunked_after_like_any_prompt() -> None:
    s = Scheduler(capacity(prefix_caching=True, max_tokens_per_step=8))
    s.add(shared("a", 16, [], max_tokens=1))
    while s.has_unfinished():
        run_step(s)
    s.add(shared("b", 12, list(range(40, 52))))  # 12 of its 24 tokens cached
    shapes = []
    for _ in range(2):
        out = s.schedule()
        shapes.append([(c.request.request_id, c.num_tokens, c.sample) for c in out.chunks])
        s.update(out, [7] * sum(c.sample for c in out.chunks))
    assert shapes == [[("b", 8, False)], [("b", 4, True)]]


def test_a_preempted_request_resumes_after_its_still_cached_blocks() -> None:
    s = Scheduler(capacity(prefix_caching=True, num_blocks=4))
    a = request("a", 6, max_tokens=6)
    b = Request("b", list(range(100, 106)), SamplingParams(max_tokens=6), frozenset(), 256)
    s.add(a)
    s.add(b)
    for _ in range(3):
        run_step(s)
    out = run_step(s)  # a's 9th token needs a third block: b is preempted
    assert out.preempted == [b] and b.num_tokens == 9
    cached_before = s.stats.cached_tokens
    while a.status == RequestStatus.RUNNING:
        run_step(s)
    out = run_step(s)
    # b's two full blocks were cached; a's third block took the second (a prefix's tail is
    # evicted first), so b resumes after its first block
    assert out.chunks[0].request is b and out.chunks[0].num_tokens == 5
    assert s.stats.cached_tokens - cached_before == 4
    while s.has_unfinished():
        run_step(s)
    assert b.num_output_tokens == 6 and s.blocks.num_free_blocks == 4


def test_unmixed_backends_admit_a_cached_prefix_too() -> None:
    s = Scheduler(capacity(prefix_caching=True, mixed_batches=False, chunked_prefill=False,
                           max_tokens_per_step=8))
    s.add(shared("a", 8, [90], max_tokens=1))  # 9 tokens do not fit a step of 8
    assert s.schedule().chunks == []
    s2 = Scheduler(capacity(prefix_caching=True, mixed_batches=False, chunked_prefill=False,
                            max_tokens_per_step=9))
    s2.add(shared("a", 8, [90], max_tokens=1))
    run_step(s2)
    s2.add(shared("b", 8, [91, 92, 93, 94, 95, 96, 97, 98]))  # 16 tokens, 8 of them cached
    out = run_step(s2)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("b", 8)]


def chunk_shapes(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(c.request.request_id, c.num_tokens) for c in out.chunks]


def test_while_requests_decode_a_steps_prefill_is_cut_to_the_cap() -> None:
    s = Scheduler(capacity())
    s.add(request("a", 4, max_tokens=50))
    run_step(s)
    s.add(request("long", 40))
    out = s.schedule(prefill_cap=8)
    assert chunk_shapes(out) == [("a", 1), ("long", 8)]


def test_without_running_decodes_prefill_takes_the_whole_budget_whatever_the_cap() -> None:
    s = Scheduler(capacity())
    s.add(request("long", 100))
    assert chunk_shapes(s.schedule(prefill_cap=8)) == [("long", 64)]


@pytest.mark.usefixtures("cap_alone")
def test_the_cap_covers_running_prompts_and_admissions_together() -> None:
    s = Scheduler(capacity())
    s.add(request("a", 4, max_tokens=50))
    s.add(request("d", 4, max_tokens=50))
    run_step(s)
    s.add(request("b", 14))
    out = s.schedule(prefill_cap=8)
    s.update(out, [7, 7])
    assert chunk_shapes(out) == [("a", 1), ("d", 1), ("b", 8)]
    s.add(request("c", 20))
    assert chunk_shapes(s.schedule(prefill_cap=10)) == [("a", 1), ("d", 1), ("b", 6), ("c", 4)]


def decoding(max_batch: int, *rids: str) -> Scheduler:
    """A scheduler whose requests `rids` have each had a token: they decode next."""
    s = Scheduler(capacity(max_batch=max_batch))
    for rid in rids:
        s.add(request(rid, 4, max_tokens=50))
    run_step(s)
    return s


@pytest.mark.usefixtures("cap_alone")
def test_the_cap_lifts_while_more_requests_await_prefill_than_decode() -> None:
    burst = decoding(4, "a")
    for rid in ("b", "c"):
        burst.add(request(rid, 20))
    assert chunk_shapes(burst.schedule(prefill_cap=8)) == [("a", 1), ("b", 20), ("c", 20)]
    even = decoding(4, "a", "b")
    for rid in ("c", "d"):
        even.add(request(rid, 20))
    assert chunk_shapes(even.schedule(prefill_cap=8)) == [("a", 1), ("b", 1), ("c", 8)]


@pytest.mark.usefixtures("cap_alone")
def test_requests_that_arrived_before_the_streams_began_prefill_outside_the_cap() -> None:
    """A batch arriving together is not held back by its own first streams; whoever arrives
    after a stream's first token is capped, after the earlier arrivals' prefill."""
    s = Scheduler(capacity(max_batch=4, max_tokens_per_step=16))
    for rid, n in (("a", 4), ("b", 4), ("c", 30)):
        s.add(request(rid, n, max_tokens=50))
    assert chunk_shapes(run_step(s, prefill_cap=2)) == [("a", 4), ("b", 4), ("c", 8)]
    assert chunk_shapes(run_step(s, prefill_cap=2)) == [("a", 1), ("b", 1), ("c", 14)]
    s.add(request("d", 20))
    assert chunk_shapes(run_step(s, prefill_cap=2)) == [("a", 1), ("b", 1), ("c", 8)]
    assert chunk_shapes(run_step(s, prefill_cap=2)) == [("a", 1), ("b", 1), ("c", 1), ("d", 2)]


def test_requests_the_batch_has_no_room_for_do_not_lift_the_cap() -> None:
    s = decoding(3, "a", "b")
    for rid in ("c", "d", "e"):
        s.add(request(rid, 20))
    assert chunk_shapes(s.schedule(prefill_cap=8)) == [("a", 1), ("b", 1), ("c", 8)]


@pytest.mark.parametrize(("cap", "chunks"), [(0, [4] * 10 + [2]), (3, [3] * 14), (1, [1] * 42)])
@pytest.mark.usefixtures("cap_alone")
def test_a_cap_prefills_that_many_tokens_a_step_and_0_one_kv_block_until_the_prompt_ends(
        cap: int, chunks: list[int]) -> None:
    s = Scheduler(capacity())  # blocks of 4 tokens
    s.add(request("a", 4, max_tokens=100))
    run_step(s)
    long = request("long", 42, max_tokens=2)
    s.add(long)
    prefilled = []
    while long.num_output_tokens == 0:
        out = run_step(s, prefill_cap=cap)
        assert ("a", 1) in chunk_shapes(out)
        prefilled += [c.num_tokens for c in out.chunks if c.request is long]
    assert prefilled == chunks


def test_a_capped_prompt_has_its_first_token_within_a_step_for_every_first_token_rate_tokens(
) -> None:
    """The cap rises to each awaiting prompt's remainder over the steps its bound leaves, so
    that prompts arriving faster than the cap prefills them do not queue without end."""
    s = Scheduler(capacity(max_batch=8, max_tokens_per_step=512, num_blocks=256))
    for rid in ("a", "z"):  # as many decoding as will await prefill: the cap holds
        s.add(request(rid, 4, max_tokens=200))
    run_step(s)
    alone = request("alone", 4 * FIRST_TOKEN_RATE, max_tokens=2)
    s.add(alone)
    chunks = []
    while alone.num_output_tokens == 0:
        out = run_step(s, prefill_cap=1)
        chunks += [c.num_tokens for c in out.chunks if c.request is alone]
    assert chunks == [FIRST_TOKEN_RATE] * 4  # not the cap's one token a step
    together = [request(rid, 4 * FIRST_TOKEN_RATE, max_tokens=2) for rid in ("b", "c")]
    for req in together:
        s.add(req)
    for _ in range(4):
        out = run_step(s, prefill_cap=1)
        assert out.num_tokens <= 2 + 2 * FIRST_TOKEN_RATE + 1  # the decodes, both shares
    assert all(r.num_output_tokens for r in together)


def test_a_long_prompts_first_token_bound_is_first_token_steps() -> None:
    s = Scheduler(capacity(max_batch=8, max_seq_len=4096, max_tokens_per_step=512,
                           num_blocks=1024))
    for rid in ("a", "z"):
        s.add(request(rid, 4, max_tokens=200))
    run_step(s)
    tokens = 2 * FIRST_TOKEN_RATE * FIRST_TOKEN_STEPS  # twice what the rate would allow for
    long = Request("long", list(range(10, 10 + tokens)), SamplingParams(max_tokens=2),
                   frozenset({EOS}), 4096)
    s.add(long)
    steps = 0
    while long.num_output_tokens == 0:
        run_step(s, prefill_cap=1)
        steps += 1
    assert steps == FIRST_TOKEN_STEPS


def test_a_capped_step_stays_within_the_backends_one_call_step() -> None:
    """Rows a one-call step has left beside the decodes bound a capped prefill when a block
    fits there; otherwise (or uncapped) the cap and budget alone do."""
    s = Scheduler(capacity(one_call_tokens=10))
    s.add(request("a", 4, max_tokens=50))
    s.add(request("b", 4, max_tokens=50))
    run_step(s)
    s.add(request("long", 40))
    assert chunk_shapes(s.schedule(prefill_cap=30)) == [("a", 1), ("b", 1), ("long", 8)]
    assert chunk_shapes(s.schedule(prefill_cap=None)) == [("a", 1), ("b", 1), ("long", 40)]
    tight = Scheduler(capacity(one_call_tokens=5))  # 3 rows left: less than a block of 4
    tight.add(request("a", 4, max_tokens=50))
    tight.add(request("b", 4, max_tokens=50))
    run_step(tight)
    tight.add(request("long", 40))
    assert chunk_shapes(tight.schedule(prefill_cap=30)) == [("a", 1), ("b", 1), ("long", 30)]


def test_backends_that_cannot_chunk_prompts_ignore_the_cap() -> None:
    s = Scheduler(capacity(chunked_prefill=False))
    s.add(request("a", 4, max_tokens=50))
    run_step(s)
    s.add(request("b", 30))
    assert chunk_shapes(s.schedule(prefill_cap=0)) == [("a", 1), ("b", 30)]


@pytest.mark.usefixtures("cap_alone")
def test_preemption_and_resumption_work_under_the_cap() -> None:
    # 6 blocks of 4 tokens: "a" grows to 4 blocks, "b" (12 prompt tokens, prefilled a block
    # a step beside a's decodes) needs 4 too, so b, the newest, is preempted and recomputed.
    s = Scheduler(capacity(num_blocks=6))
    a = request("a", 6, max_tokens=10, ignore_eos=True)
    b = request("b", 12, max_tokens=4, ignore_eos=True)
    s.add(a)
    run_step(s)
    s.add(b)
    preempted = False
    while s.has_unfinished():
        decoding = a.status == RequestStatus.RUNNING and a.num_output_tokens > 0
        out = run_step(s, prefill_cap=1)
        preempted = preempted or b in out.preempted
        if decoding and a.status == RequestStatus.RUNNING:
            assert out.stats().prompt_tokens <= 4
    assert preempted and b.num_preemptions >= 1
    assert a.num_output_tokens == 10 and b.num_output_tokens == 4
    assert s.blocks.num_free_blocks == 6
