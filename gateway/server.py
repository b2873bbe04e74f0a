"""A gateway process: one core and its front ends on one event loop, plus /metrics.

    gateway = Gateway(config)            # the core and a gRPC front end on config.listen
    port = await gateway.start()
    ...
    await gateway.stop(grace_s=25)

The metrics port also answers /readyz (200 while SERVING) and /livez (200 while the health
loop goes round: the event loop is not wedged).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from wsgiref.simple_server import WSGIServer

import grpc

from common.config import GatewayConfig
from common.gc_tuning import freeze_heap
from common.metrics_http import serve_http
from common.redis_credentials import redact
from gateway.core import GatewayCore
from gateway.grpc_frontend import GrpcFrontend
from gateway.http_frontend import HttpFrontend
from gateway.tls import server_credentials

log = logging.getLogger(__name__)


class Gateway:
    """The core, its gRPC front end and the metrics endpoint of one gateway process."""

    def __init__(self, config: GatewayConfig, *, credentials: grpc.ServerCredentials | None = None,
                 health_interval_s: float = 1.0, relay_block_ms: int = 1000,
                 outage_grace_s: float = 10.0) -> None:
        self.config = config
        self.core = GatewayCore(config, health_interval_s=health_interval_s,
                                relay_block_ms=relay_block_ms, outage_grace_s=outage_grace_s)
        if credentials is None:
            credentials = server_credentials(config.tls_cert, config.tls_key,
                                             config.tls_client_ca)
        self.grpc = GrpcFrontend(self.core, config.listen, credentials,
                                 config.max_message_bytes, serve_reflection=config.reflection)
        self.http = (HttpFrontend(self.core, config.http_listen, config)
                     if config.http_listen else None)
        self._metrics_server: WSGIServer | None = None

    @property
    def gateway_id(self) -> str:
        return self.core.gateway_id

    @property
    def port(self) -> int:
        """The gRPC port, once started."""
        return self.grpc.port

    @property
    def http_port(self) -> int:
        """The HTTP port, once started (0 without an HTTP front end)."""
        return self.http.port if self.http is not None else 0

    async def start(self) -> int:
        """Start the core, then the front ends; returns the gRPC port."""
        await self.core.start()
        port = await self.grpc.start()
        if self.http is not None:
            await self.http.start()
        if self.config.metrics_port:
            self._metrics_server = serve_http(self.config.metrics_host, self.config.metrics_port,
                                              probes=self.core.probes())
        log.info("gateway %s listening on %s (port %d), Redis %s", self.gateway_id,
                 self.config.listen, port, redact(self.config.redis.url))
        return port

    async def stop(self, grace_s: float = 25.0) -> None:
        """Report NOT_SERVING, give running streams `grace_s` to finish, then clean up."""
        await self.core.begin_shutdown()
        await asyncio.gather(self.grpc.stop(grace_s),
                             *([self.http.stop(grace_s)] if self.http is not None else []))
        await self.core.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()

    async def wait(self) -> None:
        """Until the gRPC server stops."""
        await self.grpc.wait()


async def serve(config: GatewayConfig) -> None:
    """Run a gateway until SIGINT or SIGTERM, then shut it down gracefully: NOT_SERVING at
    once, then up to config.shutdown_grace_s for running streams."""
    gateway = Gateway(config)
    await gateway.start()
    freeze_heap()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, gateway.core.service.api_keys.reload)
    await stopping.wait()
    grace_s = config.shutdown_grace_s
    log.info("gateway %s: shutting down (grace %.0f s, --shutdown-grace)", gateway.gateway_id,
             grace_s)
    await gateway.stop(grace_s)
