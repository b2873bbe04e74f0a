"""What each RPC does, free of protobuf: the life of a generation stream, and the small RPCs.

A stream: take a stream slot, resolve the model, validate and tokenize (off the event loop),
subscribe to the relay, enqueue, then relay events until the last one, turning token ids into
text with the request's OutputProcessor. However it ends (finished, a stop string, client
gone, deadline, error), a request still queued or running is cancelled with the CANCEL script
from a background task, so cleanup survives the RPC's own cancellation and the worker stops
within a step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

from common.errors import (
    DeadlineExceededError,
    ErrorCode,
    InvalidRequestError,
    NpuserveError,
    RemoteError,
    RequestNotFoundError,
    UnavailableError,
)
from common.keys import GATEWAY_TTL_S
from common.logs import fields
from common.protocol import ORPHANED, QueuedRequest, ReplyEvent
from gateway import metrics
from gateway.admission import (
    Admitted,
    Limits,
    StreamLimiter,
    check_capabilities,
    check_fields,
    check_prompt_size,
    check_request_id,
    prepare,
    tokenize,
)
from gateway.api_keys import OPEN, Caller, KeyStore
from gateway.context import bind_request_id
from gateway.key_limits import KeyLimiter
from gateway.models import ModelRegistry
from gateway.output import OutputProcessor
from gateway.redis_queue import RedisQueue
from gateway.relay import ReplyRelay, Subscription
from gateway.types import Chunk, GenerationInput, ModelListing, PromptInput, Timings, TokenizeResult

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Progress:
    """What one stream has seen so far, for timings and usage."""

    model: str
    started: float
    prompt_tokens: int
    client_id: str
    """The request id as the client knows it (the fleet-wide one adds its tenant)."""
    queue_wait_ms: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None
    completion_tokens: int = 0
    end: str = "disconnected"

    def log(self, tenant: str, relayed: int, *, resumed: bool) -> None:
        """The one line per finished stream (its end, usage and timings); the request id
        comes with the task's log context. `relayed`: tokens relayed, for a stream that
        ended without a final event."""
        now = time.monotonic()
        first = self.first_token_at
        self.completion_tokens = max(self.completion_tokens, relayed)
        log.info("request finished", extra=fields(
            model=self.model, **({"tenant": tenant} if tenant else {}),
            **({"resumed": True} if resumed else {}), prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens, queue_wait_ms=round(self.queue_wait_ms, 1),
            ttft_ms=None if first is None else round((first - self.started) * 1e3, 1),
            total_ms=round((now - self.started) * 1e3, 1), finish_reason=self.end))
        metrics.REQUESTS.labels(self.model, self.end).inc()
        metrics.REQUEST_COMPLETION_TOKENS.labels(self.model).observe(self.completion_tokens)


FOLLOW_INTERVAL_S = 0.1
"""How often a resumed stream polls the request's published tokens and final event."""
FOLLOW_STOP_S = 2.0
"""How long an ended resumed stream waits for its poll to stop."""
MAX_REVIVALS = 3
"""How often one stream queues its request again after its worker stopped it as orphaned
before the stream fails with UNAVAILABLE (this gateway's registration keeps lapsing)."""


def _request_deadline(deadline_ms: int, started: float, timeout_s: float | None
                      ) -> float | None:
    """The earlier of a queued request's own deadline and the RPC's (time.monotonic())."""
    deadlines = [started + timeout_s] if timeout_s is not None else []
    if deadline_ms > 0:
        deadlines.append(time.monotonic() + deadline_ms / 1000 - time.time())
    return min(deadlines, default=None)


def _loop_time(monotonic_deadline: float) -> float:
    """A time.monotonic() deadline on the event loop's clock."""
    return asyncio.get_running_loop().time() + monotonic_deadline - time.monotonic()


