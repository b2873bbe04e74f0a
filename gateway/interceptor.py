"""The gRPC front end's one place where exceptions become statuses.

gateway.failures turns an exception into a neutral ErrorCode and a client message (the
request id and a logged traceback for bugs); the code's name is the gRPC status code's.

A request whose bytes do not parse (not the message the method takes, or a string field
that is not UTF-8) gets INVALID_ARGUMENT with a plain message, and the gateway logs such
requests once a minute with their count, not a traceback each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from gateway import context as request_context
from gateway import metrics
from gateway.failures import describe

log = logging.getLogger(__name__)

UNDECODABLE_LOG_INTERVAL_S = 60.0


class Undecodable:
    """Stands for a request whose bytes did not parse, so the handler can answer it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return Undecodable(str(exc) or type(exc).__name__)

    return parse


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
        self._undecodable = 0
        self._undecodable_logged = -UNDECODABLE_LOG_INTERVAL_S

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
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        return handler

    async def _refuse_undecodable(self, request: Undecodable,
                                  context: grpc.aio.ServicerContext[Any, Any],
                                  method: str) -> NoReturn:
        self._undecodable += 1
        now = time.monotonic()
        if now - self._undecodable_logged >= UNDECODABLE_LOG_INTERVAL_S:
            log.warning("%d undecodable %s requests refused since the last report (latest: "
                        "%s)", self._undecodable, _short(method), request.reason)
            self._undecodable, self._undecodable_logged = 0, now
        metrics.RPCS.labels(_short(method), grpc.StatusCode.INVALID_ARGUMENT.name).inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the request is not a valid {_short(method)} message (protobuf "
                            "bytes of the method's request type, strings in UTF-8): "
                            f"{request.reason}")
        raise AssertionError("context.abort returned")

    def _unary(self, behavior: Any, method: str) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, Undecodable):
                await self._refuse_undecodable(request, context, method)
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
            if isinstance(request, Undecodable):
                await self._refuse_undecodable(request, context, method)
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
