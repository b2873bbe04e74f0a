"""The Generation service end to end: a real gRPC server and Redis, a stand-in worker that
takes requests off the queue and writes reply events to the gateway's stream."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest

from common.errors import DeadlineExceededError, ErrorCode
from common.protocol import ORPHANED, ReplyEvent, encode_events
from common.sampling_params import SamplingParams
from gateway.types import GenerationInput, PromptInput
from preprocess.tokenizer import load_tokenizer
from protos import npuserve_pb2 as pb
from tests.gateway.conftest import MAX_LEN, MODEL, Stack, StackFactory

pytestmark = pytest.mark.anyio


def gen(**kw: object) -> pb.GenerateRequest:
    fields: dict[str, object] = {"model": MODEL, "text": "Hello world", "max_tokens": 4}
    fields.update(kw)
    return pb.GenerateRequest(**fields)  # type: ignore[arg-type]


async def failure(call: object) -> grpc.aio.AioRpcError:
    """Drain a call and return the error it ended with."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(call, "__aiter__"):
            async for _ in call:  # type: ignore[attr-defined]
                pass
        else:
            await call  # type: ignore[misc]
    return info.value


async def until(predicate_coro: object, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate_coro():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_the_services_own_deadline_ends_a_request_nobody_answers(
        gateway_stack: StackFactory) -> None:
    """Front ends without a transport deadline (HTTP) rely on the service's own."""
    async with gateway_stack() as s:
        service = s.gateway.core.service
        await service.tokenize(MODEL, PromptInput(text="warm the tokenizer"))
        started = time.monotonic()
        stream = service.generate(GenerationInput(MODEL, PromptInput(text="hi"),
                                                  SamplingParams(max_tokens=4)),
                                  started=started, timeout_s=0.5)
        with pytest.raises(DeadlineExceededError, match="before the first token"):
            await asyncio.wait_for(anext(stream), 5)
        assert 0.5 <= time.monotonic() - started < 2


async def test_top_logprobs_reach_the_client_with_each_tokens_text(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack() as s:
        call = s.stub.Generate(gen(request_id="r-top", logprobs=True, top_logprobs=2,
                                   max_tokens=2))
        q = await s.worker.take()
        assert (q.params.logprobs, q.params.top_logprobs) == (True, 2)
        out = (await s.stub.Tokenize(pb.TokenizeRequest(model=MODEL, text=" one two"))
               ).token_ids
        await s.worker.send(s.gateway_id, ReplyEvent(
            "r-top", 0, out[0], -0.5, top_logprobs=[(out[0], -0.5), (out[1], -1.5)]))
        await s.worker.send(s.gateway_id, ReplyEvent(
            "r-top", 1, out[1], -0.25, top_logprobs=[(out[1], -0.25), (out[0], -3.0)],
            finish_reason="length", completion_tokens=2))
        messages = [m async for m in call]
    assert [list(m.tokens) for m in messages] == [[" one"], [" two"]]
    first = messages[0].top_logprobs[0]
    assert (list(first.token_ids), list(first.tokens)) == ([out[0], out[1]], [" one", " two"])
    assert list(first.logprobs) == [-0.5, -1.5]
    assert list(messages[1].top_logprobs[0].logprobs) == [-0.25, -3.0]


async def test_top_logprobs_without_logprobs_is_refused(gateway_stack: StackFactory) -> None:
    async with gateway_stack() as s:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in s.stub.Generate(gen(top_logprobs=3)):
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_logprobs: needs logprobs" in (info.value.details() or "")


async def test_generate_relays_each_event_then_a_final_message_with_usage_and_timings(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack() as s:
        call = s.stub.Generate(gen(request_id="r1", logprobs=True, max_tokens=3))
        q = await s.worker.take()
        ids = (await s.stub.Tokenize(pb.TokenizeRequest(model=MODEL, text="Hello world"))).token_ids
        assert (q.request_id, q.gateway_id, q.model) == ("r1", s.gateway_id, MODEL)
        assert q.prompt_ids == list(ids) and q.params.max_tokens == 3 and q.params.logprobs
        assert q.deadline_ms == 0 and q.priority == 0
        out = (await s.stub.Tokenize(pb.TokenizeRequest(model=MODEL, text=" one two three"))
               ).token_ids
        await s.worker.send(s.gateway_id, ReplyEvent("r1", 0, out[0], -0.5, queue_ms=7),
                            ReplyEvent("r1", 1, out[1], -0.25))
        await s.worker.send(s.gateway_id, ReplyEvent(
            "r1", 2, out[2], -0.125, finish_reason="length", prompt_tokens=len(ids),
            completion_tokens=3))
        messages = [m async for m in call]
        assert await call.code() == grpc.StatusCode.OK
    assert [(m.index, list(m.token_ids), m.text, list(m.logprobs)) for m in messages] == [
        (0, [out[0]], " one", [-0.5]), (1, [out[1]], " two", [-0.25]),
        (2, [out[2]], " three", [-0.125])]
    assert [m.finish_reason for m in messages] == [0, 0, pb.FINISH_REASON_LENGTH]
    last = messages[-1]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(ids), 3)
    assert last.timings.queue_wait_ms == 7
    assert 0 < last.timings.time_to_first_token_ms <= last.timings.total_ms
    assert not messages[0].HasField("timings")


async def test_chat_renders_the_template_and_default_max_tokens_fits_the_context(
        gateway_stack: StackFactory) -> None:
    messages = [pb.ChatMessage(role="system", content="Be brief."),
                pb.ChatMessage(role="user", content="Hi")]
    async with gateway_stack() as s:
        call = s.stub.Chat(pb.ChatRequest(model="", messages=messages, request_id="c1"))
        q = await s.worker.take()
        rendered = await s.stub.Tokenize(pb.TokenizeRequest(
            model=MODEL, chat=pb.ChatMessages(messages=messages)))
        assert q.prompt_ids == list(rendered.token_ids) and q.model == MODEL
        assert rendered.tokens[0] == "<|im_start|>" and "".join(rendered.tokens).endswith(
            "<|im_start|>assistant\n")
        assert q.params.max_tokens == MAX_LEN - len(q.prompt_ids)
        await s.worker.send(s.gateway_id, ReplyEvent("c1", -1, finish_reason="stop"))
        assert [m.finish_reason async for m in call] == [pb.FINISH_REASON_STOP]


INVALID: list[tuple[str, object, str]] = [
    ("Generate", gen(text=""), "text:"),
    ("Generate", pb.GenerateRequest(model=MODEL), "prompt:"),
    ("Generate", gen(token_ids=pb.TokenIds(ids=[])), "token_ids:"),
    ("Generate", gen(token_ids=pb.TokenIds(ids=[1, 999_999])), "token_ids: id 999999"),
    ("Generate", gen(text="word " * 100), "text: the prompt is"),
    ("Generate", gen(max_tokens=MAX_LEN), "max_tokens: the prompt"),
    ("Generate", gen(max_tokens=100_000), "max_tokens: must be <= 8192"),
    ("Generate", gen(sampling=pb.SamplingParameters(temperature=-1)), "sampling.temperature:"),
    ("Generate", gen(sampling=pb.SamplingParameters(top_p=0)), "sampling.top_p:"),
    ("Generate", gen(sampling=pb.SamplingParameters(top_p=1.1)), "got 1.1"),
    ("Generate", gen(sampling=pb.SamplingParameters(min_p=2)), "sampling.min_p:"),
    ("Generate", gen(sampling=pb.SamplingParameters(repetition_penalty=0)),
     "sampling.repetition_penalty:"),
    ("Generate", gen(sampling=pb.SamplingParameters(presence_penalty=3)),
     "sampling.presence_penalty:"),
    ("Generate", gen(sampling=pb.SamplingParameters(frequency_penalty=-3)),
     "sampling.frequency_penalty:"),
    ("Generate", gen(sampling=pb.SamplingParameters(seed=2**63)), "sampling.seed:"),
    ("Generate", gen(priority=12), "priority: must be in [0, 9], got 12"),
    ("Generate", gen(stop=[""]), "stop:"),
    ("Generate", gen(stop_token_ids=[200_000]), "stop_token_ids: token id 200000"),
    ("Generate", gen(request_id="has space"), "request_id:"),
    ("Chat", pb.ChatRequest(model=MODEL), "messages: is empty"),
    ("Chat", pb.ChatRequest(model=MODEL, messages=[pb.ChatMessage(role="wizard", content="x")]),
     "messages: message 0 has role 'wizard'"),
    ("Tokenize", pb.TokenizeRequest(model=MODEL), "input:"),
    ("Cancel", pb.CancelRequest(), "request_id: is required"),
]


async def test_every_invalid_field_is_invalid_argument_naming_it_and_serving_goes_on(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack() as s:
        for method, request, expected in INVALID:
            error = await failure(getattr(s.stub, method)(request))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (expected, error)
            assert expected in (error.details() or ""), (expected, error.details())
        assert await s.queued() == 0
        call = s.stub.Generate(gen(request_id="ok"))
        assert (await s.worker.take()).request_id == "ok"
        call.cancel()


async def test_an_unknown_model_is_not_found_and_the_message_lists_the_served_ones(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack() as s:
        error = await failure(s.stub.Generate(gen(model="gpt-9")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == f"model 'gpt-9' is not served; served models: {MODEL}"


async def test_a_full_queue_is_resource_exhausted_naming_the_bound_and_a_disconnect_dequeues(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack(max_queued_per_model=1) as s:
        first = s.stub.Generate(gen(request_id="first"))
        await until(lambda: _equals(s.queued(), 1))
        error = await failure(s.stub.Generate(gen(request_id="second")))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-queued 1" in (error.details() or "") and MODEL in (error.details() or "")
        first.cancel()
        await until(lambda: _equals(s.queued(), 0))
        assert not await s.r.exists(s.keys.request(MODEL, "first"))


async def test_too_many_streams_is_resource_exhausted_and_a_duplicate_id_already_exists(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack(max_streams=2) as s:
        first = s.stub.Generate(gen(request_id="same"))
        await until(lambda: _equals(s.queued(), 1))
        error = await failure(s.stub.Generate(gen(request_id="same")))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS and "'same'" in error.details()
        second = s.stub.Generate(gen(request_id="other"))
        await until(lambda: _equals(s.queued(), 2))
        error = await failure(s.stub.Generate(gen(request_id="third")))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-streams 2" in (error.details() or "")
        first.cancel()
        second.cancel()


async def test_cancel_removes_a_queued_request_and_ends_its_stream_as_cancelled(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack() as s:
        call = s.stub.Generate(gen(request_id="victim"))
        await until(lambda: _equals(s.queued(), 1))
        assert (await s.stub.Cancel(pb.CancelRequest(request_id="victim"))).cancelled
        assert await s.queued() == 0
        messages = [m async for m in call]
        assert [m.finish_reason for m in messages] == [pb.FINISH_REASON_CANCELLED]
        assert not (await s.stub.Cancel(pb.CancelRequest(request_id="victim"))).cancelled


async def test_a_deadline_that_passes_in_the_queue_is_deadline_exceeded_and_dequeued(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack() as s:
        started = time.time()
        call = s.stub.Generate(gen(request_id="late"), timeout=0.6)
        await until(lambda: _equals(s.queued(), 1))
        deadline_ms = int(await s.r.hget(s.keys.request(MODEL, "late"), "deadline_ms") or 0)
        assert started * 1000 < deadline_ms <= (started + 0.7) * 1000
        error = await failure(call)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: _equals(s.queued(), 0))
        assert not await s.r.exists(s.keys.request(MODEL, "late"))


async def test_a_running_request_past_its_deadline_ends_and_its_worker_is_told_to_drop_it(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack() as s:
        call = s.stub.Generate(gen(request_id="slow"), timeout=0.8)
        await s.worker.take()
        await s.worker.send(s.gateway_id, ReplyEvent("slow", 0, 5))
        assert (await call.read()).token_ids == [5]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: s.r.exists(s.keys.cancel(MODEL, "slow")))


async def test_a_worker_deadline_event_ends_the_rpc_with_deadline_exceeded(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack() as s:
        call = s.stub.Generate(gen(request_id="d"))
        await s.worker.take()
        await s.worker.send(s.gateway_id, ReplyEvent("d", -1, finish_reason="deadline"))
        error = await failure(call)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline passed" in (error.details() or "")


async def test_a_worker_error_sends_a_final_error_message_then_ends_with_internal(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack() as s:
        call = s.stub.Generate(gen(request_id="bad"))
        await s.worker.take()
        await s.worker.send(s.gateway_id, ReplyEvent("bad", 0, 5),
                            ReplyEvent("bad", -1, finish_reason="error", error="device lost",
                                       code=ErrorCode.INTERNAL, completion_tokens=1))
        messages = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for m in call:
                messages.append(m)
    assert [m.finish_reason for m in messages] == [0, pb.FINISH_REASON_ERROR]
    assert messages[-1].error == "device lost" and messages[-1].usage.completion_tokens == 1
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "request bad failed on its worker: device lost"


async def orphan(s: Stack, rid: str, tokens: list[int]) -> None:
    """What a worker does with a request whose gateway's registration it found lapsed: sends
    the tokens it made and an ORPHANED end, and keeps them with the request for a resume."""
    end = ReplyEvent(rid, -1, finish_reason=ORPHANED, code=ErrorCode.UNAVAILABLE,
                     error="the gateway this request came through stopped heartbeating",
                     completion_tokens=len(tokens))
    published = await s.r.lrange(s.keys.tokens(MODEL, rid), 0, -1)
    if tokens[len(published):]:
        await s.r.rpush(s.keys.tokens(MODEL, rid), *tokens[len(published):])
    await s.r.hset(s.keys.request(MODEL, rid), "final", encode_events([end]))
    await s.worker.send(s.gateway_id, *[ReplyEvent(rid, i, t) for i, t in enumerate(tokens)],
                        end)


async def test_a_stream_its_worker_stopped_as_orphaned_is_queued_again_and_goes_on(
        gateway_stack: StackFactory) -> None:
    """The gateway's registration lapsed for a moment (a stall) and the worker stopped the
    request: the gateway, still streaming it, queues it again and its client gets every
    token once, without an error."""
    async with gateway_stack() as s:
        call = s.stub.Generate(gen(request_id="o", max_tokens=6))
        rid = (await s.worker.take()).request_id
        await orphan(s, rid, [11, 12, 13])
        again = await s.worker.take()
        assert again.request_id == rid
        assert await s.r.lrange(s.keys.tokens(MODEL, rid), 0, -1) == ["11", "12", "13"]
        await s.worker.send(s.gateway_id, ReplyEvent(rid, 2, 13), ReplyEvent(rid, 3, 14),
                            ReplyEvent(rid, 4, 15),
                            ReplyEvent(rid, 5, 16, finish_reason="length",
                                       completion_tokens=6))
        messages = [m async for m in call]
    assert [m.index for m in messages] == list(range(6))
    assert [t for m in messages for t in m.token_ids] == [11, 12, 13, 14, 15, 16]
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH


async def test_a_stream_stopped_as_orphaned_again_and_again_ends_unavailable(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack() as s:
        call = s.stub.Generate(gen(request_id="o2", max_tokens=6))
        rid = (await s.worker.take()).request_id
        for tokens in ([1], [1, 2], [1, 2, 3], [1, 2, 3, 4]):
            await orphan(s, rid, tokens)
            if len(tokens) < 4:
                assert (await s.worker.take()).request_id == rid
        messages = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for m in call:
                messages.append(m)
    assert [m.index for m in messages] == [0, 1, 2, 3]
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "stopped heartbeating" in (info.value.details() or "")


async def test_a_request_error_a_worker_detects_reaches_the_client_as_invalid_argument(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack() as s:
        call = s.stub.Generate(gen(request_id="odd"))
        await s.worker.take()
        await s.worker.send(s.gateway_id, ReplyEvent(
            "odd", -1, finish_reason="error", code=ErrorCode.INVALID_ARGUMENT,
            error="logprobs: this worker's backend samples on the device and cannot return it"))
        error = await failure(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "logprobs: this worker's backend samples on the device and cannot return it")


async def test_a_stop_string_ends_the_stream_at_once_and_tells_the_worker_to_stop(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack() as s:
        call = s.stub.Generate(gen(request_id="st", stop=["two"]))
        await s.worker.take()
        out = (await s.stub.Tokenize(pb.TokenizeRequest(model=MODEL, text=" one two three"))
               ).token_ids
        await s.worker.send(s.gateway_id, ReplyEvent("st", 0, out[0]), ReplyEvent("st", 1, out[1]))
        messages = [m async for m in call]
        assert await call.code() == grpc.StatusCode.OK
        await until(lambda: s.r.exists(s.keys.cancel(MODEL, "st")))
    assert "".join(m.text for m in messages) == " one "
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP
    assert messages[-1].usage.completion_tokens == 2


async def test_list_models_reports_live_workers_capacity_and_queue_depth(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack() as s:
        call = s.stub.Generate(gen(request_id="waiting"))
        await until(lambda: _equals(s.queued(), 1))
        listing = await s.stub.ListModels(pb.ListModelsRequest())
        call.cancel()
    [model] = listing.models
    assert (model.name, model.max_context, model.queued) == (MODEL, MAX_LEN, 1)
    assert [(w.id, w.backend, w.device, w.capacity) for w in model.workers] == [
        ("w1", "torch", "cpu", 4)]


async def _equals(value: object, expected: object) -> bool:
    return await value == expected  # type: ignore[misc]


async def test_sampling_no_live_worker_can_honour_is_refused_at_admission(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack() as s:
        await s.r.hset(s.keys.worker("w1"), "sampling", "temperature,top_k")
        await asyncio.sleep(1.2)  # the registry's snapshot is at most a second old
        error = await failure(s.stub.Generate(gen(logprobs=True)))
        assert await s.queued() == 0
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("logprobs: is not supported")


async def test_a_resumed_stream_replays_nothing_and_keeps_characters_split_at_the_handover(
        gateway_stack: StackFactory, tiny_qwen3: Path) -> None:
    text = "鬱蔥 ok 🎉👨‍👩‍👧 done"
    tokenizer = load_tokenizer(tiny_qwen3)
    ids = tokenizer.encode(text)
    partial = [n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd")]
    cjk, emoji = partial[0], partial[-1]
    assert tokenizer.decode(ids[:cjk + 1]).startswith("鬱") and len(partial) > 2, partial
    async with gateway_stack() as s:
        call = s.stub.Generate(gen(request_id="rs", max_tokens=len(ids)))
        await s.worker.take()
        events = [ReplyEvent("rs", i, t) for i, t in enumerate(ids)]
        # The first worker publishes up to the middle of a CJK character and dies; the next
        # resends the token before the handover (a duplicate), goes on to the middle of an
        # emoji and drains; the third finishes.
        await s.worker.send(s.gateway_id, *events[:cjk])
        await s.worker.send(s.gateway_id, *events[cjk - 1:emoji])
        last = ReplyEvent("rs", len(ids) - 1, ids[-1], finish_reason="length",
                          completion_tokens=len(ids))
        await s.worker.send(s.gateway_id, *events[emoji - 2:-1], last)
        messages = [m async for m in call]
    assert [m.index for m in messages] == list(range(len(ids)))
    assert "".join(m.text for m in messages) == text
    assert not any("\ufffd" in m.text for m in messages)
