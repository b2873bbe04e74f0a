"""A worker's synchronous Redis operations: claim, publish, lease, reap, register.

Every call retries connection errors and timeouts with exponential backoff, logging each
retry, for up to `retry_s`, then re-raises. Leased requests are safe meanwhile: if this worker
stops renewing them, any worker's REAP puts them back in the queue.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.retry import Retry
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from common import scripts
from common.config import RedisConfig
from common.keys import REPLIES_TTL_S, Keys, queue_score
from common.protocol import ORPHANED, ReplyEvent, encode_events
from common.redis_client import connect_sync, master_moved, ping_within
from common.redis_credentials import redact
from worker.published import Published

log = logging.getLogger(__name__)

T = TypeVar("T")
REPLIES_MAXLEN = 100_000
"""Approximate cap on each gateway's reply stream; a live gateway reads far behind this."""
CLAIM_SCAN = 64
"""Queued ids one claim examines at most (the queue's head): past this many requests the
worker cannot run, it claims nothing this round, which bounds the script's time in Redis.
A claim of n reads the first 4n + 4 first, and the rest only when those did not give n."""
RETRY_MAX_WAIT_S = 0.5
"""Longest pause between two attempts: a Sentinel failover (about 2 s) is noticed within
half a second of the new master taking writes, not a doubled backoff later."""
TOKENS_TTL_S = 3600
"""toks:{id} outlives its last append by this much, so a request whose hash expired while
queued leaves nothing behind."""


@dataclass(slots=True)
class Claimed:
    """One request popped by CLAIM: leased to this worker, or removed instead of run."""

    request_id: str
    fields: dict[str, str]
    published: list[int]
    """Tokens an earlier worker already streamed (non-empty for a resumed request)."""
    dropped: str = ""
    """'cancelled' or 'deadline' when CLAIM removed the request instead of leasing it (it was
    flagged while running, then handed back), 'orphaned' when its gateway's registration
    expired: only its final event is left to send."""


@dataclass(slots=True)
class StepBatch:
    """Everything one engine step publishes; written in a single MULTI."""

    events: dict[str, list[ReplyEvent]] = field(default_factory=dict)
    """gateway id -> events, in publication order."""
    tokens: dict[str, tuple[list[int], int]] = field(default_factory=dict)
    """request id -> (new token ids, length of toks:{id} once they are appended)."""
    finished: list[str] = field(default_factory=list)
    """Requests whose last event is in this batch: their lease is removed, and their keys
    too, or kept for the retention with the final event (see `finals`)."""
    finals: dict[str, ReplyEvent] = field(default_factory=dict)
    """The last event of finished requests, kept with their tokens so that a client whose
    gateway died can resume the stream at another (RedisQueue.retention_s)."""
    retry: list[str] = field(default_factory=list)
    """Requests whose device failed: their `failures` count goes up; the worker then hands
    them back to the queue (RedisQueue.requeue)."""

    def add(self, gateway_id: str, event: ReplyEvent) -> None:
        self.events.setdefault(gateway_id, []).append(event)

    def __bool__(self) -> bool:
        return bool(self.events or self.tokens or self.finished or self.retry)


