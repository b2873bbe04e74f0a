"""The gateway's side of the Redis queue: connections, enqueue and cancel, via the Lua scripts.

Every call is wrapped by `unavailable_on_error`, so an unreachable Redis surfaces as
UnavailableError naming the (password-redacted) URL within about a second, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff

from common import scripts
from common.errors import AlreadyExistsError, ResourceExhaustedError, UnavailableError
from common.keys import (
    GATEWAY_TTL_S,
    MAX_PRIORITY,
    PRIORITY_SCALE,
    REPLIES_TTL_S,
    Keys,
    queue_score,
)
from common.protocol import QueuedRequest, ReplyEvent, decode_events, encode_events
from common.redis_client import connect_async
from common.redis_credentials import redact, refused_credentials

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 0.8
"""Per connection attempt; with one retry an unreachable Redis fails an RPC within ~2 s."""

RECENT_S = 10.0
"""How long the gateway remembers a request it queued, to queue it again should a failover
lose it (Redis replicates asynchronously: the replica promoted may lack the newest writes)."""
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
"""What "Redis is unreachable" looks like from redis-py."""


def connect(url: str, *, read_timeout_s: float = 2.0,
            password: str | None = None) -> aioredis.Redis:
    """A client that fails fast: short connect timeout, one quick retry, decoded strings;
    `password` (RedisConfig.password()) overrides the URL's. Any URL form of
    common.redis_client, a sentinel URL among them."""
    return connect_async(
        url,
        password=password,
        decode_responses=True,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=read_timeout_s,
        retry=Retry(ConstantBackoff(0.05), retries=1),
    )


def raise_if_cancelling() -> None:
    """Re-raise a cancellation of the current task that was swallowed on the way.

    redis-py sends with asyncio.wait_for, which on Python 3.11 drops a cancellation that
    lands as the send completes (gh-86296). A dropped cancel would leave a disconnected
    client's stream, or a background loop being stopped, waiting forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


@asynccontextmanager
async def unavailable_on_error(url: str) -> AsyncIterator[None]:
    """Turn redis-py's connection failures into UnavailableError naming the Redis URL (and
    re-raise a cancellation redis-py swallowed)."""
    try:
        yield
    except redis.exceptions.AuthenticationError as exc:
        raise UnavailableError(refused_credentials(url, exc)) from exc
    except REDIS_DOWN as exc:
        raise UnavailableError(
            f"Redis at {redact(url)} is unreachable ({exc}); retry once it is back"
        ) from exc
    raise_if_cancelling()


@dataclass(frozen=True, slots=True)
class Adopted:
    """A request a client resumes at this gateway."""

    request: QueuedRequest
    tokens: list[int]
    """Every token published so far."""
    final: ReplyEvent | None
    """Its last event (token-less) when it already finished."""
    revived: bool = False
    """Its worker had stopped it as orphaned (its gateway's registration lapsed): it is
    queued again, to continue from `tokens`."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One model's queue as Redis holds it now."""

    depth: int
    """Requests queued and not yet claimed."""
    leased: int
    """Requests claimed by a worker and not finished."""
    oldest_enqueue_ms: int | None
    """When the longest-waiting queued request was queued (None: the queue is empty)."""


