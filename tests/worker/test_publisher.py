"""A step's batch is published while the next step runs (worker.publisher): a publish Redis
refuses is found once the next step has run, and that step is never sent; a cancel flagged
while a publish is in flight ends its request within two steps, with no round trip of its
own; a worker killed with a publish in flight leaves a stream that another worker finishes
with every index exactly once."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import pytest
import redis

from common.sampling_params import SamplingParams
from tests.worker.test_service import GREEDY, LONG, MODEL, PROMPTS, reference, run_until
from worker.engine.engine import Engine
from worker.liveness import now_ms
from worker.redis_queue import StepBatch

if TYPE_CHECKING:
    from tests.worker.conftest import FakeGateway, MakeService


@pytest.fixture
def refusing_writes(redis_url: str) -> Iterator[redis.Redis]:
    """An admin connection to the test's Redis; `min-replicas-to-write` is reset after it
    (a Redis with it at 1 and no replica refuses every write: NOREPLICAS)."""
    admin = redis.Redis.from_url(redis_url)
    yield admin
    admin.config_set("min-replicas-to-write", 0)
    admin.close()


def test_a_refused_publish_drops_every_request_and_the_step_run_meanwhile_is_never_sent(
        make_service: MakeService, gateway: FakeGateway, engine: Engine,
        refusing_writes: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = reference(engine, PROMPTS[0], GREEDY)
    service = make_service(capacity=1)
    sent: list[StepBatch] = []
    publish = service.queue.publish

    def counted(batch: StepBatch, running: Sequence[str] = ()) -> set[str]:
        sent.append(batch)
        return publish(batch, running)

    monkeypatch.setattr(service.queue, "publish", counted)
    gateway.enqueue("r", PROMPTS[0], GREEDY)
    service.run_once()  # claimed; step 0 runs and its token is sent
    service.settle()
    refusing_writes.config_set("min-replicas-to-write", 1)
    service.run_once()  # step 1 runs; Redis refuses its publish meanwhile
    with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
        service.run_once()  # step 2 runs, then step 1's failure is found
    refusing_writes.config_set("min-replicas-to-write", 0)
    assert [b.tokens["r"] for b in sent] == [([expected[0]], 1), ([expected[1]], 2)]
    assert service.active_ids == [] and not engine.has_unfinished()
    assert "r" not in service.published.entries
    c, k = gateway.client, gateway.keys
    assert [e.index for e in gateway.events("r")] == [0]
    assert c.lrange(k.tokens(MODEL, "r"), 0, -1) == [str(expected[0])]
    assert c.zrange(k.leases(MODEL), 0, -1) == ["r"]  # still leased: REAP hands it on
    assert service.queue.reap(now_ms() + 60_000) == 1
    run_until(service, lambda: gateway.finished("r"))
    events = gateway.events("r")
    assert [e.index for e in events] == list(range(GREEDY.max_tokens))
    assert [e.token_id for e in events] == expected


def test_a_cancel_flagged_while_a_publish_is_in_flight_ends_the_request_within_two_steps(
        make_service: MakeService, gateway: FakeGateway,
        monkeypatch: pytest.MonkeyPatch) -> None:
    service = make_service(capacity=1)
    gateway.enqueue("long", PROMPTS[0], LONG)
    service.run_once()
    service.run_once()  # from here on, each publish reads the request's cancel flag
    asked: list[list[str]] = []
    cancelled = service.queue.cancelled
    monkeypatch.setattr(service.queue, "cancelled",
                        lambda ids: asked.append(list(ids)) or cancelled(ids))
    release, holding = threading.Event(), threading.Event()
    publish = service.queue.publish

    def held(batch: StepBatch, running: Sequence[str] = ()) -> set[str]:
        if not release.is_set():
            holding.set()
            release.wait(10)
        return publish(batch, running)

    monkeypatch.setattr(service.queue, "publish", held)
    service.run_once()
    assert holding.wait(10), "the step's publish was never sent"
    in_flight = service.publisher.in_flight
    assert in_flight is not None
    generated = in_flight.tokens["long"][1]
    assert gateway.cancel("long") == 2
    release.set()
    steps = 0
    while service.active_ids:
        assert steps < 2, "the request ran on past two steps after its cancel"
        service.run_once()
        steps += 1
    service.settle()
    last = gateway.events("long")[-1]
    assert (last.index, last.finish_reason) == (-1, "cancelled")
    assert generated <= last.completion_tokens <= generated + 2
    assert [ids for ids in asked if ids] == [], "a cancel check took a round trip of its own"
    assert gateway.retained("long")


@pytest.mark.parametrize("landed", [True, False], ids=["publish-landed", "publish-lost"])
def test_a_worker_killed_with_a_publish_in_flight_leaves_a_stream_finished_exactly(
        make_service: MakeService, gateway: FakeGateway, engine: Engine,
        monkeypatch: pytest.MonkeyPatch, landed: bool) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = reference(engine, PROMPTS[1], params)
    doomed = make_service(worker_id="doomed")
    gateway.enqueue("r", PROMPTS[1], params)
    for _ in range(5):
        doomed.run_once()
    doomed.settle()
    if not landed:  # the process dies before its last batch reaches Redis
        monkeypatch.setattr(doomed.queue, "publish",
                            lambda batch, running=(): set())
    doomed.run_once()
    assert doomed.publisher.wait(), "the last publish never ended"
    doomed.liveness.stop()  # killed: no beat, its engine state gone, its registration expires
    for rid in doomed.active_ids:
        engine.abort(rid)
    gateway.client.delete(gateway.keys.worker("doomed"))
    heir = make_service(worker_id="heir")
    heir.queue.reap(now_ms())  # what a live worker's heartbeat does within a beat
    run_until(heir, lambda: gateway.finished("r"))
    events = gateway.events("r")
    assert [e.index for e in events] == list(range(params.max_tokens))
    assert [e.token_id for e in events] == expected
    assert events[-1].finish_reason == "length"
