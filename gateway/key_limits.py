"""Per-API-key limits, enforced across the whole fleet through Redis.

* **Concurrent streams** (`max_streams`): each open Generate/Chat/Resume stream holds a slot
  in the key's kstreams:{key} set (scripts.STREAM_SLOT); its gateway renews its slots every
  health tick, so the slots of a gateway that died free themselves within SLOT_TTL_MS.
* **Tokens per minute** (`tokens_per_minute`): prompt tokens are charged when a request is
  admitted, completion tokens when its stream ends, into per-minute counters; a request is
  admitted while the sliding estimate (this minute's count plus the part of the last
  minute's that the sliding 60 s window still covers) is under the limit.

A refusal is ResourceExhaustedError naming the key, the limit and when to retry.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import defaultdict

import redis.asyncio as aioredis

from common import scripts
from common.errors import ResourceExhaustedError, UnavailableError
from common.keys import Keys
from gateway import metrics
from gateway.api_keys import Caller
from gateway.redis_queue import unavailable_on_error

log = logging.getLogger(__name__)

SLOT_TTL_MS = 15_000
"""A stream slot lives this long past its gateway's last renewal."""
WINDOW_S = 60
TOKENS_TTL_S = 2 * WINDOW_S + 10


def sliding_estimate(current: int, previous: int, into_window: float) -> float:
    """Tokens in the last 60 s, estimated from this minute's and the last minute's counts
    (`into_window`: seconds since this minute began)."""
    return current + previous * (1 - into_window / WINDOW_S)


def retry_after_s(current: int, limit: int, into_window: float) -> int:
    """Seconds until the sliding estimate falls under `limit` if nothing more is charged."""
    wait = WINDOW_S - into_window  # this minute's count becomes the previous one
    if current >= limit:  # ... and must then slide out far enough
        wait += WINDOW_S * (1 - limit / current)
    return max(1, math.ceil(wait))


class KeyLimiter:
    """Takes and frees stream slots and charges tokens for the API keys that have limits."""

    def __init__(self, client: aioredis.Redis, keys: Keys, gateway_id: str, url: str) -> None:
        self._client = client
        self._keys = keys
        self._gateway_id = gateway_id
        self._url = url
        self._slot = client.register_script(scripts.STREAM_SLOT)
        self._renew = client.register_script(scripts.RENEW_STREAM_SLOTS)
        self._held: defaultdict[str, set[str]] = defaultdict(set)
        """This gateway's open slots, by key name."""

    async def admit(self, caller: Caller) -> str | None:
        """Check the caller's token rate and take one of its stream slots; returns the slot
        (None when the key limits no streams) for `release`."""
        if caller.tokens_per_minute:
            await self._check_tokens(caller)
        if not caller.max_streams:
            return None
        slot = f"{self._gateway_id}:{uuid.uuid4().hex[:12]}"
        async with unavailable_on_error(self._url):
            taken = await self._slot(keys=[self._keys.key_streams(caller.name)],
                                     args=[slot, SLOT_TTL_MS, caller.max_streams])
        if not taken:
            metrics.KEY_LIMITED.labels(caller.name, "max_streams").inc()
            raise ResourceExhaustedError(
                f"API key {caller.name!r} has {caller.max_streams} streams open, its "
                "max_streams; retry when one ends")
        self._held[caller.name].add(slot)
        return slot

    async def _check_tokens(self, caller: Caller) -> None:
        now = time.time()
        minute = int(now // WINDOW_S)
        async with unavailable_on_error(self._url):
            counts = await self._client.mget(self._keys.key_tokens(caller.name, minute),
                                             self._keys.key_tokens(caller.name, minute - 1))
        current, previous = (int(count or 0) for count in counts)
        into = now - minute * WINDOW_S
        if sliding_estimate(current, previous, into) >= caller.tokens_per_minute:
            metrics.KEY_LIMITED.labels(caller.name, "tokens_per_minute").inc()
            raise ResourceExhaustedError(
                f"API key {caller.name!r} used its tokens_per_minute "
                f"({caller.tokens_per_minute}); retry in about "
                f"{retry_after_s(current, caller.tokens_per_minute, into)} s")

    async def charge(self, caller: Caller, tokens: int) -> None:
        """Count `tokens` (prompt or completion) against the caller's rate."""
        if tokens <= 0 or not caller.name:
            return
        metrics.KEY_TOKENS.labels(caller.name).inc(tokens)
        if not caller.tokens_per_minute:
            return
        key = self._keys.key_tokens(caller.name, int(time.time() // WINDOW_S))
        async with unavailable_on_error(self._url):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.incrby(key, tokens)
                pipe.expire(key, TOKENS_TTL_S)
                await pipe.execute()

    async def release(self, caller: Caller, slot: str | None) -> None:
        """Free a slot `admit` took."""
        if slot is None:
            return
        self._held[caller.name].discard(slot)
        if not self._held[caller.name]:
            del self._held[caller.name]
        async with unavailable_on_error(self._url):
            await self._client.zrem(self._keys.key_streams(caller.name), slot)

    async def renew(self) -> None:
        """Keep this gateway's open slots alive (every health tick)."""
        for name, slots in list(self._held.items()):
            if not slots:
                continue
            try:
                async with unavailable_on_error(self._url):
                    await self._renew(keys=[self._keys.key_streams(name)],
                                      args=[SLOT_TTL_MS, *slots])
            except UnavailableError as exc:
                log.warning("could not renew the stream slots of API key %r: %s", name, exc)
                return