class RedisQueue:
    """Enqueue and cancel requests with the shared Lua scripts (common.scripts)."""

    def __init__(self, client: aioredis.Redis, keys: Keys, url: str, *,
                 request_ttl_s: int = 3600, cancel_ttl_s: int = 600) -> None:
        self._r = client
        self._keys = keys
        self._url = url
        self._request_ttl_s = request_ttl_s
        self._cancel_ttl_s = cancel_ttl_s
        self._enqueue = client.register_script(scripts.ENQUEUE)
        self._cancel = client.register_script(scripts.CANCEL)
        self._adopt = client.register_script(scripts.ADOPT)
        self._register = client.register_script(scripts.REGISTER_GATEWAY)
        self._recent: OrderedDict[str, tuple[float, QueuedRequest]] = OrderedDict()
        """Requests queued in the last RECENT_S seconds, oldest first (`restore_lost`)."""

    async def queue_stats(self, models: list[str]) -> dict[str, QueueStats]:
        """Depth, leases and the oldest waiter of each model's queue, in one round trip.
        Scores order by priority first, so the oldest request is the head of some priority's
        band (score in ((p-1)*SCALE, p*SCALE]): one ranged read per priority finds it."""
        pipe = self._r.pipeline(transaction=False)
        for model in models:
            queue = self._keys.queue(model)
            pipe.zcard(queue)
            pipe.zcard(self._keys.leases(model))
            for p in range(MAX_PRIORITY + 1):
                pipe.zrevrangebyscore(queue, p * PRIORITY_SCALE, f"({(p - 1) * PRIORITY_SCALE}",
                                      start=0, num=1, withscores=True)
        async with unavailable_on_error(self._url):
            replies = await pipe.execute()
        stats, per_model = {}, 2 + MAX_PRIORITY + 1
        for i, model in enumerate(models):
            depth, leased, *heads = replies[i * per_model:(i + 1) * per_model]
            enqueued = [p * PRIORITY_SCALE - int(head[0][1])
                        for p, head in enumerate(heads) if head]
            stats[model] = QueueStats(int(depth), int(leased), min(enqueued, default=None))
        return stats

    async def enqueue(self, request: QueuedRequest, max_queued: int) -> None:
        """Queue `request` with score priority-then-FIFO.

        Raises ResourceExhaustedError when the model's queue holds `max_queued` requests,
        AlreadyExistsError when the request id is still in flight.
        """
        rid, model = request.request_id, request.model
        score = queue_score(request.priority, request.enqueue_ms)
        fields = request.to_fields(score)
        argv: list[Any] = [rid, score, max_queued, self._request_ttl_s]
        for name, value in fields.items():
            argv += [name, value]
        keys = [self._keys.queue(model), self._keys.request(model, rid),
                self._keys.wake(model), self._keys.tokens(model, rid)]
        async with unavailable_on_error(self._url):
            # the id's model first, so a Cancel or Resume naming the id finds the request
            before = cast(str | None, await self._r.set(
                self._keys.request_model(rid), model, ex=self._request_ttl_s, get=True))
            if before and before != model and await self._in_flight(before, rid):
                await self._r.set(self._keys.request_model(rid), before,
                                  ex=self._request_ttl_s)
                result = -1
            else:
                result = int(await self._enqueue(keys=keys, args=argv))
        if result == 1:
            self._remember(request)
        if result == 0:
            raise ResourceExhaustedError(
                f"the queue of model {request.model!r} is full (--max-queued {max_queued}: at "
                f"most {max_queued} waiting requests per model); retry later"
            )
        if result == -1:
            raise AlreadyExistsError(
                f"request_id {request.request_id!r} is already in flight; use a new id, "
                "or Cancel that request first"
            )

    async def _in_flight(self, model: str, request_id: str) -> bool:
        """Whether request_id is queued or running for `model` (not finished or gone)."""
        key = self._keys.request(model, request_id)
        exists, final = await self._r.exists(key), await self._r.hexists(key, "final")
        return bool(exists) and not final

    async def model_of(self, request_id: str) -> str | None:
        """The model a request id was sent to (None: unknown, or long gone)."""
        async with unavailable_on_error(self._url):
            model = await self._r.get(self._keys.request_model(request_id))
        return str(model) if model else None

    def _remember(self, request: QueuedRequest) -> None:
        self._recent[request.request_id] = (time.monotonic(), request)
        self._recent.move_to_end(request.request_id)
        self._forget_old()

    def _forget_old(self) -> None:
        old = time.monotonic() - RECENT_S
        while self._recent and next(iter(self._recent.values()))[0] < old:
            self._recent.popitem(last=False)

    async def restore_lost(self, waiting: Callable[[str], bool]) -> int:
        """After an outage: queue again the requests this gateway queued in the last
        RECENT_S seconds that Redis no longer has while their streams still wait with
        nothing heard (`waiting`): a failover to a replica that never got their enqueue.
        A request a worker took before the failover is its to write back. Returns how
        many were queued again."""
        self._forget_old()
        lost = [req for _, req in self._recent.values() if waiting(req.request_id)]
        if not lost:
            return 0
        async with unavailable_on_error(self._url):
            pipe = self._r.pipeline(transaction=False)
            for req in lost:
                pipe.exists(self._keys.request(req.model, req.request_id))
            found = await pipe.execute()
        restored = 0
        for req, exists in zip(lost, found, strict=True):
            if not exists:
                try:
                    await self.enqueue(req, 0)
                    restored += 1
                except AlreadyExistsError:  # a worker wrote it back meanwhile
                    pass
        if restored:
            log.warning("queued %d requests again that Redis had lost (a failover to a replica "
                        "that never got them)", restored)
        return restored

    async def cancel(self, model: str, request_id: str) -> int:
        """Run CANCEL: 1 removed from the queue, 2 running and flagged, 0 unknown or done."""
        keys = [self._keys.queue(model), *self._keys.request_keys(model, request_id)]
        async with unavailable_on_error(self._url):
            return int(await self._cancel(keys=keys, args=[request_id, self._cancel_ttl_s]))

    async def cancel_by_id(self, request_id: str) -> bool:
        """Cancel a request known only by id, whichever gateway streams it.

        A queued request is removed and its gateway is sent a token-less `cancelled` final
        event, so that stream ends; a running one is flagged and its worker sends that event.
        Returns True when the request was queued or running.
        """
        model = await self.model_of(request_id)
        if model is None:
            return False
        async with unavailable_on_error(self._url):
            gateway = cast(str | None, await self._r.hget(
                self._keys.request(model, request_id), "gateway"))
        result = await self.cancel(model, request_id)
        if result == 1 and gateway:
            final = ReplyEvent(request_id=request_id, index=-1, finish_reason="cancelled")
            async with unavailable_on_error(self._url):
                await self._r.xadd(self._keys.replies(gateway), {"e": encode_events([final])})
        return result != 0

    async def adopt(self, request_id: str, gateway_id: str) -> Adopted | None:
        """Take over the stream of a request another gateway streamed (ADOPT): the request,
        the tokens published so far and, once it finished, its final event; None for an id
        that is unknown or finished longer ago than the workers keep it. A request its worker
        stopped as orphaned is queued again (`Adopted.revived`)."""
        model = await self.model_of(request_id)
        if model is None:
            return None
        k = self._keys
        keys = [k.request(model, request_id), k.tokens(model, request_id), k.queue(model),
                k.wake(model)]
        async with unavailable_on_error(self._url):
            raw: Any = await self._adopt(keys=keys,
                                         args=[gateway_id, request_id, self._request_ttl_s])
            if raw is not None and int(raw[2]):  # the id's model lives as long again
                await self._r.expire(k.request_model(request_id), self._request_ttl_s)
        if raw is None:
            return None
        flat, toks, revived = raw
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        final = decode_events(fields["final"])[0] if "final" in fields else None
        return Adopted(QueuedRequest.from_fields(fields, []), [int(t) for t in toks], final,
                       bool(int(revived)))

    async def published(self, model: str, request_id: str, start: int
                        ) -> tuple[list[int], ReplyEvent | None]:
        """Tokens published from index `start` on, and the final event once the request
        finished (what a resumed stream polls for until its own stream delivers)."""
        async with unavailable_on_error(self._url):
            pipe = self._r.pipeline(transaction=False)
            pipe.lrange(self._keys.tokens(model, request_id), start, -1)
            pipe.hget(self._keys.request(model, request_id), "final")
            toks, final = await pipe.execute()
        return [int(t) for t in toks], decode_events(final)[0] if final else None

    async def register_gateway(self, gateway_id: str, info: dict[str, str]) -> None:
        """Heartbeat: the registration (workers drop the requests of a gateway whose
        registration expired) and the reply stream's TTL, both refreshed."""
        fields = [x for item in info.items() for x in item]
        async with unavailable_on_error(self._url):
            await self._register(keys=[self._keys.gateway(gateway_id),
                                       self._keys.replies(gateway_id)],
                                 args=[GATEWAY_TTL_S, REPLIES_TTL_S, *fields])

    async def gateway_registered(self, gateway_id: str) -> bool:
        """Whether the gateway's registration lives (workers serve its requests)."""
        async with unavailable_on_error(self._url):
            return bool(await self._r.exists(self._keys.gateway(gateway_id)))

    async def unregister_gateway(self, gateway_id: str) -> None:
        async with unavailable_on_error(self._url):
            await self._r.delete(self._keys.gateway(gateway_id))
