"""The whole path, for real: gRPC client -> gateway -> Redis -> workers (tiny Qwen3) -> back.

Outputs are compared token for token with the engine run in this process on the same model.
The fleet (tests/serving/conftest.py) is shared by the module; tests that need the one-slot
worker saturate it with a long "blocker" request and always cancel it before they end.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.config import EngineConfig
from common.sampling_params import SamplingParams
from gateway.client import GenerationClient, StreamResult, collect, sampling
from preprocess.control_tokens import encode_chat
from preprocess.tokenizer import load_tokenizer
from protos import npuserve_pb2 as pb
from tests.serving.conftest import Fleet, Stream, scrape, start_service, text_of, wait_until
from worker.backends.torch_settings import TorchSettings
from worker.engine.engine import Engine
from worker.processes import free_port

pytestmark = pytest.mark.timeout(240)  # the first test also waits for the fleet
GREEDY = sampling(temperature=0)
MAX_TOKENS = 8
BLOCKER: dict[str, Any] = {"model": "slot", "max_tokens": 2000, "ignore_eos": True,
                           "sampling": GREEDY}
"""Holds the one-slot worker for seconds; every test cancels it explicitly."""


@pytest.fixture(scope="module")
def engine(tiny_qwen3: Path) -> Engine:
    return Engine.from_model_dir(tiny_qwen3, EngineConfig(max_num_seqs=64),
                                 settings=TorchSettings(kv_cache_gb=0.05))


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3: Path) -> Any:
    return load_tokenizer(tiny_qwen3)


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> Iterator[GenerationClient]:
    with GenerationClient(fleet.gateway, timeout=60) as c:
        yield c


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 50000) for _ in range(rng.randint(3, 24))] for _ in range(n)]


def greedy(engine: Engine, batch: list[list[int]]) -> list[Any]:
    return engine.generate(batch, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))


def test_streamed_generate_returns_the_engines_greedy_tokens_with_usage(
        client: GenerationClient, engine: Engine, tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer.encode(text)
    seen: list[pb.GenerateResponse] = list(
        client.generate(text, model="tiny", max_tokens=MAX_TOKENS, sampling=GREEDY))
    [expected] = greedy(engine, [ids])
    streamed = [t for m in seen for t in m.token_ids]
    assert streamed == expected.token_ids
    assert [m.index for m in seen if m.token_ids] == list(range(len(streamed)))
    last = seen[-1]
    assert pb.FinishReason.Name(last.finish_reason) == "FINISH_REASON_" + (
        expected.finish_reason.value.upper())
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(ids), len(streamed))
    assert "".join(m.text for m in seen) == text_of(tokenizer, ids, expected.token_ids,
                                                    expected.finish_reason.value)
    assert last.timings.total_ms >= last.timings.time_to_first_token_ms > 0


def test_chat_renders_the_models_template(client: GenerationClient, engine: Engine,
                                         tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    ids = encode_chat(tokenizer, messages)
    result = collect(client.chat(messages, model="tiny", max_tokens=MAX_TOKENS, sampling=GREEDY))
    [expected] = greedy(engine, [ids])
    assert result.prompt_tokens == len(ids)
    assert result.token_ids == expected.token_ids
    assert client.tokenize("你好", model="tiny") == tokenizer.encode(
        "你好", add_special_tokens=False)


def test_64_concurrent_streams_each_get_their_own_greedy_output(
        client: GenerationClient, engine: Engine, tokenizer: Any) -> None:
    batch = prompts(64, seed=1)
    expected = greedy(engine, batch)

    def one(ids: list[int]) -> StreamResult:
        return collect(client.generate(ids, model="tiny", max_tokens=MAX_TOKENS, sampling=GREEDY))

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(one, batch, timeout=100))
    ids = {r.request_id for r in results}
    assert len(ids) == 64
    for ids_in, got, want in zip(batch, results, expected, strict=True):
        assert got.token_ids == want.token_ids
        assert got.text == text_of(tokenizer, ids_in, want.token_ids, want.finish_reason.value)
        assert (got.prompt_tokens, got.completion_tokens) == (len(ids_in), len(want.token_ids))
        assert got.indices == sorted(got.indices)


def start_blocker(client: GenerationClient, request_id: str) -> Stream:
    blocker = Stream(client.generate([1000, 2000, 3000], request_id=request_id, **BLOCKER))
    blocker.wait_first_token()
    return blocker


def queue_one(fleet: Fleet, client: GenerationClient, **fields: Any) -> Stream:
    """Start a stream on the one-slot model and wait until it sits in the queue."""
    before = fleet.queued("slot")
    stream = Stream(client.generate([5, 6, 7], model="slot", sampling=GREEDY,
                                    ignore_eos=True, **fields))
    wait_until(lambda: fleet.queued("slot") > before, 20, "request never queued", poll_s=0.005)
    return stream


def test_priority_9_starts_before_twenty_earlier_priority_0_requests(
        fleet: Fleet, client: GenerationClient) -> None:
    blocker = start_blocker(client, "prio-blocker")
    lows = [queue_one(fleet, client, max_tokens=2, priority=0, request_id=f"prio-low-{i:02d}")
            for i in range(20)]
    high = queue_one(fleet, client, max_tokens=2, priority=9, request_id="prio-high")
    assert client.cancel("prio-blocker"), "the blocker finished before the queue was built"
    blocker.finish()
    for stream in [high, *lows]:
        assert stream.finish().completion_tokens == 2
    assert high.first_token_at is not None
    assert all(high.first_token_at < (low.first_token_at or 0) for low in lows)
    # Within one priority, first in first out, as the client's threads see it: two first
    # tokens relayed together may land in either order, so neighbours may swap, no more.
    order = sorted(range(len(lows)), key=lambda i: lows[i].first_token_at or 0)
    assert all(abs(place - i) <= 1 for place, i in enumerate(order)), order
    assert high.result.queue_wait_ms < min(low.result.queue_wait_ms for low in lows)


def test_cancel_frees_the_slot_for_a_waiting_request(fleet: Fleet,
                                                     client: GenerationClient) -> None:
    tokens = "npuserve_worker_generated_tokens_total"
    blocker = start_blocker(client, "cancel-blocker")
    waiting = queue_one(fleet, client, max_tokens=3)
    cancelled_at = time.monotonic()
    assert client.cancel("cancel-blocker") is True
    at_cancel = scrape(fleet.slot_metrics, tokens)
    done = blocker.finish()
    assert done.finish_reason == "cancelled" or blocker.code == grpc.StatusCode.CANCELLED
    assert done.completion_tokens < BLOCKER["max_tokens"]
    assert waiting.finish().completion_tokens == 3
    assert waiting.first_token_at is not None and waiting.first_token_at - cancelled_at < 10
    # Within two steps: the one running when the flag was set, and the next, whose cancel
    # check is what the publish then in flight read (worker.publisher).
    extra = scrape(fleet.slot_metrics, tokens) - at_cancel - 3
    assert extra <= 2
    assert client.cancel("cancel-blocker") is False, "a finished request cannot be cancelled"


def test_client_disconnect_frees_the_slot(fleet: Fleet, client: GenerationClient) -> None:
    blocker = start_blocker(client, "gone-blocker")
    waiting = queue_one(fleet, client, max_tokens=3)
    blocker.call.cancel()
    blocker.finish()
    assert blocker.code == grpc.StatusCode.CANCELLED
    assert waiting.finish(30).completion_tokens == 3
    with fleet.redis() as r:
        # ended: only its last event is kept, for the stream retention
        wait_until(lambda: r.hexists(f"{fleet.prefix}req:{{slot}}:gone-blocker", "final"), 10,
                   "the disconnected request was never cleaned up")
        assert not r.exists(f"{fleet.prefix}cancel:gone-blocker")
        assert "gone-blocker" not in r.zrange(f"{fleet.prefix}lease:{{slot}}", 0, -1)


def test_request_whose_deadline_passes_while_queued_never_runs(
        fleet: Fleet, client: GenerationClient) -> None:
    tokens = "npuserve_worker_generated_tokens_total"
    before = scrape(fleet.slot_metrics, tokens)
    blocker = start_blocker(client, "deadline-blocker")
    late = collect_error(client.generate([9, 9, 9], model="slot", max_tokens=4, timeout=0.5,
                                         sampling=GREEDY, request_id="deadline-late"))
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.cancel("deadline-blocker")
    ran = blocker.finish().completion_tokens
    after = collect(client.generate([4, 4], model="slot", max_tokens=2, ignore_eos=True,
                                    sampling=GREEDY))
    # The slot worker generated the blocker's tokens and the last request's, nothing else.
    assert scrape(fleet.slot_metrics, tokens) - before == ran + after.completion_tokens
    with fleet.redis() as r:
        assert not r.exists(f"{fleet.prefix}req:{{slot}}:deadline-late")


def collect_error(stream: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        collect(stream)
    return info.value


def test_admission_beyond_the_queue_or_stream_bound_is_resource_exhausted(
        fleet: Fleet, client: GenerationClient) -> None:
    blocker = start_blocker(client, "admit-blocker")
    with GenerationClient(fleet.tight, timeout=60) as tight:
        queued = [queue_one(fleet, tight, max_tokens=2) for _ in range(2)]
        full = collect_error(tight.generate([1, 2], model="slot", max_tokens=2))
        assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-queued" in (full.details() or "")
        long = Stream(tight.generate([1, 2, 3], model="tiny", max_tokens=1500, ignore_eos=True))
        long.wait_first_token()
        busy = collect_error(tight.generate([1, 2], model="tiny", max_tokens=2))
        assert busy.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-streams" in (busy.details() or "")
        long.call.cancel()
        long.finish()
        assert client.cancel("admit-blocker")
        blocker.finish()
        for stream in queued:
            assert stream.finish().completion_tokens == 2


INVALID: dict[str, tuple[str, dict[str, Any]]] = {
    "empty text": ("text", {"text": ""}),
    "no prompt": ("prompt", {}),
    "empty token ids": ("token_ids", {"token_ids": pb.TokenIds()}),
    "token id outside vocab": ("token_ids", {"token_ids": pb.TokenIds(ids=[10**7])}),
    "prompt longer than context": ("token_ids", {"token_ids": pb.TokenIds(ids=[5] * 2100)}),
    "max_tokens over limit": ("max_tokens", {"text": "hi", "max_tokens": 100_000}),
    "max_tokens past context": ("max_tokens", {"text": "hi", "max_tokens": 2048}),
    "priority": ("priority", {"text": "hi", "priority": 10}),
    "request_id": ("request_id", {"text": "hi", "request_id": "has space"}),
    "temperature": ("temperature", {"text": "hi", "sampling": sampling(temperature=-1)}),
    "top_p": ("top_p", {"text": "hi", "sampling": sampling(top_p=1.5)}),
    "min_p": ("min_p", {"text": "hi", "sampling": pb.SamplingParameters(min_p=2)}),
    "repetition_penalty": ("repetition_penalty",
                           {"text": "hi", "sampling": sampling(repetition_penalty=0)}),
    "presence_penalty": ("presence_penalty",
                         {"text": "hi", "sampling": pb.SamplingParameters(presence_penalty=3)}),
    "frequency_penalty": ("frequency_penalty",
                          {"text": "hi", "sampling": pb.SamplingParameters(frequency_penalty=-3)}),
    "seed": ("seed", {"text": "hi", "sampling": sampling(seed=2**63)}),
    "stop": ("stop", {"text": "hi", "stop": [""]}),
    "stop_token_ids": ("stop_token_ids", {"text": "hi", "stop_token_ids": [10**7]}),
}


def invalid_call(client: GenerationClient, fields: dict[str, Any]) -> grpc.RpcError:
    return collect_error(client.stub.Generate(pb.GenerateRequest(model="tiny", **fields),
                                              timeout=30))


@pytest.mark.parametrize("case", list(INVALID))
def test_each_invalid_field_is_invalid_argument_naming_it(client: GenerationClient,
                                                          case: str) -> None:
    field, fields = INVALID[case]
    error = invalid_call(client, fields)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field in (error.details() or "")


@pytest.mark.parametrize("messages", [[], [("wizard", "hi")]], ids=["empty", "bad role"])
def test_invalid_chat_messages_are_invalid_argument(client: GenerationClient,
                                                    messages: list[tuple[str, str]]) -> None:
    error = collect_error(client.chat([{"role": r, "content": c} for r, c in messages],
                                      model="tiny"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages" in (error.details() or "")


def test_bad_requests_leave_other_streams_running(client: GenerationClient) -> None:
    running = Stream(client.generate([7, 8, 9], model="tiny", max_tokens=200, ignore_eos=True,
                                     sampling=GREEDY))
    for _, fields in INVALID.values():
        invalid_call(client, fields)
    unknown = collect_error(client.generate("hi", model="no-such-model"))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert running.finish().completion_tokens == 200
    assert running.code is None


def test_health_is_serving_only_while_a_worker_is_live(fleet: Fleet, tiny_qwen3: Path) -> None:
    prefix, target = f"{fleet.prefix}health-", f"127.0.0.1:{free_port()}"
    gateway = start_service("health-gateway", fleet.gateway_args(target, prefix=prefix),
                            fleet.log_dir)
    services = [gateway]
    try:
        with GenerationClient(target) as c:
            def status() -> str:
                try:
                    return c.health()
                except grpc.RpcError:
                    return "UNREACHABLE"

            wait_until(lambda: status() == "NOT_SERVING", 30, "gateway never answered", services)
            worker = start_service("health-worker", fleet.worker_args(
                tiny_qwen3, "tiny", prefix=prefix), fleet.log_dir)
            services.append(worker)
            wait_until(lambda: status() == "SERVING", 90, "never SERVING", services)
            worker.stop()
            wait_until(lambda: status() == "NOT_SERVING", 30, "still SERVING", [gateway])
    finally:
        for service in services:
            service.stop()
