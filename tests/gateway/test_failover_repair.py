"""What a gateway does when Redis comes back from an outage that may have been a failover to
a replica behind its master: it queues again the requests it queued that Redis no longer has
(their streams still waiting), and its reply reader reads on from the stream's end when the
entries it read last were lost."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from common.keys import Keys
from common.protocol import QueuedRequest, ReplyEvent, encode_events
from common.sampling_params import SamplingParams
from gateway import redis_queue
from gateway.redis_queue import RedisQueue, connect
from gateway.relay import ReplyRelay

pytestmark = pytest.mark.anyio
KEYS = Keys()


def request(rid: str, enqueue_ms: int = 1_000) -> QueuedRequest:
    return QueuedRequest(rid, "m", "gw", [1, 2, 3], SamplingParams(max_tokens=5),
                         priority=2, enqueue_ms=enqueue_ms)


async def lose(r: aioredis.Redis, rid: str) -> None:
    """What a failover to a replica that never got the enqueue leaves: nothing."""
    await r.delete(*KEYS.request_keys("m", rid), KEYS.request_model(rid))
    await r.zrem(KEYS.queue("m"), rid)


async def test_a_lost_enqueue_is_queued_again_while_its_stream_waits(
        r: aioredis.Redis, redis_url: str) -> None:
    queue = RedisQueue(r, KEYS, redis_url)
    for rid in ("lost", "kept", "given-up"):
        await queue.enqueue(request(rid), 0)
    score = await r.zscore(KEYS.queue("m"), "lost")
    for rid in ("lost", "given-up"):
        await lose(r, rid)
    assert await queue.restore_lost(lambda rid: rid != "given-up") == 1
    assert await r.zscore(KEYS.queue("m"), "lost") == score  # its place in the queue
    assert QueuedRequest.from_fields(await r.hgetall(KEYS.request("m", "lost"))) == \
        request("lost")
    assert await r.get(KEYS.request_model("lost")) == "m"
    assert not await r.exists(KEYS.request("m", "given-up"))  # nobody waits for it
    assert await queue.restore_lost(lambda rid: rid != "given-up") == 0  # nothing missing


async def test_only_recent_requests_are_remembered(r: aioredis.Redis, redis_url: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    queue = RedisQueue(r, KEYS, redis_url)
    monkeypatch.setattr(redis_queue, "RECENT_S", 0.05)
    await queue.enqueue(request("old"), 0)
    await asyncio.sleep(0.1)
    await queue.enqueue(request("new"), 0)
    for rid in ("old", "new"):
        await lose(r, rid)
    assert await queue.restore_lost(lambda rid: True) == 1
    assert await r.exists(KEYS.request("m", "new")) and not await r.exists(
        KEYS.request("m", "old"))


async def test_the_reply_reader_reads_on_when_its_last_entries_were_lost(
        r: aioredis.Redis, redis_url: str) -> None:
    client = connect(redis_url, read_timeout_s=3)
    relay = ReplyRelay(client, KEYS, "gw", redis_url, block_ms=100)
    stream = KEYS.replies("gw")
    sub = relay.subscribe("a")
    assert relay.waiting("a")
    await relay.start()
    try:
        def event(i: int) -> dict[str, str]:
            return {"e": encode_events([ReplyEvent("a", i, 100 + i)])}

        await r.xadd(stream, event(0), id="5000-0")
        await r.xadd(stream, event(1), id="5000-1")
        assert (await asyncio.wait_for(sub.get(), 3)).index == 0
        assert (await asyncio.wait_for(sub.get(), 3)).index == 1
        assert not relay.waiting("a")  # it has heard from the request
        # the failover: the replica had only the first entry, and the new master's clock is
        # behind the old one's, so its new entries get ids below the lost one's
        await r.delete(stream)
        await r.xadd(stream, event(0), id="5000-0")
        await relay._rewind()
        await r.xadd(stream, event(2), id="5000-1")
        assert (await asyncio.wait_for(sub.get(), 3)).index == 2
    finally:
        await relay.stop()
        await client.aclose()
