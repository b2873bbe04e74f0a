"""The gRPC front end's one place where exceptions become statuses.

gateway.failures turns an exception into a neutral ErrorCode and a client message (the
request id and a logged traceback for bugs); the code's name is the gRPC status code's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
import grpc.aio

from gateway import context as request_context
from gateway import metrics
from gateway.failures import describe

log = logging.getLogger(__name__)


def status_for(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status code and client message for an exception raised by an RPC handler."""
    code, message = describe(exc, method)
    return grpc.StatusCode[code.value], message


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps handler exceptions to statuses and counts RPCs, for methods under `prefix`."""

    def __init__(self, prefix: str = "/npuserve.") -> None:
        self._prefix = prefix

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
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
            request_context.begin()
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
            request_context.begin()
            started = time.monotonic()
            try:
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 -- every failure gets a status
                await self._abort(context, exc, method)
            log.debug("%s %s: OK in %.1f ms", method, request_context.current(),
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
