"""The one place exceptions become gRPC statuses.

Every NpuserveError carries an ErrorCode, whose name is the gRPC status code's, and a message
meant for the client. Anything else is a bug: the client gets INTERNAL with the request id, the
traceback goes to the gateway's log under that id, never to the client.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any, NoReturn

import grpc
import grpc.aio

from common.errors import NpuserveError
from gateway import metrics
from gateway.redis_queue import REDIS_DOWN

log = logging.getLogger(__name__)

REQUEST_ID: ContextVar[str] = ContextVar("npuserve_request_id", default="")
"""The id of the request the current RPC serves, for error messages and logs."""


def new_request_id() -> str:
    """A fresh request id (32 hex digits)."""
    return uuid.uuid4().hex


def bind_request_id(client_id: str) -> str:
    """Make `client_id` (or, when empty, the id the interceptor picked) this RPC's request id."""
    request_id = client_id or REQUEST_ID.get() or new_request_id()
    REQUEST_ID.set(request_id)
    return request_id


def status_for(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status code and client message for an exception raised by an RPC handler."""
    request_id = REQUEST_ID.get()
    if isinstance(exc, NpuserveError):
        code = grpc.StatusCode[exc.code.value]
        log.info("%s %s: %s %s", method, request_id, code.name, exc)
        return code, str(exc)
    if isinstance(exc, REDIS_DOWN):
        log.warning("%s %s: Redis failed: %s", method, request_id, exc)
        return grpc.StatusCode.UNAVAILABLE, f"Redis is unreachable ({exc}); retry later"
    log.error("%s %s: internal error", method, request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, (
        f"internal error while serving request {request_id}; "
        "the gateway's log has the details under that id")


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps handler exceptions to statuses and counts RPCs, for methods under `prefix`."""

    def __init__(self, prefix: str = "/npuserve.") -> None:
        self._prefix = prefix

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not method.startswith(self._prefix):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    def _unary(self, behavior: Any, method: str) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            REQUEST_ID.set(new_request_id())
            try:
                response = await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 -- every failure gets a status
                await self._abort(context, exc, method)
            metrics.RPCS.labels(_short(method), "OK").inc()
            return response

        return call

    def _stream(self, behavior: Any, method: str) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]
                       ) -> AsyncIterator[Any]:
            REQUEST_ID.set(new_request_id())
            started = time.monotonic()
            try:
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 -- every failure gets a status
                await self._abort(context, exc, method)
            log.debug("%s %s: OK in %.1f ms", method, REQUEST_ID.get(),
                      (time.monotonic() - started) * 1e3)
            metrics.RPCS.labels(_short(method), "OK").inc()

        return call

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception,
                     method: str) -> NoReturn:
        code, message = status_for(exc, method)
        metrics.RPCS.labels(_short(method), code.name).inc()
        await context.abort(code, message)
        raise AssertionError("context.abort returned")
