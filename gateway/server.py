"""A gateway process: one core and its front ends on one event loop, plus /metrics.

    gateway = Gateway(config)            # the core and a gRPC front end on config.listen
    port = await gateway.start()
    ...
    await gateway.stop(grace_s=10)
"""

from __future__ import annotations

import asyncio
import logging
import signal
from wsgiref.simple_server import WSGIServer

import grpc

from common.config import GatewayConfig
from common.redis_credentials import redact
from gateway import metrics
from gateway.core import GatewayCore
from gateway.grpc_frontend import GrpcFrontend
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
        self._metrics_server: WSGIServer | None = None

    @property
    def gateway_id(self) -> str:
        return self.core.gateway_id

    @property
    def port(self) -> int:
        """The gRPC port, once started."""
        return self.grpc.port

    async def start(self) -> int:
        """Start the core, then the front ends; returns the gRPC port."""
        await self.core.start()
        port = await self.grpc.start()
        self._metrics_server = metrics.serve_metrics(self.config.metrics_port,
                                                      self.config.metrics_host)
        log.info("gateway %s listening on %s (port %d), Redis %s", self.gateway_id,
                 self.config.listen, port, redact(self.config.redis.url))
        return port

    async def stop(self, grace_s: float = 10.0) -> None:
        """Report NOT_SERVING, give running streams `grace_s` to finish, then clean up."""
        await self.core.begin_shutdown()
        await self.grpc.stop(grace_s)
        await self.core.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()

    async def wait(self) -> None:
        """Until the gRPC server stops."""
        await self.grpc.wait()


async def serve(config: GatewayConfig, *, grace_s: float = 10.0) -> None:
    """Run a gateway until SIGINT or SIGTERM, then shut it down gracefully."""
    gateway = Gateway(config)
    await gateway.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, gateway.core.service.api_keys.reload)
    await stopping.wait()
    log.info("gateway %s: shutting down (grace %.0f s)", gateway.gateway_id, grace_s)
    await gateway.stop(grace_s)
