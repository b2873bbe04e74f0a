"""Protobuf <-> gateway types."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from common.errors import InvalidRequestError
from common.sampling_params import SamplingParams
from gateway import convert
from gateway.types import Chunk, ModelListing, Timings, WorkerInfo
from protos import npuserve_pb2 as pb


def test_unset_sampling_fields_keep_the_defaults_and_floats_read_as_typed() -> None:
    inp = convert.generate_input(pb.GenerateRequest(
        model="m", text="hi", max_tokens=7, stop=["\n"], stop_token_ids=[3], priority=2,
        request_id="r", logprobs=True, sampling=pb.SamplingParameters(top_p=0.9, min_p=0.05)))
    assert inp.params == SamplingParams(max_tokens=7, top_p=0.9, min_p=0.05, stop=("\n",),
                                        stop_token_ids=(3,), logprobs=True)
    assert (inp.model, inp.prompt.text, inp.priority, inp.request_id) == ("m", "hi", 2, "r")
    greedy = convert.generate_input(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[1, 2]),
        sampling=pb.SamplingParameters(temperature=0, seed=0, repetition_penalty=1.1)))
    assert greedy.params.temperature == 0 and greedy.params.seed == 0
    assert greedy.params.repetition_penalty == 1.1 and greedy.prompt.token_ids == [1, 2]


def test_a_request_without_a_prompt_or_input_names_the_oneof() -> None:
    with pytest.raises(InvalidRequestError, match="prompt: set either text or token_ids"):
        convert.generate_input(pb.GenerateRequest(model="m"))
    with pytest.raises(InvalidRequestError, match="input: set either text or chat"):
        convert.tokenize_input(pb.TokenizeRequest(model="m"))


def test_chat_messages_become_role_content_dicts() -> None:
    inp = convert.chat_input(pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")]))
    assert inp.prompt.messages == [{"role": "user", "content": "x"}]
    assert inp.prompt.field == "messages"


def test_only_the_last_chunk_carries_finish_reason_usage_and_timings() -> None:
    token = convert.chunk_response(Chunk("r", 3, "a", [5], [-0.5]))
    assert (token.index, list(token.token_ids), list(token.logprobs)) == (3, [5], [-0.5])
    assert not token.HasField("usage") and not token.HasField("timings")
    last = convert.chunk_response(Chunk("r", 4, finish_reason="error", error="boom",
                                        prompt_tokens=2, completion_tokens=4,
                                        timings=Timings(1.0, 2.0, 3.0)))
    assert last.finish_reason == pb.FINISH_REASON_ERROR and last.error == "boom"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, 4)
    assert (last.timings.queue_wait_ms, last.timings.total_ms) == (1.0, 3.0)


def test_listings_and_cancel_replies() -> None:
    reply = convert.list_models_response([ModelListing(
        "m", 64, [WorkerInfo("w", "m", "torch", "cpu", capacity=2, running=1)], 5)])
    assert reply.models[0].queued == 5 and reply.models[0].workers[0].running == 1
    idle = convert.list_models_response([ModelListing("m", 64, [WorkerInfo(
        "w", "m", "torch", "cpu", capacity=2, draining=True)], 0)])
    assert idle.models[0].HasField("queued")  # JSON shows "queued": 0
    assert json_format.MessageToDict(idle)["models"][0]["queued"] == 0
    assert idle.models[0].workers[0].draining
    assert convert.cancel_response(True).cancelled
