"""The gRPC front end: npuserve.v1.Generation, grpc.health.v1 and reflection over a core.

Transport security is the caller's choice: pass grpc.ServerCredentials (TLS or mTLS, e.g.
`grpc.ssl_server_credentials`) to serve on a secure port; without them the port is plaintext.
"""

from __future__ import annotations

import logging

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.core import GatewayCore, Health
from gateway.interceptor import ErrorInterceptor
from gateway.servicer import GenerationServicer
from protos import npuserve_pb2, npuserve_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = npuserve_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


class GrpcFrontend:
    """One grpc.aio server bound to `listen`, serving the core's GatewayService."""

    def __init__(self, core: GatewayCore, listen: str,
                 credentials: grpc.ServerCredentials | None = None,
                 max_message_bytes: int = 4 << 20, *, serve_reflection: bool = True) -> None:
        self.core = core
        self.listen = listen
        self.credentials = credentials
        self.port = 0
        self.health = HealthServicer()
        self._server = grpc.aio.server(
            interceptors=[ErrorInterceptor()],
            options=[("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.max_send_message_length", max_message_bytes)])
        npuserve_pb2_grpc.add_GenerationServicer_to_server(
            GenerationServicer(core.service), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if serve_reflection:
            reflection.enable_server_reflection(
                [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server)
        core.on_health(self._set_health)

    async def start(self) -> int:
        """Bind, start serving and return the bound port (useful with port 0)."""
        if self.credentials is None:
            self.port = self._server.add_insecure_port(self.listen)
        else:
            self.port = self._server.add_secure_port(self.listen, self.credentials)
        if not self.port:
            raise OSError(f"cannot listen on {self.listen}")
        await self._set_health(self.core.health)
        await self._server.start()
        log.info("gRPC on %s (port %d, %s)", self.listen, self.port,
                 "TLS" if self.credentials is not None else "plaintext")
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING for good, then give running streams `grace_s` to finish."""
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace_s)

    async def wait(self) -> None:
        """Until the server stops."""
        await self._server.wait_for_termination()

    async def _set_health(self, state: Health) -> None:
        """The server ("") and npuserve.v1.Generation follow the overall health; each model
        seen has a service of its own name (`grpc_health_probe -service <model>`)."""
        await self.health.set(health.OVERALL_HEALTH, _status(state.serving))
        await self.health.set(SERVICE_NAME, _status(state.serving))
        for model, serving in state.models.items():
            await self.health.set(model, _status(serving))


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return (health_pb2.HealthCheckResponse.SERVING if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING)


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 with `List` (every service's status), which the library leaves
    UNIMPLEMENTED."""

    async def List(self, request: health_pb2.HealthListRequest,
                   context: grpc.aio.ServicerContext) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()})
