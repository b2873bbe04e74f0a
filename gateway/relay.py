"""One reply reader per gateway process: XREAD BLOCK on `replies:{gateway}`, dispatched to
the waiting streams in completion order, exactly once.

Workers append one stream entry per engine step holding events of many requests. Each event
carries its index in the completion, so the relay delivers index k only after k-1, holds
early ones back, and drops duplicates (a request resumed on another worker re-sends tokens).
A token-less final event (index -1) is delivered once all `completion_tokens` tokens before it
have been. When Redis goes away the reader reconnects by itself with exponential backoff (at
most half a second apart, so a Sentinel failover is over for it soon after the new master
takes writes); after `outage_grace_s` without Redis the waiting streams fail with
UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from common.errors import AlreadyExistsError, UnavailableError
from common.keys import Keys
from common.protocol import ReplyEvent, decode_events
from common.redis_credentials import redact
from gateway import metrics
from gateway.redis_queue import REDIS_DOWN, raise_if_cancelling

log = logging.getLogger(__name__)


class Subscription:
    """The ordered, de-duplicated events of one request, for the stream that awaits them."""

    def __init__(self, request_id: str, start: int = 0) -> None:
        """`start`: the first completion index wanted (a resumed stream's)."""
        self.request_id = request_id
        self.queue: asyncio.Queue[ReplyEvent | Exception] = asyncio.Queue()
        self.next_index = start
        self.finished = False
        self._early: dict[int, ReplyEvent] = {}
        self._final: ReplyEvent | None = None
        self.heard = False
        """Whether any event of the request arrived (delivered or held back)."""

    async def get(self) -> ReplyEvent:
        """The next event in order; raises what the relay failed the stream with."""
        item = await self.queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def offer(self, event: ReplyEvent) -> None:
        """Accept one event from the stream, in whatever order it arrived."""
        self.heard = True
        if event.finish_reason and 0 <= event.index < self.next_index and not self.finished:
            # the last token was delivered before (a stream resumed after it), its end not:
            # the end alone, without the token
            event = dataclasses.replace(
                event, index=-1, token_id=-1, logprob=None,
                completion_tokens=event.completion_tokens or event.index + 1)
        if self.finished or self._seen(event):
            metrics.RELAY_DUPLICATES.inc()
            return
        if event.index < 0:
            self._final = event
        elif event.index > self.next_index:
            metrics.RELAY_OUT_OF_ORDER.inc()
            self._early[event.index] = event
            return
        else:
            self._deliver(event)
        while not self.finished and self.next_index in self._early:
            self._deliver(self._early.pop(self.next_index))
        final = self._final
        if not self.finished and final and self.next_index >= final.completion_tokens:
            self._deliver(final)

    def offer_published(self, tokens: list[int], start: int, final: ReplyEvent | None) -> None:
        """Offer what the request's keys hold (tokens published from index `start` on, and
        its final event): what a stream whose events went elsewhere has missed."""
        last = final.index if final is not None and final.index >= 0 else None
        for i, token in enumerate(tokens, start):
            if last is None or i < last:
                self.offer(ReplyEvent(self.request_id, i, token))
        if final is not None:
            self.offer(final)

    def reopen(self) -> None:
        """After an ORPHANED end the request was queued again: take its events on from
        `next_index` (the orphaned end was not the stream's)."""
        self.finished = False
        self._final = None

    def fail(self, error: Exception) -> None:
        """End the stream with `error` (raised by the next `get`)."""
        if not self.finished:
            self.finished = True
            self.queue.put_nowait(error)

    def _seen(self, event: ReplyEvent) -> bool:
        if event.index < 0:
            return self._final is not None or not event.finish_reason
        return event.index < self.next_index or event.index in self._early

    def _deliver(self, event: ReplyEvent) -> None:
        if event.index >= 0:
            self.next_index = event.index + 1
        if event.finish_reason:
            self.finished = True
        self.queue.put_nowait(event)


class ReplyRelay:
    """Reads this gateway's reply stream and hands each event to its request's Subscription."""

    def __init__(self, client: aioredis.Redis, keys: Keys, gateway_id: str, url: str, *,
                 block_ms: int = 1000, outage_grace_s: float = 10.0) -> None:
        self._r = client
        self._stream = keys.replies(gateway_id)
        self._url = url
        self._block_ms = block_ms
        self._outage_grace_s = outage_grace_s
        self._subs: dict[str, Subscription] = {}
        self._last_id = "0-0"
        self._task: asyncio.Task[None] | None = None
        self._down_since: float | None = None
        self.on_reconnect: Callable[[], Coroutine[Any, Any, object]] | None = None
        """Run (in a task of its own) each time Redis is back after an outage."""
        self._reconnects: set[asyncio.Task[object]] = set()

    def subscribe(self, request_id: str, start: int = 0) -> Subscription:
        """Start collecting events for `request_id` from completion index `start`; subscribe
        before enqueueing (or adopting)."""
        if request_id in self._subs:
            raise AlreadyExistsError(
                f"request_id {request_id!r} is already in flight on this gateway; "
                "use a new id, or Cancel that request first")
        sub = self._subs[request_id] = Subscription(request_id, start)
        return sub

    def unsubscribe(self, request_id: str) -> None:
        """Stop collecting; later events for the id are dropped."""
        self._subs.pop(request_id, None)

    def waiting(self, request_id: str) -> bool:
        """Whether a stream of this gateway waits for the request and has heard nothing of
        it yet."""
        sub = self._subs.get(request_id)
        return sub is not None and not sub.heard and not sub.finished

    async def start(self) -> None:
        """Start the reader task after the stream's newest entry, so that a gateway id reused
        after a crash does not replay old events. Without Redis it reads from the start of
        the stream once Redis is back (events of requests nobody waits for are dropped)."""
        try:
            newest: Any = await self._r.xrevrange(self._stream, count=1)
            self._last_id = str(newest[0][0]) if newest else "0-0"
        except REDIS_DOWN:
            self._last_id = "0-0"
        self._task = asyncio.create_task(self._run(), name=f"relay {self._stream}")

    async def stop(self, *, delete_stream: bool = True) -> None:
        """Stop the reader and fail the streams still waiting; delete the reply stream."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for sub in self._subs.values():
            sub.fail(UnavailableError("the gateway is shutting down; retry on another one"))
        if delete_stream:
            try:
                await self._r.delete(self._stream)
            except REDIS_DOWN:
                pass

    async def _run(self) -> None:
        while True:
            retrying = AsyncRetrying(
                retry=retry_if_exception_type(REDIS_DOWN),
                wait=wait_exponential_jitter(multiplier=0.05, max=0.5, jitter=0.1),
                before_sleep=self._on_outage,
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    await self._read_once()
            if self._down_since is not None:
                log.info("reply stream %s: Redis is back", self._stream)
                self._down_since = None
                await self._after_outage()

    def notice_failover(self) -> None:
        """The master moved though the reader's connection did not fail (a failover away
        from a master that was only slow): do what a reconnection does."""
        task = asyncio.create_task(self._after_outage(), name="after a failover")
        self._reconnects.add(task)
        task.add_done_callback(self._reconnects.discard)

    async def _after_outage(self) -> None:
        await self._rewind()
        if self.on_reconnect is not None:
            task: asyncio.Task[object] = asyncio.create_task(
                self.on_reconnect(), name="after an outage")
            self._reconnects.add(task)
            task.add_done_callback(self._reconnects.discard)

    async def _rewind(self) -> None:
        """After an outage: if the stream ends before the last entry read (a failover to a
        replica that never got the newest entries), read on from its end, so entries the
        new master adds are not skipped should their ids fall below the lost ones'."""
        try:
            newest: Any = await self._r.xrevrange(self._stream, count=1)
        except REDIS_DOWN:
            return
        end = str(newest[0][0]) if newest else "0-0"
        if _entry_id(end) < _entry_id(self._last_id):
            log.warning("reply stream %s: it ends at %s, before %s, the last entry read: "
                        "Redis lost its newest entries; reading on from its end",
                        self._stream, end, self._last_id)
            self._last_id = end

    async def _read_once(self) -> None:
        reply: Any = await self._r.xread({self._stream: self._last_id}, count=256,
                                          block=self._block_ms)
        raise_if_cancelling()
        if not reply:
            return
        entries: list[tuple[str, dict[str, str]]] = reply[0][1]
        for entry_id, fields in entries:
            self._last_id = entry_id
            try:
                events = decode_events(fields["e"])
            except (KeyError, ValueError, TypeError) as exc:
                log.error("reply stream %s: dropping malformed entry %s: %s",
                          self._stream, entry_id, exc)
                continue
            for event in events:
                sub = self._subs.get(event.request_id)
                if sub is not None:
                    sub.offer(event)
        metrics.RELAY_ENTRIES.inc(len(entries))
        await self._r.xtrim(self._stream, minid=self._last_id, approximate=False)

    def _on_outage(self, state: object) -> None:
        now = time.monotonic()
        metrics.RELAY_RECONNECTS.inc()
        if self._down_since is None:
            self._down_since = now
            log.warning("reply stream %s: Redis at %s is unreachable; reconnecting",
                        self._stream, redact(self._url))
        elif now - self._down_since > self._outage_grace_s and self._subs:
            error = UnavailableError(
                f"lost Redis at {redact(self._url)} for over {self._outage_grace_s:g} s "
                "while streaming; the request's outcome is unknown")
            for sub in self._subs.values():
                sub.fail(error)


def _entry_id(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)
