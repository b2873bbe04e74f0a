"""The worker's Redis operations against a real Redis, without a model."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import redis

from common.capabilities import FIELD_BITS
from common.config import RedisConfig
from common.protocol import ReplyEvent
from common.sampling_params import SamplingParams
from worker.redis_queue import RedisQueue, StepBatch

if TYPE_CHECKING:
    from tests.worker.conftest import FakeGateway

MODEL = "tiny"
P = SamplingParams(max_tokens=4, temperature=0.0)
ANY = {"max_len": 1 << 30, "room": 1 << 30}
"""claim() limits that let every request through."""


@pytest.fixture
def queue(redis_url: str) -> Iterator[RedisQueue]:
    q = RedisQueue.connect(RedisConfig(url=redis_url), MODEL, "w1", lease_ms=10_000)
    q.register({"model": MODEL}, ttl_s=600, now_ms=0)  # a live worker: REAP spares its leases
    yield q
    q.close()


def test_claim_takes_the_highest_priority_first_then_the_oldest_and_leases_them(
        queue: RedisQueue, gateway: FakeGateway) -> None:
    gateway.enqueue("old", [1], P, priority=1, enqueue_ms=1000)
    gateway.enqueue("new", [2], P, priority=1, enqueue_ms=2000)
    gateway.enqueue("urgent", [3], P, priority=5, enqueue_ms=3000)
    claimed = queue.claim(2, now_ms=5000, **ANY)
    assert [c.request_id for c in claimed] == ["urgent", "old"]
    assert claimed[0].fields["prompt"] == "[3]" and claimed[0].published == []
    leases = gateway.client.zrange(queue.keys.leases(MODEL), 0, -1, withscores=True)
    assert leases == [("old", 15000.0), ("urgent", 15000.0)]
    assert gateway.client.hget(queue.keys.request(MODEL, "old"), "worker") == "w1"
    assert gateway.client.zrange(queue.keys.queue(MODEL), 0, -1) == ["new"]


def test_claim_leaves_requests_longer_than_the_workers_context_queued_for_another(
        queue: RedisQueue, gateway: FakeGateway) -> None:
    gateway.enqueue("long", list(range(20)), P, priority=5)  # 20 + 4 tokens
    gateway.enqueue("short", [1, 2], P)
    claimed = queue.claim(2, now_ms=time.time_ns() // 10**6, max_len=23, room=1000)
    assert [c.request_id for c in claimed] == ["short"]
    assert gateway.client.zrange(queue.keys.queue(MODEL), 0, -1) == ["long"]
    assert [c.request_id for c in queue.claim(1, now_ms=time.time_ns() // 10**6,
                                              max_len=24, room=1000)] == ["long"]


def test_claim_takes_only_what_fits_the_free_kv_room_and_never_overtakes(
        queue: RedisQueue, gateway: FakeGateway) -> None:
    gateway.enqueue("a", list(range(10)), P, priority=3)  # needs 10 + 1
    gateway.enqueue("b", list(range(30)), P, priority=2, published=[5, 6])  # 30 + 2 + 1
    gateway.enqueue("c", [1], P, priority=1)
    now = time.time_ns() // 10**6
    assert [c.request_id for c in queue.claim(3, now_ms=now, max_len=100, room=40)] == ["a"]
    assert gateway.client.zrange(queue.keys.queue(MODEL), 0, -1, desc=True) == ["b", "c"]
    assert [c.request_id for c in queue.claim(3, now_ms=now, max_len=100, room=35)] == [
        "b", "c"]


def test_claim_leaves_requests_asking_for_what_the_backend_lacks_queued(
        queue: RedisQueue, gateway: FakeGateway) -> None:
    gateway.enqueue("lp", [1], SamplingParams(max_tokens=4, temperature=0.0, logprobs=True),
                    priority=1)
    gateway.enqueue("plain", [1], P)
    now = time.time_ns() // 10**6
    lacks = FIELD_BITS["logprobs"] | FIELD_BITS["seed"]
    assert [c.request_id for c in queue.claim(2, now_ms=now, lacks=lacks, **ANY)] == ["plain"]
    assert [c.request_id for c in queue.claim(2, now_ms=now, **ANY)] == ["lp"]


def test_claim_returns_the_tokens_an_earlier_worker_published(
        queue: RedisQueue, gateway: FakeGateway) -> None:
    gateway.enqueue("r", [1, 2], P, published=[7, 8, 9])
    assert queue.claim(1, now_ms=time.time_ns() // 10**6, **ANY)[0].published == [7, 8, 9]


def test_cancelled_reports_only_flagged_requests(queue: RedisQueue, gateway: FakeGateway) -> None:
    gateway.enqueue("a", [1], P)
    gateway.enqueue("b", [1], P)
    queue.claim(2, now_ms=time.time_ns() // 10**6, **ANY)
    assert gateway.cancel("b") == 2
    assert queue.cancelled(["a", "b"]) == {"b"}
    assert queue.cancelled([]) == set()


def _batch() -> StepBatch:
    batch = StepBatch()
    batch.add("gw1", ReplyEvent("a", 0, 11))
    batch.add("gw2", ReplyEvent("b", 3, 12, finish_reason="stop"))
    batch.tokens["a"] = ([11], 1)
    batch.tokens["b"] = ([12], 4)
    batch.finished.append("b")
    return batch


def test_publish_writes_one_entry_per_gateway_appends_tokens_and_removes_finished(
        queue: RedisQueue, gateway: FakeGateway) -> None:
    gateway.enqueue("a", [1], P)
    gateway.enqueue("b", [1], P)
    queue.claim(2, now_ms=time.time_ns() // 10**6, **ANY)
    queue.publish(_batch())
    assert [[e.token_id for e in entry] for entry in gateway.entries()] == [[11]]
    k, c = queue.keys, gateway.client
    assert len(c.xrange(k.replies("gw2"))) == 1
    assert c.lrange(k.tokens(MODEL, "a"), 0, -1) == ["11"]
    assert not c.exists(k.request(MODEL, "b"), k.tokens(MODEL, "b"))
    assert c.zrange(k.leases(MODEL), 0, -1) == ["a"]


def test_publish_reads_the_running_requests_cancel_flags_in_the_same_round_trip(
        queue: RedisQueue, gateway: FakeGateway) -> None:
    gateway.enqueue("a", [1], P)
    gateway.enqueue("b", [1], P)
    queue.claim(2, now_ms=time.time_ns() // 10**6, **ANY)
    assert gateway.cancel("b") == 2
    assert queue.publish(_batch(), ["a"]) == set()
    assert queue.publish(StepBatch(), ["a", "c"]) == set()
    assert gateway.cancel("a") == 2
    assert queue.publish(StepBatch(), ["a"]) == {"a"}
    assert queue.publish(StepBatch()) == set()


def test_publishing_a_batch_twice_does_not_duplicate_resume_tokens(
        queue: RedisQueue, gateway: FakeGateway) -> None:
    queue.publish(_batch())
    queue.publish(_batch())
    assert gateway.client.lrange(queue.keys.tokens(MODEL, "a"), 0, -1) == ["11"]


def test_renew_extends_own_leases_and_reports_requests_no_longer_ours(
        queue: RedisQueue, gateway: FakeGateway) -> None:
    for rid in ("mine", "stolen", "gone"):
        gateway.enqueue(rid, [1], P)
    queue.claim(3, now_ms=1000, **ANY)
    c, k = gateway.client, queue.keys
    c.hset(k.request(MODEL, "stolen"), "worker", "w2")
    c.delete(k.request(MODEL, "gone"))
    # a request whose hash vanished is not another worker's: Redis lost it, and the worker
    # writes it back (tests/worker/test_repair.py)
    assert queue.renew(["mine", "stolen", "gone"], now_ms=50_000) == ["stolen"]
    assert queue.disrupted
    assert c.zscore(k.leases(MODEL), "mine") == 60_000
    assert c.zscore(k.leases(MODEL), "stolen") == 11_000


def test_reap_requeues_expired_leases_with_their_original_score(
        queue: RedisQueue, gateway: FakeGateway) -> None:
    gateway.enqueue("r", [1], P, priority=2, enqueue_ms=1000)
    score = gateway.client.zscore(queue.keys.queue(MODEL), "r")
    queue.claim(1, now_ms=1000, **ANY)
    assert queue.reap(now_ms=5000) == 0
    assert queue.reap(now_ms=20_000) == 1
    assert gateway.client.zscore(queue.keys.queue(MODEL), "r") == score
    assert gateway.client.zcard(queue.keys.leases(MODEL)) == 0


def test_reap_requeues_the_requests_of_a_worker_whose_registration_expired(
        queue: RedisQueue, gateway: FakeGateway) -> None:
    """A dead worker's requests go back as soon as its registration is gone, long before
    their leases would expire; a live worker's stay leased."""
    gateway.enqueue("mine", [1], P, enqueue_ms=1000)
    gateway.enqueue("theirs", [2], P, enqueue_ms=2000)
    queue.claim(1, now_ms=1000, **ANY)
    dead = RedisQueue(queue.client, queue.keys, MODEL, "w2", lease_ms=10_000)
    dead.register({"model": MODEL}, ttl_s=600, now_ms=0)
    dead.claim(1, now_ms=1000, **ANY)
    assert queue.reap(now_ms=2000) == 0
    gateway.client.delete(queue.keys.worker("w2"))  # its registration expired
    assert queue.reap(now_ms=2000) == 1
    assert gateway.client.zrange(queue.keys.queue(MODEL), 0, -1) == ["theirs"]
    assert gateway.client.zrange(queue.keys.leases(MODEL), 0, -1) == ["mine"]


