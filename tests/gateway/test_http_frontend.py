"""The OpenAI-compatible HTTP front end against a real gateway and Redis, a stand-in worker
answering: the `openai` client (async and sync), SSE framing over plain HTTP, errors, fan-out,
cancellation on disconnect, and the small endpoints."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from common.protocol import QueuedRequest, ReplyEvent
from gateway.types import PromptInput
from tests.gateway.conftest import MODEL, Stack, StackFactory

pytestmark = pytest.mark.anyio
EOS = 0
"""The stand-in worker's stop token (any id: a stop token's text is never shown)."""


@asynccontextmanager
async def http_stack(gateway_stack: StackFactory, **config: Any
                     ) -> AsyncIterator[tuple[Stack, str]]:
    async with gateway_stack(http_listen="127.0.0.1:0", **config) as s:
        yield s, f"http://127.0.0.1:{s.gateway.http_port}"


async def token_ids(s: Stack, text: str) -> list[int]:
    """As the gateway tokenizes (without an API key, whatever the gateway needs)."""
    return (await s.gateway.core.service.tokenize(MODEL, PromptInput(text=text))).token_ids


async def answer(s: Stack, text: str, *, finish: str = "stop", top: bool = False
                 ) -> QueuedRequest:
    """Take the next queued request and stream `text` as its completion, token by token."""
    request = await s.worker.take()
    ids = await token_ids(s, text)
    if finish == "stop":
        ids.append(EOS)  # as a worker ends a request on EOS: the token is no text
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        await s.worker.send(s.gateway_id, ReplyEvent(
            request.request_id, i, t, -0.5 - i if request.params.logprobs else None,
            top_logprobs=[(t, -0.5 - i), (1, -9.0)] if top else None,
            finish_reason=finish if last else "", prompt_tokens=3 if last else 0,
            completion_tokens=len(ids) if last else 0))
    return request


async def test_the_openai_client_streams_a_chat_reply_with_usage(
        gateway_stack: StackFactory) -> None:
    async with http_stack(gateway_stack) as (s, base):
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused")
        # the response starts with the first token: answer as the request arrives
        worker = asyncio.create_task(answer(s, " hello there, friend"))
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello"}], stream=True,
            stream_options={"include_usage": True}, max_tokens=20, temperature=0.0)
        chunks = [c async for c in stream]
        request = await worker
        await client.close()
    assert request.params.max_tokens == 20 and request.params.temperature == 0.0
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " hello there, friend"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 3 and chunks[-1].usage.total_tokens > 3
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


async def test_a_whole_completion_with_top_logprobs_in_the_legacy_form(
        gateway_stack: StackFactory) -> None:
    async with http_stack(gateway_stack) as (s, base):
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused")
        call = asyncio.create_task(client.completions.create(
            model=MODEL, prompt="Once upon", max_tokens=8, logprobs=2, seed=7))
        request = await answer(s, " a time", finish="length", top=True)
        reply = await call
        await client.close()
    assert (request.params.logprobs, request.params.top_logprobs, request.params.seed) == (
        True, 2, 7)
    choice = reply.choices[0]
    assert (choice.text, choice.finish_reason, reply.object) == (" a time", "length",
                                                                 "text_completion")
    assert choice.logprobs is not None
    tokens = choice.logprobs.tokens or []
    assert "".join(tokens) == " a time"
    assert choice.logprobs.token_logprobs == [-0.5 - i for i in range(len(tokens))]
    assert choice.logprobs.text_offset == [sum(map(len, tokens[:i])) for i in range(len(tokens))]
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs or [])
    assert reply.usage is not None and reply.usage.prompt_tokens == 3


async def test_chat_logprobs_carry_each_tokens_bytes_and_alternatives(
        gateway_stack: StackFactory) -> None:
    async with http_stack(gateway_stack) as (s, base):
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            call = asyncio.create_task(http.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "logprobs": True, "top_logprobs": 2}))
            await answer(s, " ok", top=True)
            reply = (await call).json()
    content = reply["choices"][0]["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == " ok"
    assert all(bytes(c["bytes"]).decode() == c["token"] for c in content)
    assert all(len(c["top_logprobs"]) == 2 for c in content)
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": " ok"}


async def test_sse_framing_ends_with_done_and_chinese_arrives_whole(
        gateway_stack: StackFactory) -> None:
    text = "你好，世界！这是一次测试。"
    async with http_stack(gateway_stack) as (s, base):
        ids = await token_ids(s, text)
        assert len(ids) > 4, "the tokenizer should split the Chinese text into pieces"
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            worker = asyncio.create_task(answer(s, text))
            async with http.stream("POST", "/v1/chat/completions", json={
                    "model": MODEL, "stream": True,
                    "messages": [{"role": "user", "content": "说点什么"}]}) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                raw = b"".join([part async for part in response.aiter_raw()])
                await worker
    events = raw.decode("utf-8").split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content", "")
              for e in events[:-2]]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


async def test_refusals_are_openai_errors_with_the_right_status(
        gateway_stack: StackFactory) -> None:
    async with http_stack(gateway_stack) as (s, base):
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="no-such-model", messages=messages)
        assert "no-such-model" in missing.value.message
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model=MODEL, messages=messages,
                                                 temperature=-1)
        assert bad.value.body["param"] == "temperature"  # type: ignore[index]
        assert bad.value.body["type"] == "invalid_request_error"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError, match="tool and function calling"):
            await client.chat.completions.create(model=MODEL, messages=messages, tools=[{
                "type": "function", "function": {"name": "f", "parameters": {}}}])
        with pytest.raises(openai.BadRequestError, match="needs logprobs"):
            await client.chat.completions.create(model=MODEL, messages=messages,
                                                 top_logprobs=3)
        with pytest.raises(openai.BadRequestError, match="content parts of type 'image_url'"):
            await client.chat.completions.create(model=MODEL, messages=[{
                "role": "user", "content": [{"type": "image_url",
                                             "image_url": {"url": "http://x/y.png"}}]}])
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            broken = await http.post("/v1/completions", content=b"{not json",
                                     headers={"content-type": "application/json"})
            assert broken.status_code == 400
            assert broken.json()["error"]["param"] == "body"
            missing_field = await http.post("/v1/completions", json={"model": MODEL})
            assert missing_field.status_code == 400
            assert missing_field.json()["error"]["param"] == "prompt"
            late = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x"},
                                   headers={"x-request-timeout": "soon"})
            assert late.status_code == 400 and "x-request-timeout" in late.text
        await client.close()
        assert await s.queued() == 0


async def test_a_full_queue_is_429_and_a_timeout_is_504(gateway_stack: StackFactory) -> None:
    async with http_stack(gateway_stack, max_queued_per_model=1) as (s, base):
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            first = asyncio.create_task(http.post("/v1/completions", json={
                "model": MODEL, "prompt": "one", "timeout": 1.0}))
            while await s.queued() < 1:
                await asyncio.sleep(0.02)
            full = await http.post("/v1/completions", json={"model": MODEL, "prompt": "two"})
            assert full.status_code == 429, full.text
            assert full.json()["error"]["type"] == "rate_limit_error"
            assert "--max-queued 1" in full.json()["error"]["message"]
            timed_out = await first  # nobody answers it within its second
            assert timed_out.status_code == 504, timed_out.text


async def test_n_fans_out_into_requests_of_their_own(gateway_stack: StackFactory) -> None:
    async with http_stack(gateway_stack) as (s, base):
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            call = asyncio.create_task(http.post("/v1/completions", json={
                "model": MODEL, "prompt": "x", "n": 2, "seed": 5, "request_id": "fan"}))
            first = await answer(s, " one")
            second = await answer(s, " two")
            reply = (await call).json()
            one_tokens = len(await token_ids(s, " one")) + 1  # and the stop token
    assert {first.request_id, second.request_id} == {"fan-0", "fan-1"}
    assert {first.params.seed, second.params.seed} == {5, 6}
    texts = {c["index"]: c["text"] for c in reply["choices"]}
    by_id = {first.request_id: " one", second.request_id: " two"}
    assert texts == {0: by_id["fan-0"], 1: by_id["fan-1"]}
    assert reply["usage"]["completion_tokens"] == 2 * one_tokens


async def test_a_client_that_disconnects_cancels_its_request(
        gateway_stack: StackFactory) -> None:
    async with http_stack(gateway_stack) as (s, base):
        for stream in (True, False):
            rid = f"gone-{stream}"
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                call = asyncio.create_task(http.post("/v1/chat/completions", json={
                    "model": MODEL, "stream": stream, "request_id": rid,
                    "messages": [{"role": "user", "content": "hi"}]}))
                request = await s.worker.take()
                ids = await token_ids(s, " a b")
                await s.worker.send(s.gateway_id, ReplyEvent(rid, 0, ids[0]))
                await asyncio.sleep(0.2)
                call.cancel()  # the client goes away mid-stream
                await asyncio.gather(call, return_exceptions=True)
            deadline = time.monotonic() + 5
            while not await s.r.exists(s.keys.cancel(MODEL, request.request_id)):
                assert time.monotonic() < deadline, f"{rid} was not cancelled"
                await asyncio.sleep(0.02)


async def test_models_tokenize_detokenize_health_metrics_and_the_chat_page(
        gateway_stack: StackFactory) -> None:
    async with http_stack(gateway_stack) as (s, base):
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused")
        models = await client.models.list()
        await client.close()
        assert [m.id for m in models.data] == [MODEL]
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            tokens = (await http.post("/tokenize", json={"model": MODEL,
                                                         "prompt": "Hello world"})).json()
            assert tokens["tokens"] == await token_ids(s, "Hello world")
            assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] > 0
            text = (await http.post("/detokenize", json={"model": MODEL,
                                                         "tokens": tokens["tokens"]})).json()
            assert text == {"prompt": "Hello world"}
            bad = await http.post("/detokenize", json={"model": MODEL, "tokens": [10**9]})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens[0]"
            deadline = time.monotonic() + 5
            while (health := await http.get("/health")).status_code != 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert health.json() == {"status": "SERVING", "models": [MODEL]}
            metrics = (await http.get("/metrics")).text
            assert 'npuserve_gateway_http_requests_total{path="/tokenize",status="200"}' \
                in metrics
            page = await http.get("/", follow_redirects=True)
            assert page.status_code == 200 and "<title>npuserve chat</title>" in page.text
            assert (await http.get("/nowhere")).status_code == 404


def test_the_sync_openai_client_streams_too(gateway_stack: StackFactory) -> None:
    async def run() -> str:
        async with http_stack(gateway_stack) as (s, base):
            def call() -> str:
                client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
                stream = client.completions.create(model=MODEL, prompt="x", stream=True)
                return "".join(c.choices[0].text for c in stream if c.choices)

            worker = asyncio.create_task(answer(s, " sync works"))
            text = await asyncio.to_thread(call)
            await worker
            return text

    assert asyncio.run(run()) == " sync works"


async def test_api_keys_guard_the_api_but_not_health_metrics_or_the_page(
        gateway_stack: StackFactory, tmp_path: Path) -> None:
    from gateway.api_keys import Caller, Role, append_key, hash_key, new_key

    key, path = new_key(), tmp_path / "keys.toml"
    append_key(path, Caller("web", "acme", Role.CALLER, max_priority=5), hash_key(key))
    async with http_stack(gateway_stack, api_keys=str(path)) as (s, base):
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            for path_ in ("/v1/models", "/tokenize"):
                denied = await http.request("GET" if path_ == "/v1/models" else "POST",
                                            path_, json={"prompt": "x"})
                assert denied.status_code == 401, denied.text
                assert denied.json()["error"]["type"] == "authentication_error"
                assert denied.headers["www-authenticate"] == "Bearer"
            forged = await http.get("/v1/models",
                                    headers={"Authorization": f"Bearer {new_key()}"})
            assert forged.status_code == 401 and "not valid" in forged.text
            for open_ in ("/metrics", "/chat"):
                assert (await http.get(open_)).status_code == 200
            keyed = {"Authorization": f"Bearer {key}"}
            assert (await http.get("/v1/models", headers=keyed)).status_code == 200
            too_high = await http.post("/v1/completions", headers=keyed, json={
                "model": MODEL, "prompt": "x", "priority": 9})
            assert too_high.status_code == 403 and "max_priority" in too_high.text
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key)
        call = asyncio.create_task(client.completions.create(model=MODEL, prompt="hi"))
        request = await answer(s, " welcome")
        assert request.tenant == "acme" and request.request_id.startswith("acme/")
        assert (await call).choices[0].text == " welcome"
        await client.close()


async def test_concurrent_streams_each_get_their_own_reply(gateway_stack: StackFactory) -> None:
    async with http_stack(gateway_stack) as (s, base):
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused")

        async def ask(i: int) -> str:
            stream = await client.completions.create(
                model=MODEL, prompt=f"p{i}", stream=True, extra_body={"request_id": f"c{i}"})
            return "".join([c.choices[0].text async for c in stream if c.choices])

        calls = [asyncio.create_task(ask(i)) for i in range(6)]
        for _ in range(6):  # answer them in whatever order they were queued
            request = await s.worker.take()
            await s.worker.send(s.gateway_id, *[
                ReplyEvent(request.request_id, i, t) for i, t in
                enumerate(await token_ids(s, f" reply to {request.request_id}"))])
            await s.worker.send(s.gateway_id, ReplyEvent(
                request.request_id, -1, finish_reason="length", completion_tokens=len(
                    await token_ids(s, f" reply to {request.request_id}"))))
        replies = await asyncio.gather(*calls)
        await client.close()
    assert replies == [f" reply to c{i}" for i in range(6)]
