"""Enqueue and cancel through the shared Lua scripts, against a real Redis."""

from __future__ import annotations

import socket
import time

import pytest
import redis.asyncio as aioredis

from common.errors import AlreadyExistsError, ErrorCode, ResourceExhaustedError, UnavailableError
from common.keys import PRIORITY_SCALE, Keys
from common.protocol import ORPHANED, QueuedRequest, ReplyEvent, decode_events, encode_events
from common.redis_credentials import redact
from common.sampling_params import SamplingParams
from gateway.redis_queue import QueueStats, RedisQueue, connect

pytestmark = pytest.mark.anyio
KEYS = Keys()


def request(rid: str, priority: int = 0, enqueue_ms: int = 1_000, model: str = "m"
            ) -> QueuedRequest:
    return QueuedRequest(rid, model, "gw", [1, 2, 3], SamplingParams(max_tokens=5),
                         priority=priority, enqueue_ms=enqueue_ms, deadline_ms=9_000)


async def test_enqueue_orders_by_priority_then_fifo_and_stores_the_request(
        r: aioredis.Redis, redis_url: str) -> None:
    queue = RedisQueue(r, KEYS, redis_url, request_ttl_s=60)
    await queue.enqueue(request("old", 1, 1_000), 10)
    await queue.enqueue(request("new", 1, 2_000), 10)
    await queue.enqueue(request("urgent", 7, 3_000), 10)
    await queue.enqueue(request("low", 0, 500), 10)
    order = [rid for rid, _ in await r.zrevrange(KEYS.queue("m"), 0, -1, withscores=True)]
    assert order == ["urgent", "old", "new", "low"]
    assert await r.zscore(KEYS.queue("m"), "urgent") == 7 * PRIORITY_SCALE - 3_000
    stored = QueuedRequest.from_fields(await r.hgetall(KEYS.request("m", "old")))
    assert stored == request("old", 1, 1_000)
    assert 0 < await r.ttl(KEYS.request("m", "old")) <= 60
    assert await r.llen(KEYS.wake("m")) == 4


async def test_a_full_queue_and_a_duplicate_id_are_refused(
        r: aioredis.Redis, redis_url: str) -> None:
    queue = RedisQueue(r, KEYS, redis_url)
    await queue.enqueue(request("a"), 2)
    with pytest.raises(AlreadyExistsError, match="request_id 'a' is already in flight"):
        await queue.enqueue(request("a"), 2)
    await queue.enqueue(request("b"), 2)
    with pytest.raises(ResourceExhaustedError,
                       match=r"queue of model 'm' is full \(--max-queued 2: "):
        await queue.enqueue(request("c"), 2)
    stats = await queue.queue_stats(["m", "other"])
    assert (stats["m"].depth, stats["other"].depth) == (2, 0)


async def test_queue_stats_find_the_oldest_waiter_whatever_its_priority(
        r: aioredis.Redis, redis_url: str) -> None:
    queue = RedisQueue(r, KEYS, redis_url)
    await queue.enqueue(request("new-urgent", 9, 5_000), 10)
    await queue.enqueue(request("old-low", 0, 2_000), 10)
    await queue.enqueue(request("older-mid", 4, 1_500), 10)
    await queue.enqueue(request("newest-low", 0, 7_000), 10)
    await r.zadd(KEYS.leases("m"), {"claimed": 99_999})
    stats = await queue.queue_stats(["m", "empty"])
    assert stats["m"] == QueueStats(depth=4, leased=1, oldest_enqueue_ms=1_500)
    assert stats["empty"] == QueueStats(depth=0, leased=0, oldest_enqueue_ms=None)


async def test_cancel_by_id_dequeues_and_tells_the_owning_gateway_or_flags_a_running_one(
        r: aioredis.Redis, redis_url: str) -> None:
    queue = RedisQueue(r, KEYS, redis_url)
    await queue.enqueue(request("queued"), 10)
    await queue.enqueue(request("running"), 10)
    await r.zrem(KEYS.queue("m"), "running")  # what a worker's claim does
    assert await queue.cancel_by_id("queued") is True
    assert not await r.exists(KEYS.request("m", "queued"))
    [(_, fields)] = await r.xrange(KEYS.replies("gw"))
    [final] = decode_events(fields["e"])
    assert (final.request_id, final.index, final.finish_reason) == ("queued", -1, "cancelled")
    assert await queue.cancel_by_id("running") is True
    assert await r.exists(KEYS.cancel("m", "running"))
    assert await queue.cancel_by_id("never-seen") is False
    assert await r.xlen(KEYS.replies("gw")) == 1