def test_one_worker_reaps_per_turn(queue: RedisQueue, gateway: FakeGateway) -> None:
    """With a turn, a heartbeat's reap is done by whichever worker of the model comes first;
    the others skip it until the turn is over."""
    other = RedisQueue(queue.client, queue.keys, MODEL, "w2", lease_ms=10_000)
    gateway.enqueue("r", [1], P)
    queue.claim(1, now_ms=1000, **ANY)
    assert other.reap(now_ms=20_000, turn_ms=300) == 1
    queue.claim(1, now_ms=1000, **ANY)
    assert queue.reap(now_ms=20_000, turn_ms=300) == 0  # not its turn yet
    time.sleep(0.35)
    assert queue.reap(now_ms=20_000, turn_ms=300) == 1


def test_a_claim_looks_past_a_head_it_cannot_run(queue: RedisQueue,
                                                  gateway: FakeGateway) -> None:
    """The first window of candidates (4n + 4) holds only requests too long for this
    worker: the claim reads on, up to CLAIM_SCAN, and takes the first that fits."""
    for i in range(10):
        gateway.enqueue(f"long{i}", list(range(30)), P, priority=5)
    gateway.enqueue("short", [1], P, priority=1)
    claimed = queue.claim(1, now_ms=time.time_ns() // 10**6, max_len=20, room=1000)
    assert [c.request_id for c in claimed] == ["short"]
    assert gateway.client.zcard(queue.keys.queue(MODEL)) == 10


def test_a_claim_does_not_overtake_a_request_that_does_not_fit_the_room(
        queue: RedisQueue, gateway: FakeGateway) -> None:
    for i in range(8):  # past the first window: too long for this worker (ctx 64)
        gateway.enqueue(f"unfit{i}", list(range(60)), P, priority=5)
    gateway.enqueue("big", list(range(50)), P, priority=3)
    gateway.enqueue("small", [1], P, priority=1)
    claimed = queue.claim(1, now_ms=time.time_ns() // 10**6, max_len=60, room=10)
    assert claimed == []  # "big" waits for room; "small" does not jump it
    assert [c.request_id for c in queue.claim(
        1, now_ms=time.time_ns() // 10**6, max_len=60, room=100)] == ["big"]


def test_requeue_hands_requests_back(queue: RedisQueue, gateway: FakeGateway) -> None:
    gateway.enqueue("r", [1], P)
    queue.claim(1, now_ms=time.time_ns() // 10**6, **ANY)
    assert queue.requeue(["r"]) == 1
    assert gateway.client.zrange(queue.keys.queue(MODEL), 0, -1) == ["r"]
    assert not gateway.client.hexists(queue.keys.request(MODEL, "r"), "worker")


def test_register_sets_a_ttl_and_unregister_removes_everything(
        queue: RedisQueue, gateway: FakeGateway) -> None:
    queue.register({"model": MODEL, "running": "0"}, ttl_s=6, now_ms=1234)
    c, k = gateway.client, queue.keys
    assert c.hgetall(k.worker("w1")) == {"model": MODEL, "running": "0"}
    assert 0 < c.ttl(k.worker("w1")) <= 6
    assert c.zscore(k.workers(), "w1") == 1234
    queue.unregister()
    assert not c.exists(k.worker("w1")) and c.zscore(k.workers(), "w1") is None


def test_model_info_is_written_once_per_sha(queue: RedisQueue, gateway: FakeGateway) -> None:
    info = {"file:tokenizer.json": "{}", "max_len": "8", "sha": "abc"}
    assert queue.ensure_model_info(info)
    assert not queue.ensure_model_info(info)
    assert queue.ensure_model_info({"max_len": "9", "sha": "def"})
    assert gateway.client.hgetall(queue.keys.model(MODEL)) == {"max_len": "9", "sha": "def"}


def test_wait_for_work_returns_on_an_enqueue_nudge_and_times_out_without_one(
        queue: RedisQueue, gateway: FakeGateway) -> None:
    gateway.enqueue("r", [1], P)
    assert queue.wait_for_work(0.5)
    start = time.monotonic()
    assert not queue.wait_for_work(0.2)
    assert time.monotonic() - start < 2


def test_connection_errors_are_retried_with_logging_then_raised(
        caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = RedisQueue.connect(RedisConfig(url=f"redis://127.0.0.1:{port}/0"), MODEL, "w1",
                           lease_ms=1000)
    with caplog.at_level(logging.WARNING), pytest.raises(redis.ConnectionError):
        q.claim(1, now_ms=0, **ANY)
    assert any("redis claim failed" in r.getMessage() for r in caplog.records)
