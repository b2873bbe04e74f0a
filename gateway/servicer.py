"""The Generation service: each RPC converts its request, calls GatewayService, converts back.

No validation, Redis or status codes here: admission validates, the service does the work,
the interceptor turns exceptions into statuses.

A worker's `error` event ends a stream with a last message (FINISH_REASON_ERROR, the worker's
text in `error`, usage and timings) and then status INTERNAL with the same text: clients that
only check the status see the failure, and clients that read messages keep the partial output.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeAlias

from gateway import convert
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

    async def Generate(self, request: pb.GenerateRequest, context: Context
                       ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream a completion of a text or token-id prompt."""
        started = time.monotonic()
        async for message in self._stream(convert.generate_input(request), context, started):
            yield message

    async def Chat(self, request: pb.ChatRequest, context: Context
                   ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream a reply to chat messages rendered with the model's template."""
        started = time.monotonic()
        async for message in self._stream(convert.chat_input(request), context, started):
            yield message

    async def _stream(self, inp: GenerationInput, context: Context, started: float
                      ) -> AsyncIterator[pb.GenerateResponse]:
        inp = dataclasses.replace(inp, request_id=bind_request_id(inp.request_id))
        chunks = self._service.generate(inp, started=started, timeout_s=context.time_remaining())
        async for chunk in chunks:
            yield convert.chunk_response(chunk)

    async def Tokenize(self, request: pb.TokenizeRequest, context: Context
                       ) -> pb.TokenizeResponse:
        """Token ids of text, or of a chat rendered with the model's template."""
        result = await self._service.tokenize(request.model, convert.tokenize_input(request))
        return convert.tokenize_response(result)

    async def ListModels(self, request: pb.ListModelsRequest, context: Context
                         ) -> pb.ListModelsResponse:
        """The models of live workers, their workers and queue depths."""
        return convert.list_models_response(await self._service.list_models())

    async def Resume(self, request: pb.ResumeRequest, context: Context
                     ) -> AsyncIterator[pb.GenerateResponse]:
        """Continue the stream of a request whose gateway went away."""
        started = time.monotonic()
        if request.request_id:  # the logs name the request (an empty id is refused)
            bind_request_id(request.request_id)
        chunks = self._service.resume(request.request_id, request.next_index, started=started,
                                      timeout_s=context.time_remaining())
        async for chunk in chunks:
            yield convert.chunk_response(chunk)

    async def Cancel(self, request: pb.CancelRequest, context: Context) -> pb.CancelResponse:
        """Cancel a queued or running request by id, on whichever gateway it streams."""
        return convert.cancel_response(await self._service.cancel(request.request_id))
