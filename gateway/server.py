"""Wiring: the grpc.aio server with the Generation service, grpc.health.v1 and reflection.

Health is SERVING (overall "" and npuserve.v1.Generation) only while at least one live worker
serves a model, re-checked every `health_interval_s`; NOT_SERVING while Redis is unreachable
and during shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import uuid
from wsgiref.simple_server import WSGIServer

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.config import GatewayConfig
from common.errors import UnavailableError
from common.keys import Keys
from gateway import metrics
from gateway.admission import Limits
from gateway.interceptor import ErrorInterceptor
from gateway.models import ModelRegistry
from gateway.redis_queue import RedisQueue, connect, redact
from gateway.relay import ReplyRelay
from gateway.service import GatewayService
from gateway.servicer import GenerationServicer
from protos import npuserve_pb2, npuserve_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = npuserve_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


def default_gateway_id() -> str:
    """host-pid-random: unique per process, readable in Redis."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Gateway:
    """One gateway process' server, Redis clients, reply relay and health reporting."""

    def __init__(self, config: GatewayConfig, *, health_interval_s: float = 1.0,
                 relay_block_ms: int = 1000, outage_grace_s: float = 10.0) -> None:
        self.config = config
        self.gateway_id = config.gateway_id or default_gateway_id()
        self.keys = Keys(config.redis.prefix)
        self.port = 0
        self._health_interval_s = health_interval_s
        url = config.redis.url
        self._redis = connect(url)
        self._relay_redis = connect(url, read_timeout_s=relay_block_ms / 1000 + 5)
        self.registry = ModelRegistry(self._redis, self.keys, url)
        self.relay = ReplyRelay(self._relay_redis, self.keys, self.gateway_id, url,
                                block_ms=relay_block_ms, outage_grace_s=outage_grace_s)
        self.service = GatewayService(
            gateway_id=self.gateway_id, registry=self.registry,
            queue=RedisQueue(self._redis, self.keys, url, request_ttl_s=config.request_ttl_s),
            relay=self.relay,
            limits=Limits(config.default_max_tokens, config.max_tokens_limit),
            max_streams=config.max_streams, max_queued_per_model=config.max_queued_per_model)
        self.health = health.aio.HealthServicer()
        self._server = grpc.aio.server(interceptors=[ErrorInterceptor()])
        self._health_task: asyncio.Task[None] | None = None
        self._metrics_server: WSGIServer | None = None

    async def start(self) -> int:
        """Bind, start serving and return the bound port (useful with port 0)."""
        npuserve_pb2_grpc.add_GenerationServicer_to_server(
            GenerationServicer(self.service), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server)
        self.port = self._server.add_insecure_port(self.config.listen)
        if not self.port:
            raise OSError(f"cannot listen on {self.config.listen}")
        await self._set_health(False)
        await self._server.start()
        await self.relay.start()
        self._health_task = asyncio.create_task(self._health_loop(), name="health")
        self._metrics_server = metrics.serve_metrics(self.config.metrics_port)
        log.info("gateway %s listening on %s (port %d), Redis %s", self.gateway_id,
                 self.config.listen, self.port, redact(self.config.redis.url))
        return self.port

    async def stop(self, grace_s: float = 10.0) -> None:
        """Report NOT_SERVING, give running streams `grace_s` to finish, then clean up."""
        await self.health.enter_graceful_shutdown()
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await self._server.stop(grace_s)
        await self.service.drain()
        await self.registry.close()
        await self.relay.stop()
        await self._redis.aclose()
        await self._relay_redis.aclose()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()

    async def wait(self) -> None:
        """Until the server stops."""
        await self._server.wait_for_termination()

    async def _set_health(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(health.OVERALL_HEALTH, status)
        await self.health.set(SERVICE_NAME, status)

    async def _health_loop(self) -> None:
        serving: bool | None = None
        while True:
            try:
                await self.registry.refresh()
                self.registry.prefetch()
                now = bool(self.registry.served())
            except UnavailableError as exc:
                now = False
                if serving is not False:
                    log.warning("health: %s", exc)
            if now != serving:
                log.info("health: %s", "SERVING" if now else "NOT_SERVING (no live worker)")
                await self._set_health(now)
                serving = now
            await asyncio.sleep(self._health_interval_s)


async def serve(config: GatewayConfig, *, grace_s: float = 10.0) -> None:
    """Run a gateway until SIGINT or SIGTERM, then shut it down gracefully."""
    gateway = Gateway(config)
    await gateway.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("gateway %s: shutting down (grace %.0f s)", gateway.gateway_id, grace_s)
    await gateway.stop(grace_s)
