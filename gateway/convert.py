"""Protobuf <-> the gateway's own types: the only gateway module that reads or builds messages.

Proto floats are 32-bit; they are rounded back to the 7 significant digits a client typed,
so `top_p=1.1` is reported as 1.1, not 1.100000023841858.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.errors import InvalidRequestError
from common.sampling_params import SamplingParams
from gateway.types import Chunk, GenerationInput, ModelListing, PromptInput, TokenizeResult
from protos import npuserve_pb2 as pb

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "deadline": pb.FINISH_REASON_DEADLINE,
    "error": pb.FINISH_REASON_ERROR,
}


def _f32(value: float) -> float:
    return float(f"{value:.7g}")


def sampling_params(s: pb.SamplingParameters, req: pb.GenerateRequest | pb.ChatRequest
                    ) -> SamplingParams:
    """The request's sampling settings; unset optional fields keep SamplingParams' defaults.

    Not validated here: admission does that, naming the field.
    """
    defaults = SamplingParams()
    return SamplingParams(
        max_tokens=req.max_tokens,
        temperature=_f32(s.temperature) if s.HasField("temperature") else defaults.temperature,
        top_k=s.top_k,
        top_p=_f32(s.top_p) if s.HasField("top_p") else defaults.top_p,
        min_p=_f32(s.min_p),
        repetition_penalty=(_f32(s.repetition_penalty) if s.HasField("repetition_penalty")
                            else defaults.repetition_penalty),
        presence_penalty=_f32(s.presence_penalty),
        frequency_penalty=_f32(s.frequency_penalty),
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(req.stop),
        stop_token_ids=tuple(req.stop_token_ids),
        ignore_eos=req.ignore_eos,
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs,
    )


def messages(items: Iterable[pb.ChatMessage]) -> list[dict[str, str]]:
    """Chat messages as {role, content} dicts (roles are checked by the chat renderer)."""
    return [{"role": m.role, "content": m.content} for m in items]


def generate_input(req: pb.GenerateRequest) -> GenerationInput:
    """A Generate call as a GenerationInput; its prompt is text or token ids."""
    which = req.WhichOneof("prompt")
    if which is None:
        raise InvalidRequestError("prompt", "set either text or token_ids")
    prompt = (PromptInput(text=req.text) if which == "text"
              else PromptInput(token_ids=list(req.token_ids.ids)))
    return GenerationInput(model=req.model, prompt=prompt,
                           params=sampling_params(req.sampling, req),
                           priority=req.priority, request_id=req.request_id)


def chat_input(req: pb.ChatRequest) -> GenerationInput:
    """A Chat call as a GenerationInput whose prompt is its messages."""
    return GenerationInput(model=req.model, prompt=PromptInput(messages=messages(req.messages)),
                           params=sampling_params(req.sampling, req),
                           priority=req.priority, request_id=req.request_id)


def tokenize_input(req: pb.TokenizeRequest) -> PromptInput:
    """The text or chat to tokenize."""
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("input", "set either text or chat")
    if which == "text":
        return PromptInput(text=req.text)
    return PromptInput(messages=messages(req.chat.messages))


def chunk_response(chunk: Chunk) -> pb.GenerateResponse:
    """One stream message; the last one carries finish_reason, usage and timings."""
    out = pb.GenerateResponse(request_id=chunk.request_id, text=chunk.text,
                              token_ids=chunk.token_ids, index=max(chunk.index, 0),
                              logprobs=chunk.logprobs, tokens=chunk.tokens,
                              top_logprobs=[pb.TopLogprobs(token_ids=[t for t, _, _ in top],
                                                           logprobs=[lp for _, lp, _ in top],
                                                           tokens=[s for _, _, s in top])
                                            for top in chunk.top_logprobs])
    if chunk.finish_reason:
        out.finish_reason = FINISH_REASONS.get(chunk.finish_reason,
                                               pb.FINISH_REASON_UNSPECIFIED)
        out.error = chunk.error
        out.usage.prompt_tokens = chunk.prompt_tokens
        out.usage.completion_tokens = chunk.completion_tokens
    if chunk.timings is not None:
        out.timings.queue_wait_ms = chunk.timings.queue_wait_ms
        out.timings.time_to_first_token_ms = chunk.timings.time_to_first_token_ms
        out.timings.total_ms = chunk.timings.total_ms
    return out


def tokenize_response(result: TokenizeResult) -> pb.TokenizeResponse:
    """Token ids with the text each one covers."""
    return pb.TokenizeResponse(token_ids=result.token_ids, tokens=result.tokens)


def list_models_response(models: list[ModelListing]) -> pb.ListModelsResponse:
    """The served models, each with its live workers and queue depth."""
    return pb.ListModelsResponse(models=[
        pb.ModelInfo(
            name=m.name, max_context=m.max_context, queued=m.queued,
            workers=[pb.WorkerInfo(id=w.id, backend=w.backend, device=w.device,
                                   capacity=w.capacity, running=w.running,
                                   draining=w.draining)
                     for w in m.workers],
        )
        for m in models
    ])


def cancel_response(cancelled: bool) -> pb.CancelResponse:
    """Whether the request was queued or running."""
    return pb.CancelResponse(cancelled=cancelled)
