"""A small blocking client for the npuserve Generation service.

    with GenerationClient("127.0.0.1:50051") as client:
        for message in client.generate("Hello", max_tokens=32, sampling=sampling(temperature=0)):
            print(message.text, end="", flush=True)

Streams are returned as the gRPC call objects themselves, so callers can iterate them, read
their status, or `cancel()` them (which the gateway turns into a Cancel of the request).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import grpc

from protos import npuserve_pb2 as pb
from protos import npuserve_pb2_grpc as pb_grpc

FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: "",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_DEADLINE: "deadline",
    pb.FINISH_REASON_ERROR: "error",
}
"""Proto finish reasons by their short names, as the worker's engine spells them."""


def sampling(
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    repetition_penalty: float | None = None,
) -> pb.SamplingParameters:
    """SamplingParameters with only the given fields set, so unset ones keep server defaults."""
    params = pb.SamplingParameters(top_k=top_k)
    if temperature is not None:
        params.temperature = temperature
    if top_p is not None:
        params.top_p = top_p
    if seed is not None:
        params.seed = seed
    if repetition_penalty is not None:
        params.repetition_penalty = repetition_penalty
    return params


@dataclass(slots=True)
class StreamResult:
    """A whole streamed completion, gathered from its messages by `collect`."""

    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    """`index` of each message, in arrival order: lets tests check ordering and gaps."""
    finish_reason: str = ""
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_wait_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0

    def add(self, message: pb.GenerateResponse) -> None:
        """Fold one streamed message into the result."""
        self.request_id = self.request_id or message.request_id
        self.text += message.text
        self.token_ids.extend(message.token_ids)
        self.indices.append(message.index)
        if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = FINISH_REASONS[message.finish_reason]
            self.error = message.error
            self.prompt_tokens = message.usage.prompt_tokens
            self.completion_tokens = message.usage.completion_tokens
            self.queue_wait_ms = message.timings.queue_wait_ms
            self.time_to_first_token_ms = message.timings.time_to_first_token_ms
            self.total_ms = message.timings.total_ms


def collect(stream: Iterable[pb.GenerateResponse]) -> StreamResult:
    """Drain a Generate/Chat stream into one StreamResult (raises grpc.RpcError on failure)."""
    result = StreamResult()
    for message in stream:
        result.add(message)
    return result


class _CallDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, details: grpc.ClientCallDetails,
                 metadata: list[tuple[str, str | bytes]]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = details.compression


class _BearerKey(grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
                 grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Sends the API key with every call, as 'authorization: Bearer <key>' metadata."""

    def __init__(self, api_key: str) -> None:
        self._header = ("authorization", f"Bearer {api_key}")

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(details, [*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails,
                              request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: grpc.ClientCallDetails,
                               request: Any) -> Any:
        return continuation(self._details(details), request)


class GenerationClient:
    """Blocking client over one channel; safe to share between threads."""

    def __init__(self, target: str, timeout: float | None = None,
                 options: Sequence[tuple[str, Any]] = (),
                 credentials: grpc.ChannelCredentials | None = None,
                 api_key: str | None = None) -> None:
        """`timeout` is the default per-call deadline in seconds (None: no deadline);
        `credentials` (gateway.tls.channel_credentials) make the channel TLS; `api_key` is
        sent with every call."""
        self.target = target
        self.timeout = timeout
        self.channel = (grpc.insecure_channel(target, options=list(options))
                        if credentials is None
                        else grpc.secure_channel(target, credentials, options=list(options)))
        calls = self.channel if not api_key else grpc.intercept_channel(
            self.channel, _BearerKey(api_key))
        self.stub = pb_grpc.GenerationStub(calls)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                 **fields: Any) -> Iterator[pb.GenerateResponse]:
        """Stream a completion of `prompt` (text, or token ids); `fields` are GenerateRequest
        fields (model, sampling, max_tokens, stop, priority, request_id, ...)."""
        request = pb.GenerateRequest(**fields)
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        stream: Iterator[pb.GenerateResponse] = self.stub.Generate(
            request, timeout=self._deadline(timeout))
        return stream

    def chat(self, messages: Sequence[Mapping[str, str]], *, timeout: float | None = None,
             **fields: Any) -> Iterator[pb.GenerateResponse]:
        """Stream a chat reply to `messages` ([{"role": ..., "content": ...}, ...])."""
        request = pb.ChatRequest(
            messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
            **fields)
        stream: Iterator[pb.GenerateResponse] = self.stub.Chat(
            request, timeout=self._deadline(timeout))
        return stream

    def tokenize(self, text: str, model: str = "", timeout: float | None = None) -> list[int]:
        response = self.stub.Tokenize(pb.TokenizeRequest(model=model, text=text),
                                      timeout=self._deadline(timeout))
        return list(response.token_ids)

    def list_models(self, timeout: float | None = None) -> pb.ListModelsResponse:
        response: pb.ListModelsResponse = self.stub.ListModels(
            pb.ListModelsRequest(), timeout=self._deadline(timeout))
        return response

    def resume(self, request_id: str, next_index: int, *, timeout: float | None = None
               ) -> Iterator[pb.GenerateResponse]:
        """The rest of a stream whose gateway went away, from completion index `next_index`
        (the number of tokens received), at this client's gateway."""
        return self.stub.Resume(  # type: ignore[no-any-return]
            pb.ResumeRequest(request_id=request_id, next_index=next_index),
            timeout=self._deadline(timeout))

    def cancel(self, request_id: str, timeout: float | None = None, *, tenant: str = ""
               ) -> bool:
        """Cancel a request by id (another tenant's: admin keys only); True when it was
        queued or running."""
        response = self.stub.Cancel(pb.CancelRequest(request_id=request_id, tenant=tenant),
                                    timeout=self._deadline(timeout))
        return bool(response.cancelled)

    def health(self, service: str = "", timeout: float = 2.0) -> str:
        """grpc.health.v1 status name of `service` (SERVING, NOT_SERVING, ...)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
