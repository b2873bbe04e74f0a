"""The Generation service: each RPC converts its request, calls GatewayService, converts back.

No validation, Redis or status codes here: admission validates, the service does the work,
the interceptor turns exceptions into statuses. Every call is authenticated first, by the API
key in its `authorization: Bearer <key>` metadata (when the gateway has a key file).

A worker's `error` event ends a stream with a last message (FINISH_REASON_ERROR, the worker's
text in `error`, usage and timings) and then status INTERNAL with the same text: clients that
only check the status see the failure, and clients that read messages keep the partial output.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeAlias

from gateway import convert, metrics
from gateway.api_keys import Caller, bearer
from gateway.context import bind_request_id
from gateway.service import GatewayService
from gateway.types import GenerationInput

if TYPE_CHECKING:
    import grpc.aio

    from protos import npuserve_pb2 as pb

    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class GenerationServicer:
    """npuserve.v1.Generation, registered with add_GenerationServicer_to_server."""

    def __init__(self, service: GatewayService) -> None:
        self._service = service

    def _caller(self, context: Context) -> Caller:
        metadata = {key: value for key, value in context.invocation_metadata() or ()}
        value = metadata.get("authorization")
        return self._service.authenticate(bearer(value if isinstance(value, str) else None))

    async def Generate(self, request: pb.GenerateRequest, context: Context
                       ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream a completion of a text or token-id prompt."""
        started = time.monotonic()
        with metrics.counting_rejections():
            caller = self._caller(context)
            inp = convert.generate_input(request)
        async for message in self._stream(inp, caller, context, started):
            yield message

    async def Chat(self, request: pb.ChatRequest, context: Context
                   ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream a reply to chat messages rendered with the model's template."""
        started = time.monotonic()
        with metrics.counting_rejections():
            caller = self._caller(context)
            inp = convert.chat_input(request)
        async for message in self._stream(inp, caller, context, started):
            yield message

    async def _stream(self, inp: GenerationInput, caller: Caller, context: Context,
                      started: float) -> AsyncIterator[pb.GenerateResponse]:
        with metrics.counting_rejections():
            inp = dataclasses.replace(inp, request_id=bind_request_id(inp.request_id))
        chunks = self._service.generate(inp, caller=caller, started=started,
                                        timeout_s=context.time_remaining())
        async for chunk in chunks:
            yield convert.chunk_response(chunk)

    async def Tokenize(self, request: pb.TokenizeRequest, context: Context
                       ) -> pb.TokenizeResponse:
        """Token ids of text, or of a chat rendered with the model's template."""
        self._caller(context)
        result = await self._service.tokenize(request.model, convert.tokenize_input(request))
        return convert.tokenize_response(result)

    async def ListModels(self, request: pb.ListModelsRequest, context: Context
                         ) -> pb.ListModelsResponse:
        """The models of live workers, their workers and queue depths."""
        self._caller(context)
        return convert.list_models_response(await self._service.list_models())

    async def Resume(self, request: pb.ResumeRequest, context: Context
                     ) -> AsyncIterator[pb.GenerateResponse]:
        """Continue the stream of a request whose gateway went away."""
        started = time.monotonic()
        caller = self._caller(context)
        chunks = self._service.resume(request.request_id, request.next_index, caller=caller,
                                      started=started, timeout_s=context.time_remaining())
        async for chunk in chunks:
            yield convert.chunk_response(chunk)

    async def Cancel(self, request: pb.CancelRequest, context: Context) -> pb.CancelResponse:
        """Cancel a queued or running request by id, on whichever gateway it streams."""
        caller = self._caller(context)
        return convert.cancel_response(
            await self._service.cancel(request.request_id, request.tenant, caller=caller))
