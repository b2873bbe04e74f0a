"""The worker loop: claim what fits, step the engine, publish each step's tokens.

Leases, the registration and reaping run on a thread of their own (`worker.liveness`), so a
step of any length keeps the worker alive; each step's batch is published on another
(`worker.publisher`) while the next step runs. One iteration of `run_once` per step N:

1. requests the liveness thread found no longer leased to this worker are dropped;
2. requests flagged in cancel:{id} (as step N-2's publish read it; read now for those
   claimed since), past their deadline, or whose gateway's registration expired (nobody
   reads their stream) leave the batch with a final event;
3. CLAIM what the backend can start now: up to its free batch slots, within its free KV room,
   and only requests that fit its context and its capabilities (none while draining);
4. engine step N, while step N-1's batch is being published;
5. wait for that publish (`settle`); if it failed, step N's batch is never sent, and every
   request is dropped locally and stays leased (REAP hands it to a worker that resumes
   from toks:{id}, what was published);
6. send step N's events, new token ids and finished requests' cleanup, in one MULTI that
   also reads the running requests' cancel flags, then hand back those whose device failed;
7. nothing ran and nothing was claimed: block on wake:{model} for up to IDLE_WAIT_S.

Events a request receives on replies:{gateway}: one per token id with its completion index
(index 0 also carries queue_ms); the last one carries finish_reason and usage. Cancellation,
deadline, error (with its ErrorCode) and an already-complete resume end with an event of index
-1 and no token. No text: the worker needs no tokenizer.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from common.config import WorkerConfig
from common.errors import ErrorCode, NpuserveError
from common.metrics_http import Probe
from common.protocol import ORPHANED, QueuedRequest, ReplyEvent
from worker.engine.engine import Engine
from worker.liveness import Liveness, Reports, StepWatchdog, now_ms
from worker.metrics import WorkerMetrics, rss_bytes
from worker.model_info import model_info
from worker.probes import worker_probes
from worker.published import PublishLog
from worker.publisher import Publisher
from worker.redis_queue import Claimed, RedisQueue, StepBatch

log = logging.getLogger(__name__)

MAX_DEVICE_RETRIES = 1
"""A request whose device call fails is handed back this many times, then failed."""
IDLE_WAIT_S = 0.5
"""Longest BLPOP on wake:{model}: bounds both idle latency and how late a stop is seen."""
_MB = 1 << 20
REDIS_WAIT_S = 15.0
"""How long a starting worker waits for Redis before it gives up, without loading its model
(Redis starting beside it has that long)."""
STUCK_EXIT_STATUS = 3
"""The worker's exit status when a step outran --step-timeout-s."""

@dataclass(slots=True)
class _Active:
    req: QueuedRequest
    claimed_ms: int
    completion_tokens: int
    """Tokens of the completion so far (published by earlier workers, then by this one)."""