class GatewayService:
    """The gateway's behaviour behind the servicer: one instance per gateway process."""

    def __init__(self, *, gateway_id: str, registry: ModelRegistry, queue: RedisQueue,
                 relay: ReplyRelay, limits: Limits, max_streams: int,
                 max_queued_per_model: int, api_keys: KeyStore,
                 key_limits: KeyLimiter) -> None:
        self.gateway_id = gateway_id
        self.registry = registry
        self.queue = queue
        self.relay = relay
        self.limits = limits
        self.streams = StreamLimiter(max_streams)
        self.max_queued_per_model = max_queued_per_model
        self.api_keys = api_keys
        self.key_limits = key_limits
        self._cleanups: set[asyncio.Task[None]] = set()

    def authenticate(self, presented_key: str | None) -> Caller:
        """The caller a call's API key names (every call is OPEN without a key file)."""
        return self.api_keys.authenticate(presented_key)

    async def generate(self, inp: GenerationInput, *, caller: Caller = OPEN, started: float,
                       timeout_s: float | None) -> AsyncIterator[Chunk]:
        """Admit, enqueue and relay one request; `inp.request_id` must already be set (the
        caller's own id: it is scoped to the caller's tenant here).

        `started` is the RPC's arrival (time.monotonic()), `timeout_s` what is left of its
        deadline. Ends after the chunk with a finish_reason; raises DeadlineExceededError
        when the deadline passes and, after relaying an error event, RemoteError with the
        worker's ErrorCode and message.
        """
        with metrics.counting_rejections():
            self.streams.acquire()
        metrics.STREAMS_ACTIVE.inc()
        slot: str | None = None
        resolved = ""
        try:
            try:
                check_fields(inp, self.limits)
                caller.check_priority(inp.priority)
                client_id = inp.request_id
                inp = dataclasses.replace(
                    inp, request_id=bind_request_id(caller.scope(client_id)))
                slot = await self.key_limits.admit(caller)
                model = await self.registry.resolve(inp.model)
                resolved = model.meta.name
                admitted = await asyncio.to_thread(
                    prepare, inp, model.meta, model.tokenizer, self.limits)
                check_capabilities(admitted.params, model.workers)
                progress = _Progress(resolved, started, len(admitted.prompt_ids), client_id)
                deadline = None if timeout_s is None else started + timeout_s
                if deadline is not None and deadline <= time.monotonic():
                    raise DeadlineExceededError(
                        "the deadline passed before the request was queued")
                sub = self.relay.subscribe(inp.request_id)
                try:
                    await self._enqueue(inp, progress.model, admitted, deadline, caller.tenant)
                except BaseException as exc:
                    self.relay.unsubscribe(inp.request_id)
                    if isinstance(exc, asyncio.CancelledError):  # it may be queued already
                        self._spawn_cancel(progress.model, inp.request_id)
                    raise
            except NpuserveError as exc:
                metrics.REJECTED.labels(resolved, exc.code.value.lower()).inc()
                raise
            metrics.PROMPT_TOKENS.labels(progress.model).inc(progress.prompt_tokens)
            metrics.REQUEST_PROMPT_TOKENS.labels(progress.model).observe(progress.prompt_tokens)
            self._charge(caller, progress.prompt_tokens)
            output = OutputProcessor(model.tokenizer, admitted.prompt_ids, admitted.params.stop)
            try:
                async for chunk in self._relay(sub, output, inp, progress, deadline):
                    yield chunk
            except UnavailableError:
                progress.end = "unavailable"
                raise
            finally:
                self.relay.unsubscribe(inp.request_id)
                if not sub.finished:
                    self._spawn_cancel(progress.model, inp.request_id)
                self._charge(caller, sub.next_index)
                progress.log(caller.tenant, sub.next_index, resumed=False)
        finally:
            self._release(caller, slot)

    async def resume(self, request_id: str, next_index: int, *, caller: Caller = OPEN,
                     started: float, timeout_s: float | None) -> AsyncIterator[Chunk]:
        """Continue the stream of a request another gateway streamed (that gateway died):
        its events come here from now on, and every chunk from completion index
        `next_index` on is yielded exactly once, with the text continuing exactly where the
        client's ends. A caller resumes only its own tenant's requests. Ends and fails as
        `generate`."""
        if not request_id:
            raise InvalidRequestError("request_id", "is required: the id of the request to "
                                      "resume")
        check_request_id(request_id)
        client_id, request_id = request_id, bind_request_id(caller.scope(request_id))
        self.streams.acquire()
        metrics.STREAMS_ACTIVE.inc()
        slot: str | None = None
        try:
            slot = await self.key_limits.admit(caller)
            sub = self.relay.subscribe(request_id, start=next_index)  # before adopting
            streaming = ""  # the model, once the stream is under way
            try:
                adopted = await self.queue.adopt(request_id, self.gateway_id)
                if adopted is None:
                    raise RequestNotFoundError(
                        f"request {client_id!r} is unknown: never sent, or finished longer "
                        "ago than the workers keep finished streams (--stream-retention-s)")
                req, tokens = adopted.request, adopted.tokens
                if adopted.revived:
                    log.warning("resumed %s: its worker had stopped it (its gateway stopped "
                                "heartbeating); queued again after %d tokens", request_id,
                                len(tokens))
                if next_index > len(tokens):
                    if adopted.revived:  # queued again for nobody
                        self._spawn_cancel(req.model, request_id)
                    raise InvalidRequestError(
                        "next_index", f"request {client_id} has {len(tokens)} tokens so far; "
                        f"ask for at most {len(tokens)}")
                model = await self.registry.resolve(req.model)
                output = OutputProcessor(model.tokenizer, req.prompt_ids, req.params.stop)
                for token in tokens[:next_index]:  # the state the client's stream broke in
                    output.add(token)
                inp = GenerationInput(req.model, PromptInput(token_ids=req.prompt_ids),
                                      req.params, req.priority, request_id)
                progress = _Progress(model.meta.name, started, len(req.prompt_ids), client_id)
                deadline = _request_deadline(req.deadline_ms, started, timeout_s)
                follow = asyncio.create_task(self._follow_published(sub, req.model, request_id),
                                             name=f"follow {request_id}")
                streaming = req.model
                try:
                    async for chunk in self._relay(sub, output, inp, progress, deadline):
                        yield chunk
                finally:
                    follow.cancel()
                    # bounded: the stream has ended, and a poll stuck in Redis must not
                    # hold its RPC open (the task ends by itself once the stream finished)
                    done, _ = await asyncio.wait({follow}, timeout=FOLLOW_STOP_S)
                    if not done:
                        log.warning("resumed %s: its follower did not stop within %.0f s",
                                    request_id, FOLLOW_STOP_S)
            finally:
                self.relay.unsubscribe(request_id)
                if streaming and not sub.finished:  # the client left: as for Generate
                    self._spawn_cancel(streaming, request_id)
                if streaming:
                    self._charge(caller, sub.next_index - next_index)
                    progress.log(caller.tenant, sub.next_index, resumed=True)
        finally:
            self._release(caller, slot)

    async def _follow_published(self, sub: Subscription, model: str, request_id: str) -> None:
        """Offer a resumed stream what the workers published: until its worker sends the
        events here, they went to the dead gateway's stream, and the request may even have
        finished there."""
        while not sub.finished:
            try:
                start = sub.next_index
                tokens, final = await self.queue.published(model, request_id, start)
            except UnavailableError as exc:
                log.warning("resumed %s: %s", request_id, exc)
            else:
                sub.offer_published(tokens, start, final)
            await asyncio.sleep(FOLLOW_INTERVAL_S)

    async def _enqueue(self, inp: GenerationInput, model: str, admitted: Admitted,
                       deadline: float | None, tenant: str) -> None:
        now = time.time()
        deadline_ms = 0 if deadline is None else int(
            (now + deadline - time.monotonic()) * 1000)
        request = QueuedRequest(
            request_id=inp.request_id, model=model, gateway_id=self.gateway_id,
            prompt_ids=admitted.prompt_ids, params=admitted.params, priority=inp.priority,
            enqueue_ms=int(now * 1000), deadline_ms=deadline_ms, tenant=tenant)
        await self.queue.enqueue(request, self.max_queued_per_model)

    async def _relay(self, sub: Subscription, output: OutputProcessor, inp: GenerationInput,
                     progress: _Progress, deadline: float | None) -> AsyncIterator[Chunk]:
        revivals = 0
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can drop a cancellation.
            try:
                async with asyncio.timeout_at(None if deadline is None else _loop_time(deadline)):
                    event = await sub.get()
            except TimeoutError:
                progress.end = "deadline"
                where = ("before the first token (queued or in prefill)"
                         if progress.first_token_at is None
                         else f"after {sub.next_index} generated tokens")
                raise DeadlineExceededError(
                    f"request {inp.request_id}: the deadline passed {where}") from None
            if event.finish_reason == ORPHANED:
                revivals += 1
                await self._revive(sub, inp.request_id, event, revivals)
                continue
            if event.queue_ms >= 0:
                progress.queue_wait_ms = float(event.queue_ms)
                metrics.series(progress.model).queue_wait.observe(event.queue_ms / 1000)
            if event.finish_reason == "deadline":
                progress.end = "deadline"
                raise DeadlineExceededError(
                    f"request {inp.request_id}: the deadline passed after "
                    f"{event.completion_tokens or sub.next_index} generated tokens")
            chunk = self._chunk(event, output, sub, inp, progress)
            yield chunk
            if chunk.finish_reason:
                progress.end = chunk.finish_reason
                if event.finish_reason == "error":
                    raise _worker_error(inp.request_id, event)
                return

    async def _revive(self, sub: Subscription, request_id: str, event: ReplyEvent,
                      revivals: int) -> None:
        """The worker stopped a request this gateway still streams, because this gateway's
        registration had lapsed (a stall, a Redis outage): queue it again from its published
        tokens and go on relaying. Fails the stream with UNAVAILABLE when the request is gone
        or keeps being stopped."""
        if revivals > MAX_REVIVALS:
            raise UnavailableError(f"request {request_id}: {event.error}")
        # queued again before this gateway's registration is back, a worker's claim would
        # stop it once more at once
        until = time.monotonic() + GATEWAY_TTL_S
        while not await self.queue.gateway_registered(self.gateway_id):
            if time.monotonic() > until:
                raise UnavailableError(f"request {request_id}: {event.error}")
            await asyncio.sleep(0.1)
        adopted = await self.queue.adopt(request_id, self.gateway_id)
        if adopted is None:
            raise UnavailableError(f"request {request_id}: {event.error}")
        log.warning("request %s: its worker stopped it as orphaned (this gateway's "
                    "registration had lapsed); queued again after %d tokens", request_id,
                    len(adopted.tokens))
        sub.reopen()
        sub.offer_published(adopted.tokens[sub.next_index:], sub.next_index, adopted.final)

    def _chunk(self, event: ReplyEvent, output: OutputProcessor, sub: Subscription,
               inp: GenerationInput, progress: _Progress) -> Chunk:
        now = time.monotonic()
        chunk = Chunk(request_id=progress.client_id,
                      index=event.index if event.index >= 0 else sub.next_index)
        finish, completion_tokens = event.finish_reason, event.completion_tokens
        if event.token_id >= 0:
            chunk.stop_token = finish == "stop"
            chunk.text = output.add(event.token_id, stop_token=chunk.stop_token)
            if output.stopped:  # a stop string: the stream ends here; the worker is cancelled
                finish, completion_tokens = "stop", event.index + 1
            chunk.token_ids.append(event.token_id)
            if inp.params.logprobs and event.logprob is not None:
                chunk.logprobs.append(event.logprob)
                chunk.tokens.append(output.piece(event.token_id))
                if inp.params.top_logprobs and event.top_logprobs is not None:
                    chunk.top_logprobs.append([(t, lp, output.piece(t))
                                               for t, lp in event.top_logprobs])
            series = metrics.series(progress.model)
            series.generated.inc()
            if progress.first_token_at is None:
                progress.first_token_at = now
                series.ttft.observe(now - progress.started)
            elif progress.last_token_at is not None:
                series.itl.observe(now - progress.last_token_at)
            progress.last_token_at = now
        if finish:
            chunk.text += output.finish()
            chunk.finish_reason = finish
            chunk.error = event.error
            chunk.prompt_tokens = event.prompt_tokens or progress.prompt_tokens
            chunk.completion_tokens = completion_tokens or sub.next_index
            progress.completion_tokens = chunk.completion_tokens
            first = progress.first_token_at
            chunk.timings = Timings(
                queue_wait_ms=progress.queue_wait_ms,
                time_to_first_token_ms=0.0 if first is None else (first - progress.started) * 1e3,
                total_ms=(now - progress.started) * 1e3,
            )
            metrics.series(progress.model).duration.observe(now - progress.started)
        return chunk

    def _spawn_cancel(self, model: str, request_id: str) -> None:
        self._spawn(self.queue.cancel(model, request_id), f"cancel {request_id}")

    def _release(self, caller: Caller, slot: str | None) -> None:
        """A stream ended: free its gateway-wide and its API key's slot."""
        self.streams.release()
        metrics.STREAMS_ACTIVE.dec()
        if slot is not None:
            self._spawn(self.key_limits.release(caller, slot), f"release {caller.name}")

    def _charge(self, caller: Caller, tokens: int) -> None:
        """Count a stream's tokens against its API key (nothing to do without keys)."""
        if caller.name and tokens > 0:
            self._spawn(self.key_limits.charge(caller, tokens), f"charge {caller.name}")

    def _spawn(self, work: Coroutine[Any, Any, Any], what: str) -> None:
        """Run a stream's cleanup (cancel, charge, release) in the background, so it survives
        the stream's own cancellation; `drain` waits for them at shutdown."""
        async def run() -> None:
            try:
                await work
            except UnavailableError as exc:
                log.warning("%s failed: %s", what, exc)

        task = asyncio.get_running_loop().create_task(run(), name=what)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def drain(self) -> None:
        """Wait for the cancellations of streams that have ended (call at shutdown)."""
        while self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)

    async def tokenize(self, model_name: str, prompt: PromptInput) -> TokenizeResult:
        """Tokenize with the model's tokenizer (and chat template)."""
        check_prompt_size(prompt, self.limits)
        model = await self.registry.resolve(model_name)
        return await asyncio.to_thread(tokenize, prompt, model.tokenizer,
                                       trusted=self.limits.allow_special_tokens)

    async def detokenize(self, model_name: str, token_ids: list[int]) -> str:
        """The text of `token_ids` with the model's tokenizer (special tokens kept)."""
        model = await self.registry.resolve(model_name)
        vocab = model.meta.vocab_size
        for i, t in enumerate(token_ids):
            if not 0 <= t < vocab:
                raise InvalidRequestError(f"tokens[{i}]", f"token id {t} is not in the "
                                          f"model's vocabulary [0, {vocab})")
        text: str = await asyncio.to_thread(model.tokenizer.decode, token_ids)
        return text

    async def list_models(self) -> list[ModelListing]:
        """The models of live workers, with their workers and queue depths."""
        await self.registry.refresh()
        names = self.registry.served()
        stats = await self.queue.queue_stats(names)
        listings = []
        for name in names:
            meta = self.registry.meta(name)
            listings.append(ModelListing(name, meta.max_len if meta else 0,
                                         self.registry.workers(name), stats[name].depth))
        return listings

    async def cancel(self, request_id: str, tenant: str = "", *,
                     caller: Caller = OPEN) -> bool:
        """Cancel a queued or running request of the caller's tenant (an admin: of `tenant`)
        by id; False when it is unknown or done, or another tenant's."""
        if not request_id:
            raise InvalidRequestError("request_id", "is required: the id of the request to cancel")
        check_request_id(request_id)
        return await self.queue.cancel_by_id(
            caller.scope(request_id, caller.tenant_for_cancel(tenant)))


def _worker_error(request_id: str, event: ReplyEvent) -> RemoteError:
    """The error a worker reported for the request, with its code; an internal failure names
    the request, so the worker's log entry can be found."""
    code = event.code or ErrorCode.INTERNAL
    message = event.error or "no details given"
    if code == ErrorCode.INTERNAL:
        message = f"request {request_id} failed on its worker: {message}"
    return RemoteError(code, message)