async def finish(r: aioredis.Redis, rid: str, reason: str, tokens: list[int]) -> None:
    """What a worker's publish keeps of a finished request: its tokens and final event, for
    the retention, and no lease."""
    await r.zrem(KEYS.queue("m"), rid)
    await r.hset(KEYS.request("m", rid), mapping={"worker": "w1", "final": encode_events([
        ReplyEvent(rid, -1, finish_reason=reason, code=ErrorCode.UNAVAILABLE,
                   completion_tokens=len(tokens))])})
    await r.rpush(KEYS.tokens("m", rid), *tokens)
    for key in (KEYS.request("m", rid), KEYS.tokens("m", rid), KEYS.request_model(rid)):
        await r.expire(key, 60)


async def test_adopting_an_orphaned_request_queues_it_again_from_its_tokens(
        r: aioredis.Redis, redis_url: str) -> None:
    """Its worker stopped it because its gateway's registration lapsed: a resume puts it
    back in the queue with its place (score), its tokens kept, its keys living as long as a
    new request's; a request that ended otherwise is only read."""
    queue = RedisQueue(r, KEYS, redis_url, request_ttl_s=3600)
    await queue.enqueue(request("orphan"), 10)
    score = await r.zscore(KEYS.queue("m"), "orphan")
    await finish(r, "orphan", ORPHANED, [7, 8, 9])
    await queue.enqueue(request("done"), 10)
    await finish(r, "done", "length", [4, 5])

    adopted = await queue.adopt("orphan", "gw2")
    assert adopted is not None and adopted.revived and adopted.final is None
    assert adopted.tokens == [7, 8, 9] and adopted.request.gateway_id == "gw2"
    assert await r.zscore(KEYS.queue("m"), "orphan") == score
    assert await r.llen(KEYS.wake("m")) >= 1
    fields = await r.hgetall(KEYS.request("m", "orphan"))
    assert "final" not in fields and "worker" not in fields
    for key in (KEYS.request("m", "orphan"), KEYS.tokens("m", "orphan"),
                KEYS.request_model("orphan")):
        assert await r.ttl(key) > 3000, key
    again = await queue.adopt("orphan", "gw3")  # queued now: only its gateway moves
    assert again is not None and not again.revived and again.request.gateway_id == "gw3"

    done = await queue.adopt("done", "gw2")
    assert done is not None and not done.revived and done.final is not None
    assert done.final.finish_reason == "length" and done.tokens == [4, 5]
    assert await r.zscore(KEYS.queue("m"), "done") is None
    assert await r.ttl(KEYS.request("m", "done")) <= 60
    assert await queue.adopt("never-seen", "gw2") is None


async def test_an_unreachable_redis_fails_within_two_seconds_naming_the_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"redis://:secret@127.0.0.1:{s.getsockname()[1]}/0"
    client = connect(url)
    queue = RedisQueue(client, KEYS, url)
    started = time.monotonic()
    with pytest.raises(UnavailableError, match=r"Redis at redis://:\*\*\*@127\.0\.0\.1:\d+/0 "
                                               "is unreachable"):
        await queue.enqueue(request("a"), 10)
    assert time.monotonic() - started < 2.0
    await client.aclose()


def test_redact_hides_only_the_password() -> None:
    assert redact("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact("rediss://:pw@h/2") == "rediss://:***@h/2"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"


async def test_requests_of_one_priority_in_the_same_millisecond_leave_in_arrival_order(
        r: aioredis.Redis, redis_url: str) -> None:
    queue = RedisQueue(r, KEYS, redis_url, request_ttl_s=60)
    ids = [f"same-ms-{c}" for c in "zyxwvuts"]  # reverse-alphabetical: Redis's own tie order
    for rid in ids:
        await queue.enqueue(request(rid, 3, 1_700_000_000_000), 0)
    assert await r.zrevrange(KEYS.queue("m"), 0, -1) == ids
    scores = [float(await r.hget(KEYS.request("m", rid), "score")) for rid in ids]
    assert scores == [await r.zscore(KEYS.queue("m"), rid) for rid in ids]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(ids)
    assert scores[0] - scores[-1] < 1  # all within the millisecond they arrived in
