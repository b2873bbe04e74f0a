"""Per-key limits against a real Redis: stream slots shared by every gateway of the fleet and
freed when a gateway dies, and the sliding tokens-per-minute window."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from common.errors import ResourceExhaustedError
from common.keys import Keys
from gateway import key_limits
from gateway.api_keys import Caller, Role
from gateway.key_limits import KeyLimiter, retry_after_s, sliding_estimate

pytestmark = pytest.mark.anyio
KEYS = Keys()
WEB = Caller("web", "acme", Role.CALLER, max_streams=2, tokens_per_minute=100)


async def test_stream_slots_are_counted_across_gateways(r: aioredis.Redis,
                                                        redis_url: str) -> None:
    one, two = KeyLimiter(r, KEYS, "gw1", redis_url), KeyLimiter(r, KEYS, "gw2", redis_url)
    a = await one.admit(WEB)
    b = await two.admit(WEB)
    with pytest.raises(ResourceExhaustedError, match="'web' has 2 streams open, its "
                       "max_streams"):
        await one.admit(WEB)
    await two.release(WEB, b)
    c = await one.admit(WEB)
    assert {a, c} == set(await r.zrange(KEYS.key_streams("web"), 0, -1))
    other = Caller("batch", "acme", Role.CALLER, max_streams=1)
    assert await two.admit(other) is not None  # limits are per key


async def test_a_dead_gateways_slots_free_themselves(r: aioredis.Redis, redis_url: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(key_limits, "SLOT_TTL_MS", 400)
    alive, dead = KeyLimiter(r, KEYS, "alive", redis_url), KeyLimiter(r, KEYS, "dead", redis_url)
    await alive.admit(WEB)
    await dead.admit(WEB)
    for _ in range(4):  # only the live gateway renews
        await asyncio.sleep(0.2)
        await alive.renew()
    await alive.admit(WEB)  # the dead one's slot expired
    with pytest.raises(ResourceExhaustedError):
        await alive.admit(WEB)


async def test_tokens_per_minute_slide(r: aioredis.Redis, redis_url: str) -> None:
    limiter = KeyLimiter(r, KEYS, "gw", redis_url)
    unlimited = Caller("free", "free", Role.CALLER)
    assert await limiter.admit(unlimited) is None
    await limiter.charge(unlimited, 10**6)  # counted in metrics, never refused
    await limiter.admit(unlimited)
    minute = int(time.time() // 60)
    await limiter.admit(WEB)
    await limiter.charge(WEB, 99)
    assert int(await r.get(KEYS.key_tokens("web", minute)) or 0) + int(
        await r.get(KEYS.key_tokens("web", minute + 1)) or 0) == 99  # the minute may turn
    await limiter.charge(WEB, 1)
    if int(time.time() // 60) == minute:  # still this minute: the limit is reached
        with pytest.raises(ResourceExhaustedError,
                           match="'web' used its tokens_per_minute \\(100\\); retry in about"):
            await limiter.admit(WEB)


def test_the_sliding_estimate_and_the_retry_hint() -> None:
    assert sliding_estimate(10, 100, 0.0) == 110
    assert sliding_estimate(10, 100, 30.0) == 60
    assert sliding_estimate(10, 100, 60.0) == 10
    assert retry_after_s(50, 100, 45.0) == 15  # the previous minute slides out
    assert retry_after_s(200, 100, 30.0) == 60  # 30 s to turn, then half the next minute
