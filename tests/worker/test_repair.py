"""After a Redis outage the worker writes back what a failover lost (the promoted replica
lacked writes the old master had acknowledged): its events reach the gateway, toks:{model}:ID
is whole again, and a request whose hash or final event vanished is restored. The loss is
simulated on one Redis by removing exactly what the lost writes had written."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from common.protocol import ReplyEvent
from common.sampling_params import SamplingParams
from tests.worker.conftest import MODEL, FakeGateway, MakeService
from worker.service import WorkerService

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPT = [3, 1, 4, 1, 5]


def run_until(service: WorkerService, done: Callable[[], bool], steps: int = 200) -> None:
    for _ in range(steps):
        if done():
            service.settle()  # the failover a test then simulates came after every publish
            return
        service.run_once()
    raise AssertionError("the worker never got there")


def received(events: list[ReplyEvent]) -> dict[int, int]:
    """index -> token, as a gateway's relay keeps them (first copy wins)."""
    out: dict[int, int] = {}
    for e in events:
        if e.token_id >= 0:
            out.setdefault(e.index, e.token_id)
    return out


def lose_last_entries(gateway: FakeGateway, n: int) -> None:
    """The reply stream's last n entries never reached the replica."""
    stream = gateway.keys.replies(gateway.gateway_id)
    for entry_id, _ in gateway.client.xrevrange(stream, count=n):
        gateway.client.xdel(stream, entry_id)


@pytest.fixture
def reference(make_service: MakeService, gateway: FakeGateway) -> list[int]:
    service = make_service(stream_retention_s=60.0, worker_id="ref")
    gateway.enqueue("ref", PROMPT, GREEDY)
    run_until(service, lambda: gateway.finished("ref"))
    service.close()
    return [received(gateway.events("ref"))[i] for i in range(GREEDY.max_tokens)]


def test_tokens_and_events_a_failover_lost_are_sent_again(
        make_service: MakeService, gateway: FakeGateway, reference: list[int]) -> None:
    service = make_service(stream_retention_s=60.0)
    gateway.enqueue("r", PROMPT, GREEDY)
    k, toks = gateway.keys, gateway.keys.tokens(MODEL, "r")
    run_until(service, lambda: gateway.client.llen(toks) >= 6)
    gateway.client.ltrim(toks, 0, 1)  # the last steps' appends and events were lost
    lose_last_entries(gateway, 3)
    assert len(received(gateway.events("r"))) < 6
    service.queue.disrupted = True
    run_until(service, lambda: gateway.finished("r"))
    got = received(gateway.events("r"))
    assert [got[i] for i in range(len(reference))] == reference
    assert [int(t) for t in gateway.client.lrange(toks, 0, -1)] == reference
    assert gateway.retained("r") and not service.queue.disrupted
    assert gateway.client.hget(k.request(MODEL, "r"), "final")


def test_a_request_whose_enqueue_and_claim_were_lost_is_written_back(
        make_service: MakeService, gateway: FakeGateway, reference: list[int]) -> None:
    service = make_service(stream_retention_s=60.0)
    gateway.enqueue("r", PROMPT, GREEDY)
    k = gateway.keys
    run_until(service, lambda: gateway.client.llen(k.tokens(MODEL, "r")) >= 3)
    gateway.client.delete(*k.request_keys(MODEL, "r"), k.request_model("r"))
    gateway.client.zrem(k.leases(MODEL), "r")
    service.liveness.beat()  # the heartbeat finds the request gone before the repair runs
    service.queue.disrupted = True
    service.run_once()
    assert gateway.client.hget(k.request(MODEL, "r"), "worker") == "w1"
    assert gateway.client.zscore(k.leases(MODEL), "r") is not None
    assert gateway.client.get(k.request_model("r")) == MODEL
    assert service.active_ids == ["r"], "the repaired request was dropped"
    run_until(service, lambda: gateway.finished("r"))
    got = received(gateway.events("r"))
    assert [got[i] for i in range(len(reference))] == reference
    assert gateway.retained("r")


def test_a_lost_final_event_is_written_back(make_service: MakeService, gateway: FakeGateway,
                                            reference: list[int]) -> None:
    service = make_service(stream_retention_s=60.0)
    gateway.enqueue("r", PROMPT, GREEDY)
    k = gateway.keys
    run_until(service, lambda: gateway.finished("r"))
    # the last step (its tokens, the final event, the lease's removal) never replicated
    gateway.client.hdel(k.request(MODEL, "r"), "final")
    gateway.client.ltrim(k.tokens(MODEL, "r"), 0, 8)
    gateway.client.zadd(k.leases(MODEL), {"r": 1})
    lose_last_entries(gateway, 1)
    assert not gateway.finished("r")
    service.queue.disrupted = True
    service.run_once()
    assert gateway.finished("r") and gateway.retained("r")
    got = received(gateway.events("r"))
    assert [got[i] for i in range(len(reference))] == reference
    assert [int(t) for t in gateway.client.lrange(k.tokens(MODEL, "r"), 0, -1)] == reference


def test_nothing_is_written_when_nothing_was_lost(make_service: MakeService,
                                                  gateway: FakeGateway) -> None:
    service = make_service(stream_retention_s=60.0)
    gateway.enqueue("r", PROMPT, GREEDY)
    run_until(service, lambda: gateway.finished("r"))
    entries = len(gateway.entries())
    service.queue.disrupted = True
    service.run_once()
    assert len(gateway.entries()) == entries


def test_a_request_claimed_back_is_not_dropped_by_a_report_read_before(
        make_service: MakeService, gateway: FakeGateway, reference: list[int]) -> None:
    """A failover (or a lapsed registration) re-queues a request its worker still runs; the
    heartbeat reads it as no longer this worker's just before the worker claims it back:
    that stale report must not drop it (it would then sit leased and unrun until its lease
    expired)."""
    service = make_service(stream_retention_s=60.0)
    gateway.enqueue("r", PROMPT, GREEDY)
    k = gateway.keys
    run_until(service, lambda: gateway.client.llen(k.tokens(MODEL, "r")) >= 3)
    service.queue.requeue(["r"])  # what REAP does to a worker whose registration lapsed
    read_ms = int(gateway.client.time()[0]) * 1000 - 1
    assert service.queue.renew(["r"], read_ms) == ["r"]  # the heartbeat's read...
    service.run_once()  # ...then the worker claims it back, and goes on with it
    service.reports.lose(["r"], read_ms)  # the heartbeat delivers what it read before
    service.run_once()
    assert service.active_ids == ["r"]
    run_until(service, lambda: gateway.finished("r"))
    got = received(gateway.events("r"))
    assert [got[i] for i in range(len(reference))] == reference