class RedisQueue:
    """One worker's view of the queue of one model."""

    def __init__(self, client: redis.Redis, keys: Keys, model: str, worker_id: str,
                 lease_ms: int, retry_s: float = 5.0, retention_s: float = 60.0) -> None:
        self.client = client
        self.cluster = isinstance(client, redis.RedisCluster)
        """Redis Cluster: a MULTI stays within one hash slot (see `_multi`)."""
        self.keys = keys
        self.model = model
        self.worker_id = worker_id
        self.lease_ms = lease_ms
        self.retry_s = retry_s
        self.retention_s = retention_s
        """How long a finished request's tokens and final event stay (0: removed at once)."""
        self.disrupted = False
        """Set when a call failed to reach Redis (from any thread): a failover may have lost
        acknowledged writes, which the worker then checks and writes back (`repair`)."""
        self._claim = client.register_script(scripts.CLAIM)
        self._requeue = client.register_script(scripts.REQUEUE)
        self._reap = client.register_script(scripts.REAP)

    @classmethod
    def connect(cls, config: RedisConfig, model: str, worker_id: str, lease_ms: int,
                retention_s: float = 60.0, *, wait_s: float = 0.0) -> RedisQueue:
        """A client whose own retries are off, so tenacity alone decides (and logs) them.

        Retries stop at half a lease: past that, a lease renewed a third of a lease ago
        could expire, and another worker may already be resuming the request. `wait_s` > 0:
        Redis must answer within that long (a worker checks before it loads its model),
        else UnavailableError says what to do; 0: an unreachable Redis is only logged."""
        client = connect_sync(config.url, password=config.password(),
                              decode_responses=True, socket_timeout=5.0,
                              socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0))
        if (down := ping_within(client, config.url, wait_s)) is not None:
            log.warning("Redis at %s is not reachable yet (%s); the worker keeps retrying",
                        redact(config.url), down)
        return cls(client, Keys(config.prefix), model, worker_id, lease_ms,
                   retry_s=lease_ms / 2000, retention_s=retention_s)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        def attempt() -> T:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError):
                self.disrupted = True
                raise

        retrying = Retrying(
            retry=retry_if_exception_type((redis.ConnectionError, redis.TimeoutError)),
            wait=wait_exponential(multiplier=0.05, max=RETRY_MAX_WAIT_S),
            stop=stop_after_delay(self.retry_s),
            before_sleep=lambda state: log.warning(
                "redis %s failed (%r); retry %d in %.2fs", what,
                state.outcome.exception() if state.outcome else None, state.attempt_number,
                state.next_action.sleep if state.next_action else 0.0),
            reraise=True,
        )
        return retrying(attempt)

    def _multi(self, what: str, *groups: tuple[Callable[[Pipeline], object], bool]
               ) -> list[Any]:
        """Run the groups' commands in one MULTI; on a cluster, where a MULTI stays within one
        slot, each group in turn as a pipeline of its own, in a MULTI when its flag says so
        (its commands then share a hash tag). The pipelines are rebuilt for every attempt,
        since redis-py empties them when execute() fails. Returns the replies, ending with
        those of the last group."""
        def run() -> list[Any]:
            if not self.cluster:
                pipe = self.client.pipeline(transaction=True)
                for build, _ in groups:
                    build(pipe)
                return pipe.execute()
            replies: list[Any] = []
            for build, atomic in groups:
                pipe = self.client.pipeline(transaction=atomic)
                build(pipe)
                replies = pipe.execute()
            return replies

        return self._call(what, run)

    def claim(self, n: int, now_ms: int, *, max_len: int, room: int, lacks: int = 0
              ) -> list[Claimed]:
        """Lease up to n requests, highest priority first, that fit this worker: prompt +
        max_tokens within `max_len`, prompts (with tokens already published) within `room`
        free KV tokens, and asking for no sampling field in the `lacks` mask (FIELD_BITS).
        Requests this worker cannot run stay queued for another."""
        out = self._call("claim", lambda: self._claim_head(
            n, now_ms, max_len=max_len, room=room, lacks=lacks))
        leased = [c for c in out if not c.dropped]
        dead = set(self._call("claim", lambda: self._dead(
            self.keys.gateway, [c.fields.get("gateway") for c in leased])))
        for c in leased:  # nobody reads their streams: ended at once, never run
            if c.fields.get("gateway") in dead:
                c.dropped = ORPHANED
        return out

    def _claim_head(self, n: int, now_ms: int, *, max_len: int, room: int, lacks: int
                    ) -> list[Claimed]:
        """Read the queue's head, then run CLAIM on it: the first 4n + 4 ids, then, if they
        gave fewer than n and none stopped the claim for room, the rest of CLAIM_SCAN."""
        k, model = self.keys, self.model
        out: list[Claimed] = []
        start, window = 0, min(CLAIM_SCAN, 4 * n + 4)
        while start < CLAIM_SCAN:
            ids = cast(list[str], self.client.zrevrange(k.queue(model), start,
                                                        start + window - 1))
            if not ids:
                break
            keys = [k.queue(model), k.leases(model)]
            for rid in ids:
                keys += k.request_keys(model, rid)
            taken = sum(1 for c in out if not c.dropped)
            raw, full = cast(tuple[list[Any], int], self._claim(keys=keys, args=[
                n - taken, now_ms, self.lease_ms, self.worker_id, max_len, room, lacks, *ids]))
            for rid, flat, toks, dropped in raw:
                fields = dict(zip(flat[::2], flat[1::2], strict=True))
                claimed = Claimed(rid, fields, [int(t) for t in toks], dropped)
                out.append(claimed)
                if not dropped:
                    room -= int(fields.get("plen", 0)) + len(toks) + 1
            if full or len(ids) < window or sum(1 for c in out if not c.dropped) >= n:
                break
            # what this window left queued (unfit, or taken meanwhile) is behind us; the
            # ids it removed moved the rest up
            start += len(ids) - len(raw)
            window = CLAIM_SCAN - start
        return out

    def _fields(self, ids: Sequence[str], name: str) -> list[str | None]:
        """One field of each request's hash (None where it is gone)."""
        pipe = self.client.pipeline(transaction=False)
        for rid in ids:
            pipe.hget(self.keys.request(self.model, rid), name)
        return cast(list[str | None], pipe.execute())

    def _dead(self, key: Callable[[str], str], names: Sequence[str | None]) -> list[str]:
        """Which of these gateways or workers (`key` names their registration) have none."""
        known = sorted({name for name in names if name})
        if not known:
            return []
        pipe = self.client.pipeline(transaction=False)
        for name in known:
            pipe.exists(key(name))
        return [name for name, n in zip(known, pipe.execute(), strict=True) if not n]

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block on the model's wake list for up to timeout_s; True if nudged."""
        key = self.keys.wake(self.model)
        return self._call("wake", lambda: self.client.blpop([key], timeout=timeout_s)) is not None

    def cancelled(self, ids: Sequence[str]) -> set[str]:
        """Which of these requests a gateway flagged as cancelled."""
        if not ids:
            return set()
        flags = self._call("cancelled", lambda: self.client.mget(
            [self.keys.cancel(self.model, rid) for rid in ids]))
        return {rid for rid, flag in zip(ids, flags, strict=True) if flag is not None}

    def publish(self, batch: StepBatch, running: Sequence[str] = ()) -> set[str]:
        """One MULTI: an XADD per gateway, appended tokens, finished requests removed (or kept
        for `retention_s` with their final event, for resumption). On a cluster the XADDs go
        first, then the model's MULTI: a failure between them leaves events the gateways
        have but toks:{model}:ID lacks, and the worker resuming the request sends those
        tokens again, which the gateways drop as duplicates. The model's MULTI ends with a
        GET of each `running` request's cancel flag (GETs, not an MGET, which redis-py's
        cluster pipelines refuse): returns those flagged, as `cancelled` would.

        Safe to retry when a reply was lost: LTRIM to the known length undoes a second
        RPUSH, and gateways drop events whose index they already forwarded."""
        if not batch and not running:
            return set()
        k = self.keys
        payloads = {gw: encode_events(events) for gw, events in batch.events.items()}
        done = set(batch.finished)
        keep, model = max(0, math.ceil(self.retention_s)), self.model

        def replies(pipe: Pipeline) -> None:
            for gateway, payload in payloads.items():
                pipe.xadd(k.replies(gateway), {"e": payload}, maxlen=REPLIES_MAXLEN,
                          approximate=True)
                # a live gateway keeps its stream's TTL fresh; one recreated after its
                # gateway is gone still expires
                pipe.expire(k.replies(gateway), REPLIES_TTL_S, nx=True)
            for rid in batch.finished:  # the id's model outlives the request no longer
                if batch.finals.get(rid) is not None and keep:
                    pipe.expire(k.request_model(rid), keep)
                else:
                    pipe.delete(k.request_model(rid))

        def requests(pipe: Pipeline) -> None:
            for rid, (ids, total) in batch.tokens.items():
                if ids and (rid not in done or keep):
                    pipe.rpush(k.tokens(model, rid), *ids)
                    pipe.ltrim(k.tokens(model, rid), 0, total - 1)
                    pipe.expire(k.tokens(model, rid), TOKENS_TTL_S)
            for rid in batch.finished:
                final = batch.finals.get(rid)
                if final is not None and keep:
                    pipe.hset(k.request(model, rid), "final", encode_events([final]))
                    pipe.expire(k.request(model, rid), keep)
                    pipe.expire(k.tokens(model, rid), keep)
                    pipe.delete(k.cancel(model, rid))
                else:
                    pipe.delete(*k.request_keys(model, rid))
                pipe.zrem(k.leases(model), rid)
            for rid in batch.retry:
                pipe.hincrby(k.request(model, rid), "failures", 1)
            for rid in running:
                pipe.get(k.cancel(model, rid))

        out = self._multi("publish", (replies, False), (requests, True))
        flags = out[len(out) - len(running):]
        return {rid for rid, flag in zip(running, flags, strict=True) if flag is not None}

    def repair(self, entries: Sequence[Published], now_ms: int) -> list[str]:
        """Compare Redis with what this worker published and write back what is missing
        (after an outage: the replica a failover promoted may lack acknowledged writes):

        - a request it runs whose hash is gone (its enqueue or claim was lost): the hash,
          leased to this worker, and its id's model;
        - a request it runs or finished whose toks:{model}:ID is short: the list rewritten,
          and the events of the missing tokens sent again to its gateway;
        - a request it finished whose final event is missing: the final event written, its
          lease removed (or, without retention, its keys deleted), the event sent again.

        Requests now leased to another worker are left to it. Returns the ids repaired."""
        if not entries:
            return []
        k, model, me = self.keys, self.model, self.worker_id
        keep = max(0, math.ceil(self.retention_s))

        def check() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for entry in entries:
                rid = entry.request.request_id
                pipe.hmget(k.request(model, rid), ["id", "worker", "final"])
                pipe.llen(k.tokens(model, rid))
            return pipe.execute()

        state = self._call("repair check", check)
        fixes: list[tuple[Published, bool, int]] = []
        for entry, (found, worker, final), length in zip(
                entries, state[::2], state[1::2], strict=True):
            length, done = int(length), entry.final is not None
            if found is None:  # lost with the master, or (finished, no retention) deleted
                if not done or keep:
                    fixes.append((entry, True, length))
            elif worker not in (me, None):
                continue
            elif length < len(entry.tokens) or (done and final is None):
                fixes.append((entry, False, length))
        if not fixes:
            return []

        def replies(pipe: Pipeline) -> None:
            for entry, recreate, start in fixes:
                gateway = entry.request.gateway_id
                pipe.xadd(k.replies(gateway), {"e": encode_events(entry.events(start))},
                          maxlen=REPLIES_MAXLEN, approximate=True)
                pipe.expire(k.replies(gateway), REPLIES_TTL_S, nx=True)
                if recreate:
                    pipe.set(k.request_model(entry.request.request_id), model,
                             ex=keep if entry.final is not None else TOKENS_TTL_S)

        def requests(pipe: Pipeline) -> None:
            for entry, recreate, _ in fixes:
                req = entry.request
                rid, toks = req.request_id, k.tokens(model, req.request_id)
                if recreate:
                    fields = req.to_fields(queue_score(req.priority, req.enqueue_ms))
                    fields.update(worker=me, failures=str(req.device_failures))
                    pipe.hset(k.request(model, rid), mapping=cast(dict[Any, Any], fields))
                    pipe.expire(k.request(model, rid), TOKENS_TTL_S)
                    if entry.final is None:
                        pipe.zadd(k.leases(model), {rid: now_ms + self.lease_ms})
                if entry.final is not None and not keep:
                    pipe.delete(*k.request_keys(model, rid))
                    pipe.zrem(k.leases(model), rid)
                    continue
                pipe.delete(toks)
                if entry.tokens:
                    pipe.rpush(toks, *entry.tokens)
                if entry.final is None:
                    pipe.expire(toks, TOKENS_TTL_S)
                    continue
                pipe.hset(k.request(model, rid), "final", encode_events([entry.final]))
                pipe.expire(k.request(model, rid), keep)
                pipe.expire(toks, keep)
                pipe.delete(k.cancel(model, rid))
                pipe.zrem(k.leases(model), rid)

        self._multi("repair", (replies, False), (requests, True))
        return [entry.request.request_id for entry, _, _ in fixes]

    def renew(self, ids: Sequence[str], now_ms: int) -> list[str]:
        """Extend the leases of requests still ours; return those that are not (reaped and
        queued again or claimed elsewhere), which this worker must drop without publishing.

        A request whose hash is gone altogether is not dropped: Redis lost it (a failover to
        a replica that lacked it, or its hash outlived by a long generation), and `repair`
        writes it back, leased to this worker, at the next step."""
        if not ids:
            return []

        def run() -> list[str]:
            pipe = self.client.pipeline(transaction=False)
            for rid in ids:
                pipe.hmget(self.keys.request(self.model, rid), ["id", "worker"])
            found = cast(list[list[str | None]], pipe.execute())
            mine = [rid for rid, (_, w) in zip(ids, found, strict=True) if w == self.worker_id]
            if any(present is None for present, _ in found):
                self.disrupted = True
            if mine:
                expiry = now_ms + self.lease_ms
                self.client.zadd(self.keys.leases(self.model), dict.fromkeys(mine, expiry),
                                 xx=True)
            return [rid for rid, (present, w) in zip(ids, found, strict=True)
                    if present is not None and w != self.worker_id]

        return self._call("renew", run)

    def check_master(self) -> None:
        """With Sentinel: whether the master moved though no call of this worker failed
        (reads do not fail on a demoted master); if so, its connections go to the new one
        and what a failover may have lost is checked (`repair`)."""
        if self._call("master", lambda: master_moved(self.client)):
            log.warning("the sentinels name another Redis master; reconnecting to it")
            self.disrupted = True

    def gateways(self, ids: Sequence[str]) -> dict[str, tuple[str, bool]]:
        """Each request's gateway (it changes when a client resumes the stream at another)
        and whether that gateway's registration lives: when it expired, nobody reads the
        request's stream any more."""
        if not ids:
            return {}

        def run() -> dict[str, tuple[str, bool]]:
            gateways = self._fields(ids, "gateway")
            dead = set(self._dead(self.keys.gateway, gateways))
            return {rid: (g, g not in dead) for rid, g in zip(ids, gateways, strict=True) if g}

        return self._call("gateways", run)

    def reap(self, now_ms: int, turn_ms: int = 0) -> int:
        """Re-queue every request of the model whose lease or whose worker's registration
        expired; returns how many. With `turn_ms`, only if no worker of the model reaped in
        the last `turn_ms` (one reap per heartbeat serves the whole fleet)."""
        def run() -> int:
            if turn_ms and not self.client.set(self.keys.reaper(self.model), self.worker_id,
                                               nx=True, px=turn_ms):
                return 0
            return self._reap_leases(now_ms)

        return int(self._call("reap", run))

    def _reap_leases(self, now_ms: int) -> int:
        k, model = self.keys, self.model
        leases = cast(list[tuple[str, float]],
                      self.client.zrange(k.leases(model), 0, -1, withscores=True))
        expired = [rid for rid, expiry in leases if expiry <= now_ms]
        held = [rid for rid, expiry in leases if expiry > now_ms]
        owners = self._fields(held, "worker") if held else []
        dead = self._dead(k.worker, owners)
        ids = expired + [rid for rid, w in zip(held, owners, strict=True) if w in dead]
        if not ids:
            return 0
        keys = [k.leases(model), k.queue(model), k.wake(model),
                *(k.request(model, rid) for rid in ids)]
        return int(self._reap(keys=keys, args=[now_ms, len(dead), *dead, *ids]))

    def requeue(self, ids: Sequence[str]) -> int:
        """Hand leased requests back with their original score (drain, device failure)."""
        if not ids:
            return 0
        k, model = self.keys, self.model
        keys = [k.queue(model), k.leases(model), k.wake(model),
                *(k.request(model, rid) for rid in ids)]
        return int(self._call("requeue", lambda: self._requeue(keys=keys, args=list(ids))))

    def register(self, info: dict[str, str], ttl_s: int, now_ms: int) -> None:
        """Write the whole registration (so it survives a Redis restart) and heartbeat."""
        key = self.keys.worker(self.worker_id)

        self._multi("register",
                    (lambda pipe: (pipe.hset(key, mapping=cast(dict[Any, Any], info)),
                                   pipe.expire(key, ttl_s)), True),
                    (lambda pipe: pipe.zadd(self.keys.workers(), {self.worker_id: now_ms}),
                     False))

    def unregister(self) -> None:
        self._multi("unregister",
                    (lambda pipe: pipe.delete(self.keys.worker(self.worker_id)), False),
                    (lambda pipe: pipe.zrem(self.keys.workers(), self.worker_id), False))

    def ensure_model_info(self, info: dict[str, str]) -> bool:
        """Publish model:{name} unless it already holds this sha; True if written."""
        key = self.keys.model(self.model)
        current = self._call("model sha", lambda: self.client.hget(key, "sha"))
        if current == info["sha"]:
            return False
        if current is not None:
            log.warning("model:%s had tokenizer sha %s; replacing it with ours (%s)",
                        self.model, current, info["sha"])
        self._multi("model info", (lambda pipe: (
            pipe.delete(key), pipe.hset(key, mapping=cast(dict[Any, Any], info))), True))
        return True

    def close(self) -> None:
        self.client.close()