class WorkerService:
    """Serves one model from the Redis queue with one engine."""

    def __init__(self, config: WorkerConfig, engine: Engine, queue: RedisQueue,
                 metrics: WorkerMetrics | None = None) -> None:
        self.config = config
        self.engine = engine
        self.queue = queue
        self.metrics = metrics or WorkerMetrics(model=queue.model, backend=config.backend,
                                                device=str(engine.backend.device))
        self.capacity = min(engine.backend.capacity.max_batch, config.engine.max_num_seqs)
        """Requests this worker runs at once: what its backend declares, within its config."""
        self.draining = False
        self._active: dict[str, _Active] = {}
        self._held: tuple[str, ...] = ()
        """The ids of _active as the liveness thread reads them (replaced, never mutated)."""
        self.reports = Reports()
        self.published = PublishLog()
        """What this worker published, to write back what a Redis failover lost."""
        self.publisher = Publisher(queue, self.published)
        beat_s = min(config.heartbeat_s, config.lease_ms / 3000)
        self._stats_every_s = beat_s
        self._next_stats = 0.0
        self._started_ms = now_ms()
        self._failures = 0
        self.exit: Callable[[int], object] = os._exit
        """How a worker with a stuck step ends its process (replaced in tests)."""
        self.watchdog = StepWatchdog(config.step_warn_s, config.step_timeout_s, self.metrics,
                                     self._stuck)
        self.liveness = Liveness(queue, beat_s, model_info(config.model_dir, engine),
                                 self._registration, lambda: list(self._held),
                                 self.reports.lose, self.reports.gateways, self.watchdog)
        self._loop_at = time.monotonic()
        """When the engine loop last went round (the start of a step counts)."""
        self.metrics.track_ages(self.engine_loop_age_s, self.liveness.beat_age_s)

    @classmethod
    def from_config(cls, config: WorkerConfig) -> WorkerService:
        """Connect to Redis, then load the model (nothing is published until start()). A
        Redis that does not answer within REDIS_WAIT_S fails before the model loads."""
        name = config.model_name or Path(config.model_dir).resolve().name
        worker_id = config.worker_id or (
            f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        queue = RedisQueue.connect(config.redis, name, worker_id, config.lease_ms,
                                   config.stream_retention_s, wait_s=REDIS_WAIT_S)
        try:
            engine = Engine.from_model_dir(config.model_dir, config.engine,
                                           backend=config.backend,
                                           settings=config.backend_settings)
        except BaseException:
            queue.close()
            raise
        return cls(config, engine, queue)

    def engine_loop_age_s(self) -> float:
        return time.monotonic() - self._loop_at

    def probes(self) -> dict[str, Probe]:
        """/livez and /readyz of this worker (worker.probes)."""
        return worker_probes(self)

    @property
    def active_ids(self) -> list[str]:
        """Requests this worker holds a lease on and is generating."""
        return list(self._active)

    def start(self) -> None:
        """Publish the model's info, register, start the liveness thread, log memory use."""
        info = self.liveness.info
        if self.queue.ensure_model_info(info):
            log.info("published model:%s (sha %s)", self.queue.model, info["sha"][:12])
        self.liveness.start()
        self._refresh_stats()
        backend = self.engine.backend
        log.info("worker %s serving %s: weights %.1f MiB (%.1f MiB read per step), KV cache "
                 "%.1f MiB, RSS %.1f MiB, capacity %d, max_len %d", self.queue.worker_id,
                 self.queue.model, backend.weight_memory_bytes() / _MB,
                 backend.weight_bytes() / _MB, backend.kv_cache_bytes() / _MB,
                 rss_bytes() / _MB, self.capacity, self.engine.max_len)

    def close(self) -> None:
        """Stop the liveness thread, let the publish in flight end, close the connections."""
        self.liveness.stop()
        self.publisher.close()
        self.queue.close()

    def _refresh_stats(self) -> None:
        """Memory and device gauges (on the engine thread: device calls stay on one thread)."""
        self._next_stats = time.monotonic() + self._stats_every_s
        backend = self.engine.backend
        self.metrics.set_memory(backend.weight_bytes(), backend.weight_memory_bytes(),
                                backend.kv_cache_bytes())
        if (stats := backend.device_stats()) is not None:
            self.metrics.set_device(stats)

    def _drop_lost(self) -> bool:
        """Drop the requests the liveness thread found lost; True if it reported any."""
        lost = self.reports.take_lost()
        for rid, read_ms in lost.items():
            act = self._active.get(rid)
            if act is not None and act.claimed_ms >= read_ms:
                continue  # claimed (back) after the liveness thread read its owner
            self.published.forget(rid)
            if act is not None:
                del self._active[rid]
                log.warning("lost the lease on %s (reaped and taken by another); dropping it",
                            rid)
                self.engine.abort(rid)
        return bool(lost)

    def _repair(self) -> None:
        """After a Redis outage: write back what a failover lost of the requests this worker
        runs or just finished (RedisQueue.repair); a request whose lost hash it wrote back
        is still its own, whatever the liveness thread read before."""
        self.queue.disrupted = False
        entries = [e for rid, e in self.published.entries.items()
                   if rid in self._active or e.final is not None]
        if repaired := self.queue.repair(entries, now_ms()):
            log.warning("after a Redis outage, wrote back %d requests' tokens, events or "
                        "keys that Redis had lost (a failover to a replica behind its master)",
                        len(repaired))
            self.reports.kept(repaired)

    def _sync_held(self) -> None:
        self._held = tuple(self._active)

    def _stuck(self, age_s: float) -> None:
        """Liveness thread, a step past --step-timeout-s: hand everything back (once the
        publish in flight is written: those resuming them read it), leave."""
        log.error("an engine step has run for %.1fs, past --step-timeout-s %.1f: the device "
                  "or a kernel is wedged; handing %d requests back and exiting", age_s,
                  self.config.step_timeout_s, len(self._held))
        self.liveness.halt()
        if not self.publisher.wait():
            log.error("the last publish is still running; handing the requests back anyway")
        try:
            self.queue.requeue(list(self._held))
            self.queue.unregister()
        except redis.RedisError as exc:
            log.error("could not hand the requests back (%s); their leases will expire", exc)
        self.exit(STUCK_EXIT_STATUS)

    def run_once(self) -> bool:
        """One iteration (see the module docstring); False when there was nothing to do.

        Redis is read before any local state changes, so a failing read leaves nothing to
        undo; if a publish fails, every request is dropped locally and stays leased: REAP
        hands it to a worker that resumes it from toks:{id}, exactly where it stopped."""
        self._loop_at = time.monotonic()
        if self.queue.disrupted:
            self.settle()  # the repair compares Redis with what it acknowledged
            self._repair()
        if self._drop_lost():
            self.settle()  # a claim taking one back must read its tokens in flight
        if time.monotonic() >= self._next_stats:
            self._refresh_stats()
        drops = self._due_drops()
        in_engine = len(self.engine.scheduler.running) + len(self.engine.scheduler.waiting)
        admit = 0 if self.draining else self.capacity - (in_engine - len(drops))
        claimed = (self.queue.claim(admit, now_ms(), max_len=self.engine.max_len,
                                    room=self._kv_room(drops),
                                    lacks=self.engine.backend.capabilities.lacking)
                   if admit > 0 else [])

        batch = StepBatch()
        for rid, reason in drops.items():
            self.engine.abort(rid)
            self._end(batch, self._active[rid], *_final_event(rid, reason))
        claimed_ms = now_ms()
        for c in claimed:
            self._admit(c, claimed_ms, batch)
        self._sync_held()  # before the step, however long, the new leases are renewed
        stepped = self.engine.has_unfinished()
        if stepped:
            self._step(batch)
        self.settle()
        if batch or self._active:
            self.publisher.send(batch, self.active_ids)
        self._sync_held()
        sched, blocks = self.engine.scheduler, self.engine.scheduler.blocks
        self.metrics.set_load(len(sched.running), len(sched.waiting),
                              blocks.num_blocks - blocks.num_free_blocks, blocks.num_blocks)
        self.metrics.set_prefill_cap(self.engine.prefill_budget.tokens(sched.num_decoding(),
                                                                       refresh=False))
        if stepped or claimed or batch:
            return True
        if not self.draining:
            self.queue.wait_for_work(IDLE_WAIT_S)
        return False

    def run(self, stop: threading.Event) -> None:
        """Serve until stop is set, then drain; on an unexpected error, hand back and raise."""
        self.start()
        try:
            while not stop.is_set():
                self._guarded_once()
        except BaseException:
            try:
                self.shutdown(drain=False)
            except Exception:
                log.exception("could not hand requests back; their leases will expire")
                self.liveness.stop()
            raise
        self.shutdown(drain=True)

    def shutdown(self, drain: bool = True) -> None:
        """Stop claiming; step up to drain_timeout_s while requests run, re-queue the rest
        (toks:{id} holds what was published, so the next worker resumes exactly), and
        remove the registration."""
        self.draining = True
        self.metrics.draining.set(1)
        self.liveness.beat_soon()  # gateways stop counting this worker as accepting
        deadline = time.monotonic() + (self.config.drain_timeout_s if drain else 0.0)
        if self._active:
            log.info("draining %d requests (up to %.1fs)", len(self._active),
                     max(0.0, deadline - time.monotonic()))
        # a step is started only if it should end in time, judged by the last one
        while self._active and time.monotonic() + self.watchdog.last_s < deadline:
            self._guarded_once()
            self._loop_at = time.monotonic()
        try:
            self.settle()  # those resuming the requests handed back read the last step
        except redis.RedisError as exc:
            log.error("the last step's publish failed (%s)", exc)
        self.liveness.stop()  # no renewal or registration after this point
        ids = self.active_ids
        for rid in ids:
            self.engine.abort(rid)
        self._active.clear()
        self._sync_held()
        if ids:
            log.info("handed %d unfinished requests back to the queue", self.queue.requeue(ids))
        self.queue.unregister()

    def _guarded_once(self) -> None:
        try:
            self.run_once()
            self._failures = 0
        except redis.RedisError as exc:
            self._failures += 1
            pause = min(2.0, 0.1 * 2 ** self._failures)
            log.error("redis unavailable (%s); retrying in %.1fs", exc, pause)
            time.sleep(pause)

    def _kv_room(self, drops: dict[str, str]) -> int:
        """KV tokens free for new requests: free blocks (and those of requests about to be
        dropped), less what waiting requests still need for their prompts."""
        sched = self.engine.scheduler
        bs = sched.blocks.block_size
        free = sched.blocks.num_free_blocks + sum(
            len(r.block_ids) for rid in drops if (r := sched.get(rid)) is not None)
        pending = sum(r.num_tokens - r.num_computed_tokens for r in sched.waiting
                      if r.request_id not in drops)
        return max(0, free * bs - pending)

    def _due_drops(self) -> dict[str, str]:
        """Running requests to end now: id -> "cancelled", "deadline" or ORPHANED."""
        flagged, now = self.publisher.flagged(self._active), now_ms()
        late = {rid: "deadline" for rid, a in self._active.items() if 0 < a.req.deadline_ms <= now}
        orphaned, current = self.reports.take_gateways()
        for rid, gateway in current.items():
            if (act := self._active.get(rid)) is not None and act.req.gateway_id != gateway:
                log.info("request %s resumed at gateway %s: its events go there now", rid,
                         gateway)
                act.req.gateway_id = gateway
        return (dict.fromkeys((r for r in orphaned if r in self._active), ORPHANED) | late
                | dict.fromkeys(flagged, "cancelled"))

    def settle(self) -> None:
        """Wait for the publish in flight (Publisher.collect): what must see every step in
        Redis does first. If it failed, drop every request locally (the step run meanwhile
        is never sent) and raise."""
        try:
            self.publisher.collect()
        except redis.RedisError:
            self._forget_all()
            raise

    def _admit(self, c: Claimed, claimed_ms: int, batch: StepBatch) -> None:
        if (mine := self._active.get(c.request_id)) is not None:
            # still running here: reaped while this worker's registration lapsed (a Redis
            # outage, a stalled beat) and claimed back by this worker itself
            if c.dropped:
                self.engine.abort(c.request_id)
                self._end(batch, mine, *_final_event(c.request_id, c.dropped))
            else:
                log.warning("request %s: claimed back while still running here; it goes on",
                            c.request_id)
                mine.claimed_ms = claimed_ms
            return
        try:
            req = QueuedRequest.from_fields(c.fields, c.published)
        except (KeyError, ValueError, TypeError) as exc:
            log.error("dropping malformed request %s: %r", c.request_id, exc)
            if gateway := c.fields.get("gateway"):
                batch.add(gateway, ReplyEvent(
                    c.request_id, -1, finish_reason="error", code=ErrorCode.INTERNAL,
                    error=f"request {c.request_id} reached its worker malformed ({exc!r})"))
            batch.finished.append(c.request_id)
            self.metrics.finished.labels("error").inc()
            return
        act = _Active(req, claimed_ms, len(req.published_ids))
        if c.dropped:
            self._end(batch, act, *_final_event(req.request_id, c.dropped))
            return
        if act.completion_tokens >= req.params.max_tokens:
            self._end(batch, act, ReplyEvent(req.request_id, -1), "length")
            return
        try:
            self.engine.add_request(req.prompt_ids, req.params, req.request_id,
                                    output_ids=req.published_ids)
        except NpuserveError as exc:
            log.info("request %s refused: %s", req.request_id, exc)
            self._end(batch, act, ReplyEvent(req.request_id, -1, code=exc.code,
                                             error=str(exc)), "error")
            return
        self._active[req.request_id] = act
        if self.publisher.touches(req.request_id):
            # an id used again at once: its last use's publish is recorded first
            self.settle()
        self.published.start(req)

    def _step(self, batch: StepBatch) -> None:
        start = time.perf_counter()
        self.watchdog.started()
        try:
            events = self.engine.step()
        finally:
            self.watchdog.finished()
        self.metrics.observe_step(self.engine.last_step, time.perf_counter() - start,
                                  len(events))
        self.metrics.count_prompt_tokens(self.engine.prefix_cache_stats)
        for rid, what in self.engine.failed.items():
            self._device_failed(batch, rid, what)
        for ev in events:
            act = self._active.get(ev.request_id)
            if act is None:
                log.warning("engine event for unknown request %s", ev.request_id)
                continue
            act.completion_tokens = ev.index + 1
            reply = ReplyEvent(ev.request_id, ev.index, ev.token_id, ev.logprob,
                               top_logprobs=ev.top_logprobs)
            if ev.index == 0 and act.req.enqueue_ms > 0:
                reply.queue_ms = max(0, act.claimed_ms - act.req.enqueue_ms)
            if ev.finish_reason is not None:
                self._end(batch, act, reply, ev.finish_reason.value)
                continue
            batch.add(act.req.gateway_id, reply)
            ids, _ = batch.tokens.get(ev.request_id, ([], 0))
            batch.tokens[ev.request_id] = ([*ids, ev.token_id], act.completion_tokens)

    def _device_failed(self, batch: StepBatch, rid: str, what: str) -> None:
        """The device failed running rid (the engine dropped it, its slot was reset): hand
        it back once, to resume from its published tokens; fail it the second time."""
        act = self._active.get(rid)
        if act is None:
            return
        if act.req.device_failures < MAX_DEVICE_RETRIES:
            log.warning("request %s: device failed (%s); handing it back to the queue", rid,
                        what)
            batch.retry.append(rid)
            self._active.pop(rid)
            self.metrics.device_failures.labels("retried").inc()
            return
        self.metrics.device_failures.labels("failed").inc()
        self._end(batch, act, ReplyEvent(rid, -1, code=ErrorCode.INTERNAL, error=(
            f"the device failed running this request {act.req.device_failures + 1} times "
            f"(last: {what}); it was retried once on a fresh slot. Retry later or report "
            "the failure to the operator")), "error")

    def _end(self, batch: StepBatch, act: _Active, event: ReplyEvent, reason: str) -> None:
        """Make event the request's last: finish_reason, usage, keys removed on publish."""
        event.finish_reason = reason
        event.prompt_tokens = len(act.req.prompt_ids)
        event.completion_tokens = act.completion_tokens
        batch.add(act.req.gateway_id, event)
        rid = act.req.request_id
        if event.token_id >= 0:  # kept with the others, for a stream resumed elsewhere
            ids, _ = batch.tokens.get(rid, ([], 0))
            batch.tokens[rid] = ([*ids, event.token_id], act.completion_tokens)
        batch.finished.append(rid)
        batch.finals[rid] = event
        self._active.pop(act.req.request_id, None)
        self.metrics.finished.labels(reason).inc()
        log.debug("request %s ended: %s after %d tokens", act.req.request_id, reason,
                  event.completion_tokens)

    def _forget_all(self) -> None:
        log.error("publish failed; dropping %d requests locally (they stay leased and resume "
                  "elsewhere from their published tokens)", len(self._active))
        for rid in self.active_ids:
            self.engine.abort(rid)
        self.published.keep_finished()
        self._active.clear()
        self._sync_held()

    def _registration(self) -> dict[str, str]:
        return {
            "model": self.queue.model, "backend": self.config.backend,
            "device": str(self.engine.backend.device), "capacity": str(self.capacity),
            "running": str(len(self._active)), "max_len": str(self.engine.max_len),
            "pid": str(os.getpid()), "host": socket.gethostname(),
            "started_ms": str(self._started_ms), "draining": "1" if self.draining else "0",
            **self.engine.backend.capabilities.to_fields(),
        }


def _final_event(request_id: str, reason: str) -> tuple[ReplyEvent, str]:
    """The last event of a request ended without running to its end, and its finish reason."""
    if reason == ORPHANED:
        return ReplyEvent(request_id, -1, code=ErrorCode.UNAVAILABLE, error=(
            "the gateway this request came through stopped heartbeating, so nobody reads its "
            "stream; the request was stopped. Resume it at any gateway (Resume with its "
            "request_id) within --stream-retention-s to continue where it stopped, or send "
            "it again")), ORPHANED
    return ReplyEvent(request_id, -1), reason
