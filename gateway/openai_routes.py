"""POST /v1/chat/completions and /v1/completions: one request's choices through the
gateway's service, whole or as server-sent events.

Each choice is a request of its own (`n` fans out). The first chunk of every choice is
awaited before the response starts, so a refusal (a bad field, an unknown model, a full queue,
a per-key limit) is an HTTP error with OpenAI's error body, not a stream that fails; a failure
after that ends the stream with an `error` event and `data: [DONE]`.

A client that goes away cancels its requests: a stream's body iterator is cancelled by the
server, a whole response's work is watched for `http.disconnect`. Either way the service
cancels the queued or running requests in the background, and the worker stops within a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from common.errors import InvalidRequestError
from gateway import context, metrics
from gateway.api_keys import Caller
from gateway.failures import describe
from gateway.openai_format import DONE, Kind, error_body, sse
from gateway.openai_format import Response as Output
from gateway.openai_schema import ChatCompletionRequest, CompletionRequest
from gateway.service import GatewayService
from gateway.types import Chunk

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-request-timeout"
"""Seconds the request may take in all; the body's `timeout` wins when both are set."""
_warned: set[str] = set()


async def parse(request: Request, model: type[Any]) -> Any:
    """The JSON body as `model`; INVALID_ARGUMENT naming the first bad field."""
    try:
        raw = await request.json()
    except ValueError as exc:
        raise InvalidRequestError("body", f"is not valid JSON ({exc})") from None
    try:
        body = model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequestError(where, first["msg"].lower()) from None
    for name in body.unknown_fields():
        if name not in _warned:
            _warned.add(name)
            log.warning("ignoring the request field %r, which npuserve does not know", name)
    return body


def timeout_s(request: Request, body: Any) -> float | None:
    if body.timeout is not None:
        return float(body.timeout)
    header = request.headers.get(TIMEOUT_HEADER)
    if header is None:
        return None
    try:
        value = float(header)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InvalidRequestError(TIMEOUT_HEADER, f"must be seconds > 0, got {header!r}")
    return value


async def completions(request: Request, kind: Kind, service: GatewayService,
                      caller: Callable[[Request], Caller]) -> Response:
    """Serve one completions request of `kind`."""
    started = time.monotonic()
    with metrics.counting_rejections():
        who = caller(request)
        body = await parse(request, ChatCompletionRequest if kind == "chat"
                           else CompletionRequest)
        inputs = body.generation_inputs(context.bind_request_id(body.request_id))
        limit = timeout_s(request, body)
        model = (await service.registry.resolve(body.model, tokenizer=False)).meta.name
    logprobs = bool(inputs[0].params.logprobs)
    include_usage = bool(body.stream and body.stream_options and
                         body.stream_options.include_usage)
    output = Output(kind, model, len(inputs), logprobs=logprobs, include_usage=include_usage)
    streams = [service.generate(inp, caller=who, started=started, timeout_s=limit)
               for inp in inputs]
    # every choice starts at once; the response starts once each has its first chunk
    pending = [asyncio.ensure_future(anext(s)) for s in streams]
    try:
        firsts: list[Chunk] = list(await asyncio.gather(*pending))
    except BaseException:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await _close(streams)
        raise
    if body.stream:
        return StreamingResponse(
            _events(output, kind, firsts, streams), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    work = asyncio.ensure_future(_whole(output, firsts, streams))
    if not await _unless_disconnected(request, work):
        return Response(status_code=499)
    return JSONResponse(work.result())


async def _whole(output: Output, firsts: list[Chunk], streams: list[AsyncIterator[Chunk]]
                 ) -> dict[str, Any]:
    try:
        async for index, chunk in _merged(firsts, streams):
            output.add(index, chunk)
    finally:
        await _close(streams)
    return output.whole()


async def _events(output: Output, kind: Kind, firsts: list[Chunk],
                  streams: list[AsyncIterator[Chunk]]) -> AsyncIterator[bytes]:
    """The SSE body; an error after the start is an `error` event, then [DONE]."""
    try:
        if kind == "chat":
            for i in range(len(streams)):
                yield sse(output.first(i))
        async for index, chunk in _merged(firsts, streams):
            if (event := output.add(index, chunk)) is not None:
                yield sse(event)
        if output.include_usage:
            yield sse(output.usage_chunk())
    except Exception as exc:  # noqa: BLE001 -- the stream has started: report, then end it
        code, message = describe(exc, "stream")
        yield sse(error_body(code, message))
    finally:
        await _close(streams)
    yield DONE


async def _merged(firsts: list[Chunk], streams: list[AsyncIterator[Chunk]]
                  ) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) of every stream as they come, each stream's first chunk first;
    a failing stream fails the whole."""
    for i, first in enumerate(firsts):
        yield i, first
    live = [i for i, first in enumerate(firsts) if not first.finish_reason]
    if len(live) == 1:
        async for chunk in streams[live[0]]:
            yield live[0], chunk
        return
    queue: asyncio.Queue[tuple[int, Chunk | None | BaseException]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for chunk in streams[i]:
                await queue.put((i, chunk))
            await queue.put((i, None))
        except Exception as exc:  # noqa: BLE001 -- handed to the consumer, which raises it
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i)) for i in live]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _close(streams: list[AsyncIterator[Chunk]]) -> None:
    """End every choice's generator (its cleanup cancels what is still queued or running)."""
    for stream in streams:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):  # already failed: its error was reported
                await aclose()


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> bool:
    """Wait for `work`; False (and `work` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        task.result()  # raises the work's error
        return True
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    log.info("client disconnected; its requests are cancelled")
    return False

