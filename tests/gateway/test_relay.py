"""The reply relay against a real Redis stream: per-request order, exactly once, and
reconnection when Redis comes back."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis

from common.errors import AlreadyExistsError, UnavailableError
from common.keys import Keys
from common.protocol import ReplyEvent, encode_events
from gateway.redis_queue import connect
from gateway.relay import ReplyRelay, Subscription

pytestmark = pytest.mark.anyio
KEYS = Keys()


@asynccontextmanager
async def running_relay(url: str, **kw: float) -> AsyncIterator[ReplyRelay]:
    client = connect(url, read_timeout_s=3)
    relay = ReplyRelay(client, KEYS, "gw", url, block_ms=100, **kw)  # type: ignore[arg-type]
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()
        await client.aclose()


async def send(r: aioredis.Redis, *events: ReplyEvent) -> None:
    await r.xadd(KEYS.replies("gw"), {"e": encode_events(list(events))})


async def received(sub: Subscription, n: int) -> list[ReplyEvent]:
    return [await asyncio.wait_for(sub.get(), 3) for _ in range(n)]


def tok(rid: str, i: int) -> ReplyEvent:
    return ReplyEvent(rid, i, token_id=100 + i)


async def test_events_reach_their_request_in_completion_order_exactly_once(
        redis_url: str) -> None:
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    async with running_relay(redis_url) as relay:
        a, b = relay.subscribe("a"), relay.subscribe("b")
        await send(r, tok("a", 2), tok("b", 0), tok("stranger", 0))
        await send(r, tok("a", 0), tok("a", 0))
        await send(r, ReplyEvent("a", -1, finish_reason="stop", completion_tokens=4))
        await r.xadd(KEYS.replies("gw"), {"e": "not json"})
        await send(r, tok("a", 1), tok("a", 2), tok("a", 3))
        await send(r, tok("a", 1), ReplyEvent("a", -1, finish_reason="stop"))
        events = await received(a, 5)
        assert [(e.index, e.finish_reason) for e in events] == [
            (0, ""), (1, ""), (2, ""), (3, ""), (-1, "stop")]
        assert [e.token_id for e in events[:4]] == [100, 101, 102, 103]
        assert [e.index for e in await received(b, 1)] == [0]
        await asyncio.sleep(0.3)
        assert a.queue.empty() and a.finished and b.queue.empty()
        assert await r.xlen(KEYS.replies("gw")) <= 1  # read entries are trimmed
    await r.aclose()


async def test_a_request_id_can_only_be_subscribed_once_at_a_time(redis_url: str) -> None:
    async with running_relay(redis_url) as relay:
        relay.subscribe("x")
        with pytest.raises(AlreadyExistsError, match="'x' is already in flight"):
            relay.subscribe("x")
        relay.unsubscribe("x")
        relay.subscribe("x")


def start_redis(port: int) -> subprocess.Popen[bytes]:
    """A redis-server of this test's own on `port` (stopped by its PID with stop_redis)."""
    binary = shutil.which("redis-server")
    assert binary is not None
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "redis did not start"
            time.sleep(0.05)


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


async def test_the_reader_fails_waiting_streams_in_an_outage_and_reconnects_when_redis_returns(
        ) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    proc = start_redis(port)
    try:
        async with running_relay(url, outage_grace_s=0.3) as relay:
            waiting = relay.subscribe("old")
            stop_redis(proc)
            with pytest.raises(UnavailableError, match=f"127.0.0.1:{port}"):
                await asyncio.wait_for(waiting.get(), 5)
            relay.unsubscribe("old")
            proc = start_redis(port)
            fresh = relay.subscribe("new")
            r = aioredis.Redis.from_url(url, decode_responses=True)
            await send(r, tok("new", 0))
            assert [e.index for e in await received(fresh, 1)] == [0]
            await r.aclose()
    finally:
        stop_redis(proc)


def test_a_stream_resumed_after_its_last_token_still_gets_the_end() -> None:
    """A client that received every token but not the end (its gateway died just then)
    resumes from the token count: the final event, which carries the last token, is
    delivered as the end alone."""
    sub = Subscription("r", start=3)
    sub.offer(ReplyEvent("r", 2, 7, finish_reason="length", completion_tokens=3))
    event = sub.queue.get_nowait()
    assert isinstance(event, ReplyEvent)
    assert (event.index, event.token_id, event.finish_reason, event.completion_tokens) == (
        -1, -1, "length", 3)
    assert sub.finished and sub.queue.empty()
    sub.offer(ReplyEvent("r", 2, 7, finish_reason="length", completion_tokens=3))
    assert sub.queue.empty()  # once
