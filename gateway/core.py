"""The gateway core: everything a gateway process does that no protocol decides.

One core per process, on one event loop, shared by all front ends (gRPC now, HTTP next): the
Redis clients, the single reply reader of this gateway's stream, the model registry, admission
and output processing (GatewayService), and the health state. Front ends only translate their
protocol to GatewayService calls and map the neutral ErrorCode of a failure to their statuses.

Health is serving only while at least one live worker that claims new requests (not
draining) serves a model, re-checked every `health_interval_s`; not serving while Redis is
unreachable and from the start of shutdown. Each model has a health of its own too (serving
while it has such a worker). Front ends subscribe to changes with `on_health`. Each check also
refreshes the fleet gauges (queue depth, leases, workers: gateway.fleet_metrics).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from common.config import GatewayConfig
from common.errors import UnavailableError
from common.keys import Keys
from common.metrics_http import Probe
from common.redis_client import master_moved_async
from gateway import metrics
from gateway.admission import Limits
from gateway.api_keys import KeyStore
from gateway.fleet_metrics import FleetMetrics
from gateway.key_limits import KeyLimiter
from gateway.models import ModelRegistry
from gateway.redis_queue import RedisQueue, connect, unavailable_on_error
from gateway.relay import ReplyRelay
from gateway.service import GatewayService

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class Health:
    """What a front end reports: overall, and per model name."""

    serving: bool = False
    models: dict[str, bool] = field(default_factory=dict)


HealthListener = Callable[[Health], Awaitable[None]]


def default_gateway_id() -> str:
    """host-pid-random: unique per process, readable in Redis."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class GatewayCore:
    """Redis clients, reply relay, model registry, the service and health of one process."""

    def __init__(self, config: GatewayConfig, *, health_interval_s: float = 1.0,
                 relay_block_ms: int = 1000, outage_grace_s: float = 10.0) -> None:
        self.config = config
        self.gateway_id = config.gateway_id or default_gateway_id()
        self.keys = Keys(config.redis.prefix)
        self.health = Health()
        self._health_at = time.monotonic()
        self._fleet_logged = -1e9
        self._health_interval_s = health_interval_s
        self._listeners: list[HealthListener] = []
        url, password = config.redis.url, config.redis.password()
        self._redis = connect(url, password=password)
        self._relay_redis = connect(url, read_timeout_s=relay_block_ms / 1000 + 5,
                                    password=password)
        self.registry = ModelRegistry(self._redis, self.keys, url)
        self.relay = ReplyRelay(self._relay_redis, self.keys, self.gateway_id, url,
                                block_ms=relay_block_ms, outage_grace_s=outage_grace_s)
        self.service = GatewayService(
            gateway_id=self.gateway_id, registry=self.registry,
            queue=RedisQueue(self._redis, self.keys, url, request_ttl_s=config.request_ttl_s),
            relay=self.relay,
            limits=Limits.from_config(config),
            max_streams=config.max_streams, max_queued_per_model=config.max_queued_per_model,
            api_keys=KeyStore(config.api_keys),
            key_limits=KeyLimiter(self._redis, self.keys, self.gateway_id, url))
        self.relay.on_reconnect = self._restore_lost
        self.fleet = FleetMetrics(self.registry, self.service.queue)
        self._health_task: asyncio.Task[None] | None = None
        self._info = {"host": socket.gethostname(), "pid": str(os.getpid()),
                      "listen": config.listen}

    @property
    def serving(self) -> bool:
        return self.health.serving

    def probes(self) -> dict[str, Probe]:
        """/readyz: SERVING; /livez: the health loop went round lately (the event loop is
        not wedged; a Redis outage does not fail it)."""
        limit = max(30.0, 10 * self._health_interval_s)

        def readyz() -> tuple[bool, str]:
            accepting = [m for m, ok in self.health.models.items() if ok]
            return self.serving, ("SERVING: " + ", ".join(accepting) if self.serving else
                                  "NOT_SERVING: no worker accepts requests, Redis is "
                                  "unreachable, or the gateway is shutting down")

        def livez() -> tuple[bool, str]:
            age = time.monotonic() - self._health_at
            return age <= limit, f"health loop went round {age:.1f}s ago (limit {limit:.0f}s)"

        return {"/readyz": readyz, "/livez": livez}

    def on_health(self, listener: HealthListener) -> None:
        """Call `listener(health)` now-ish and on every change of the health state."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Register, start the reply reader and the health loop (front ends start after
        this)."""
        await self._set_health(Health(), force=True)
        try:
            await self._register()
        except UnavailableError as exc:  # the health loop keeps trying
            log.warning("could not register yet: %s", exc)
        await self.relay.start()
        self._health_task = asyncio.create_task(self._health_loop(), name="health")

    async def begin_shutdown(self) -> None:
        """Report not serving, so probes route new calls elsewhere while streams finish."""
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
            self._health_task = None
        await self._set_health(Health(models=dict.fromkeys(self.health.models, False)))

    async def stop(self) -> None:
        """After the front ends stopped: finish cancellations, stop the relay, unregister,
        close Redis."""
        await self.begin_shutdown()
        await self.service.drain()
        await self.registry.close()
        await self.relay.stop()
        try:
            await self.service.queue.unregister_gateway(self.gateway_id)
        except UnavailableError as exc:
            log.warning("could not unregister (it expires by itself): %s", exc)
        await self._redis.aclose()
        await self._relay_redis.aclose()

    async def _set_health(self, health: Health, *, force: bool = False) -> None:
        if health == self.health and not force:
            return
        if health.serving != self.health.serving:
            log.info("health: %s", "SERVING" if health.serving else
                     "NOT_SERVING (no worker accepting requests)")
        self.health = health
        metrics.SERVING.set(health.serving)
        for listener in self._listeners:
            await listener(health)

    async def _check_master(self) -> None:
        """With Sentinel: reads do not fail on a demoted master, so ask the sentinels each
        beat whether the master moved; if so, the clients reconnect to the new one and the
        reply reader does what it does after an outage."""
        async with unavailable_on_error(self.config.redis.url):
            moved = [await master_moved_async(c) for c in (self._redis, self._relay_redis)]
        if any(moved):
            log.warning("the sentinels name another Redis master; reconnecting to it")
            self.relay.notice_failover()

    async def _restore_lost(self) -> None:
        """Redis is back after an outage: queue again what a failover lost of this gateway's
        newest requests (RedisQueue.restore_lost)."""
        try:
            await self.service.queue.restore_lost(self.relay.waiting)
        except UnavailableError as exc:
            log.warning("could not look for requests lost in the Redis outage: %s", exc)

    async def _register(self) -> None:
        """The gateway's heartbeat: while its registration lives, workers serve its requests."""
        await self.service.queue.register_gateway(self.gateway_id, self._info)

    async def _update_fleet(self) -> None:
        """The fleet gauges; a failure to read them (Redis down, a user whose ACL lacks a
        command) never stops the health loop: it is logged, at most once a minute."""
        try:
            await self.fleet.update_queues()
        except Exception as exc:  # noqa: BLE001 -- gauges are best effort; health is not
            now = time.monotonic()
            if now - self._fleet_logged >= 60:
                self._fleet_logged = now
                log.warning("could not read the fleet gauges (queue depth, leases): %s", exc)

    async def _health_loop(self) -> None:
        while True:
            self._health_at = time.monotonic()
            self.service.api_keys.reload_if_changed()
            try:
                await self._check_master()
                await self._register()
                await self.service.key_limits.renew()
                await self.registry.refresh()
                self.registry.prefetch()
                accepting = set(self.registry.accepting())
                models = {m: m in accepting for m in {*self.health.models,
                                                      *self.registry.served()}}
                now = Health(bool(accepting), models)
            except UnavailableError as exc:
                now = Health(models=dict.fromkeys(self.health.models, False))
                if self.serving:
                    log.warning("health: %s", exc)
            self.fleet.update_workers()
            await self._set_health(now)
            await self._update_fleet()
            await asyncio.sleep(self._health_interval_s)
