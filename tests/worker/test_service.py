"""The worker loop in-process: a real Redis, the tiny random Qwen3, a stand-in gateway."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from common.config import EngineConfig, RedisConfig, WorkerConfig
from common.errors import ErrorCode
from common.sampling_params import SamplingParams
from worker.backends.base import SequenceChunk, StepResult
from worker.backends.torch_settings import TorchSettings
from worker.engine.engine import Engine
from worker.liveness import now_ms
from worker.redis_queue import RedisQueue
from worker.service import WorkerService

if TYPE_CHECKING:
    from tests.worker.conftest import FakeGateway, MakeService

MODEL = "tiny"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4], [50, 60, 70], [9000, 12, 7, 7, 7]]

ANY = {"max_len": 1 << 30, "room": 1 << 30}
"""claim() limits that let every request through."""


def run_until(service: WorkerService, done: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "condition not reached in time"
        service.run_once()


def reference(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    return engine.generate([prompt], params)[0].token_ids


def test_start_publishes_model_info_and_registers(
        make_service: MakeService, gateway: FakeGateway, engine: Engine) -> None:
    service = make_service()
    c, k = gateway.client, gateway.keys
    info = c.hgetall(k.model(MODEL))
    assert {"file:tokenizer.json", "file:tokenizer_config.json"} <= set(info)
    assert json.loads(info["file:tokenizer.json"])["model"]["type"] == "BPE"
    assert "max_len" not in info, "a context limit is per worker, in its registration"
    assert int(info["vocab_size"]) == engine.model_config.vocab_size
    assert json.loads(info["eos_token_ids"]) == list(engine.model_config.eos_token_ids)
    reg = c.hgetall(k.worker("w1"))
    assert reg["model"] == MODEL and reg["capacity"] == "4" and reg["running"] == "0"
    assert int(reg["max_len"]) == engine.max_len
    assert 0 < c.ttl(k.worker("w1")) <= 6
    assert c.zscore(k.workers(), "w1") is not None
    assert service.active_ids == []


def test_a_request_streams_the_engines_greedy_tokens_in_order_with_usage(
        make_service: MakeService, gateway: FakeGateway, engine: Engine) -> None:
    service = make_service()
    gateway.enqueue("r1", PROMPTS[0], GREEDY, enqueue_ms=now_ms() - 50)
    run_until(service, lambda: gateway.finished("r1"))
    events = gateway.events("r1")
    assert [e.token_id for e in events] == reference(engine, PROMPTS[0], GREEDY)
    assert [e.index for e in events] == list(range(GREEDY.max_tokens))
    assert events[0].queue_ms >= 50 and all(e.queue_ms == -1 for e in events[1:])
    last = events[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", 4, 8)
    assert not any(e.finish_reason for e in events[:-1])
    k = gateway.keys
    assert gateway.retained("r1")  # for a client that resumes at another gateway
    assert gateway.client.lrange(k.tokens(MODEL, "r1"), 0, -1) == [str(e.token_id) for e in events]
    assert gateway.client.zcard(k.leases(MODEL)) == 0
    assert gateway.cancel("r1") == 0  # finished: nothing to cancel
    gateway.enqueue("r1", PROMPTS[1], GREEDY)  # a finished id may be used again, afresh
    run_until(service, lambda: len([e for e in gateway.events("r1") if e.finish_reason]) == 2)
    again = gateway.events("r1")[len(events):]
    assert [e.token_id for e in again] == reference(engine, PROMPTS[1], GREEDY)


def test_several_requests_run_concurrently_in_one_batch(
        make_service: MakeService, gateway: FakeGateway, engine: Engine) -> None:
    service = make_service()
    for i, prompt in enumerate(PROMPTS):
        gateway.enqueue(f"r{i}", prompt, GREEDY)
    service.run_once()
    assert sorted(service.active_ids) == ["r0", "r1", "r2"]
    run_until(service, lambda: all(gateway.finished(f"r{i}") for i in range(3)))
    assert any(len({e.request_id for e in entry}) == 3 for entry in gateway.entries())
    for i, prompt in enumerate(PROMPTS):
        assert [e.token_id for e in gateway.events(f"r{i}")] == reference(engine, prompt, GREEDY)


def test_with_capacity_one_a_later_higher_priority_request_starts_first(
        make_service: MakeService, gateway: FakeGateway) -> None:
    service = make_service(capacity=1)
    gateway.enqueue("low1", PROMPTS[0], GREEDY, priority=0, enqueue_ms=1000)
    gateway.enqueue("low2", PROMPTS[0], GREEDY, priority=1, enqueue_ms=2000)
    gateway.enqueue("high", PROMPTS[0], GREEDY, priority=9, enqueue_ms=3000)
    run_until(service, lambda: all(gateway.finished(r) for r in ("low1", "low2", "high")))
    order = [entry[0].request_id for entry in gateway.entries() if entry[0].index == 0]
    assert order == ["high", "low2", "low1"]
    assert all(len(entry) == 1 for entry in gateway.entries())


def test_cancelling_a_running_request_frees_its_slot_within_one_step(
        make_service: MakeService, gateway: FakeGateway) -> None:
    service = make_service(capacity=1)
    gateway.enqueue("long", PROMPTS[0], LONG, enqueue_ms=1000)
    gateway.enqueue("next", PROMPTS[1], GREEDY, enqueue_ms=2000)
    service.run_once()
    assert service.active_ids == ["long"]
    assert gateway.cancel("long") == 2
    service.run_once()
    assert service.active_ids == ["next"]
    service.settle()
    last = gateway.events("long")[-1]
    assert (last.index, last.finish_reason, last.completion_tokens) == (-1, "cancelled", 1)
    assert gateway.events("next")[0].index == 0
    assert gateway.retained("long")


def test_a_queued_request_past_its_deadline_is_never_run(
        make_service: MakeService, gateway: FakeGateway) -> None:
    service = make_service()
    gateway.enqueue("late", PROMPTS[0], GREEDY, deadline_ms=now_ms() - 1)
    service.run_once()
    assert service.active_ids == []
    service.settle()
    [final] = gateway.events("late")
    assert (final.index, final.token_id, final.finish_reason) == (-1, -1, "deadline")
    assert gateway.retained("late")


def test_a_request_flagged_cancelled_then_handed_back_gets_a_cancelled_final(
        make_service: MakeService, gateway: FakeGateway, redis_url: str) -> None:
    service = make_service()
    dead = RedisQueue.connect(RedisConfig(url=redis_url), MODEL, "dead", 15000)
    gateway.enqueue("flagged", PROMPTS[0], LONG)
    [claimed] = dead.claim(1, now_ms(), **ANY)
    assert claimed.request_id == "flagged" and not claimed.dropped
    assert gateway.cancel("flagged") == 2  # leased: only flagged for its worker
    assert dead.reap(now_ms() + 60_000) == 1  # that worker died: the lease runs out
    dead.close()
    service.run_once()
    assert service.active_ids == []
    service.settle()
    [final] = gateway.events("flagged")
    assert (final.index, final.finish_reason) == (-1, "cancelled")
    assert gateway.retained("flagged")


def test_a_running_request_past_its_deadline_ends_with_a_deadline_event(
        make_service: MakeService, gateway: FakeGateway) -> None:
    service = make_service()
    gateway.enqueue("slow", PROMPTS[0], LONG, deadline_ms=now_ms() + 1000)
    run_until(service, lambda: gateway.finished("slow"))
    events = gateway.events("slow")
    assert events[-1].finish_reason == "deadline" and events[-1].index == -1
    assert events[-1].completion_tokens == len(events) - 1 < LONG.max_tokens


def test_a_resumed_request_continues_at_the_right_index_with_the_right_tokens(
        make_service: MakeService, gateway: FakeGateway, engine: Engine) -> None:
    expected = reference(engine, PROMPTS[2], GREEDY)
    service = make_service()
    gateway.enqueue("r", PROMPTS[2], GREEDY, published=expected[:3])
    run_until(service, lambda: gateway.finished("r"))
    events = gateway.events("r")
    assert [e.index for e in events] == list(range(3, 8))
    assert [e.token_id for e in events] == expected[3:]
    assert events[0].queue_ms == -1
    assert (events[-1].prompt_tokens, events[-1].completion_tokens) == (5, 8)


def test_an_out_of_vocabulary_token_gets_an_error_and_the_worker_serves_the_others(
        make_service: MakeService, gateway: FakeGateway, engine: Engine) -> None:
    service = make_service()
    gateway.enqueue("bad", [1, 10**7], GREEDY, enqueue_ms=1000)
    gateway.enqueue("good", PROMPTS[0], GREEDY, enqueue_ms=2000)
    run_until(service, lambda: gateway.finished("good"))
    [bad] = gateway.events("bad")
    assert (bad.index, bad.finish_reason, bad.token_id) == (-1, "error", -1)
    assert "outside the vocabulary" in bad.error
    assert gateway.retained("bad")
    assert [e.token_id for e in gateway.events("good")] == reference(engine, PROMPTS[0], GREEDY)


def test_a_request_whose_worker_died_is_reaped_and_served(
        make_service: MakeService, gateway: FakeGateway, redis_url: str) -> None:
    gateway.enqueue("orphan", PROMPTS[0], GREEDY)
    dead = RedisQueue.connect(RedisConfig(url=redis_url), MODEL, "dead", lease_ms=1)
    assert [c.request_id for c in dead.claim(1, now_ms(), **ANY)] == ["orphan"]
    dead.close()
    time.sleep(0.01)
    service = make_service()
    run_until(service, lambda: gateway.finished("orphan"))
    assert [e.index for e in gateway.events("orphan")] == list(range(8))


def test_shutdown_hands_unfinished_requests_back_and_unregisters(
        make_service: MakeService, gateway: FakeGateway) -> None:
    service = make_service(drain_s=0.0)
    gateway.enqueue("long", PROMPTS[0], LONG)
    run_until(service, lambda: len(gateway.events("long")) >= 3)
    service.shutdown()
    c, k = gateway.client, gateway.keys
    assert c.zrange(k.queue(MODEL), 0, -1) == ["long"]
    assert c.zcard(k.leases(MODEL)) == 0
    published = [str(e.token_id) for e in gateway.events("long")]
    assert c.lrange(k.tokens(MODEL, "long"), 0, -1) == published
    assert not c.exists(k.worker("w1")) and c.zscore(k.workers(), "w1") is None


def test_a_failed_publish_drops_requests_locally_and_leaves_them_leased(
        make_service: MakeService, gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = make_service()
    gateway.enqueue("r", PROMPTS[0], LONG)
    service.run_once()
    service.settle()

    def down(batch: object, running: object) -> set[str]:
        raise redis.ConnectionError("connection lost")

    monkeypatch.setattr(service.queue, "publish", down)
    service.run_once()  # its publish fails meanwhile, found once the next step has run
    with pytest.raises(redis.ConnectionError):
        service.run_once()
    assert service.active_ids == [] and not service.engine.has_unfinished()
    assert gateway.client.zrange(gateway.keys.leases(MODEL), 0, -1) == ["r"]
    assert len(gateway.events("r")) == 1


def test_a_worker_claims_only_what_its_free_kv_blocks_can_start(
        tiny_qwen3: Path, redis_url: str, gateway: FakeGateway, engine: Engine) -> None:
    per_block = engine.backend.kv_cache_bytes() // engine.backend.capacity.num_blocks
    # 16 blocks of 16 tokens: room for two 100-token prompts, not four.
    tight = Engine.from_model_dir(tiny_qwen3, EngineConfig(max_num_seqs=4),
                                  settings=TorchSettings(kv_cache_gb=16 * per_block / 2**30))
    assert tight.backend.capacity.num_blocks == 16
    config = WorkerConfig(model_dir=str(tiny_qwen3), model_name=MODEL, redis=RedisConfig(
        url=redis_url), worker_id="w1", engine=EngineConfig(max_num_seqs=4))
    queue = RedisQueue.connect(config.redis, MODEL, "w1", config.lease_ms)
    service = WorkerService(config, tight, queue)
    service.start()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = {f"r{i}": [100 + i] * 100 for i in range(4)}
    for i, (rid, prompt) in enumerate(prompts.items()):
        gateway.enqueue(rid, prompt, params, enqueue_ms=now_ms() - 1000 + i)
    try:
        service.run_once()
        assert sorted(service.active_ids) == ["r0", "r1"]
        assert not tight.scheduler.waiting, "claimed work it could not start"
        assert gateway.client.zcard(gateway.keys.queue(MODEL)) == 2
        run_until(service, lambda: all(gateway.finished(rid) for rid in prompts))
    finally:
        service.close()
    for rid, prompt in prompts.items():
        assert [e.token_id for e in gateway.events(rid)] == reference(engine, prompt, params)


@pytest.fixture
def failing_device(engine: Engine, monkeypatch: pytest.MonkeyPatch
                   ) -> Callable[[dict[str, int]], None]:
    """Make the device call of chosen requests fail, as a backend reports it (the step's other
    requests still run): rid -> how many of its decode steps fail, from its third token."""
    def arm(budget: dict[str, int]) -> None:
        real = engine.backend.execute

        def execute(chunks: Sequence[SequenceChunk]) -> StepResult:
            failing = {c.request_id for c in chunks if budget.get(c.request_id, 0) > 0
                       and c.is_decode and c.start_pos >= len(PROMPTS[0]) + 3}
            for rid in failing:
                budget[rid] -= 1
            rest = [c for c in chunks if c.request_id not in failing]
            result = real(rest) if rest else StepResult()  # a step of failing requests only
            result.failed = dict.fromkeys(failing, "net block_cache_1 failed (injected)")
            return result

        monkeypatch.setattr(engine.backend, "execute", execute)

    return arm


def test_a_request_whose_device_call_fails_is_handed_back_once_and_resumes_exactly(
        make_service: MakeService, gateway: FakeGateway, engine: Engine,
        failing_device: Callable[[dict[str, int]], None]) -> None:
    expected = {rid: reference(engine, p, GREEDY) for rid, p in (("flaky", PROMPTS[0]),
                                                                  ("steady", PROMPTS[1]))}
    failing_device({"flaky": 1})
    service = make_service()
    gateway.enqueue("flaky", PROMPTS[0], GREEDY)
    gateway.enqueue("steady", PROMPTS[1], GREEDY)
    run_until(service, lambda: gateway.finished("flaky") and gateway.finished("steady"))
    for rid, tokens in expected.items():
        events = gateway.events(rid)
        assert [e.index for e in events] == list(range(GREEDY.max_tokens)), rid
        assert [e.token_id for e in events] == tokens, rid
        assert events[-1].finish_reason == "length"
    assert service.metrics.device_failures.labels("retried")._value.get() == 1
    assert gateway.retained("flaky")


def test_a_request_whose_device_call_fails_twice_ends_with_an_internal_error(
        make_service: MakeService, gateway: FakeGateway, engine: Engine,
        failing_device: Callable[[dict[str, int]], None]) -> None:
    failing_device({"doomed": 2})
    service = make_service()
    gateway.enqueue("doomed", PROMPTS[0], GREEDY)
    gateway.enqueue("steady", PROMPTS[1], GREEDY)
    run_until(service, lambda: gateway.finished("doomed") and gateway.finished("steady"))
    events = gateway.events("doomed")
    last = events[-1]
    assert (last.index, last.finish_reason, last.code) == (-1, "error", ErrorCode.INTERNAL)
    assert "failed running this request 2 times" in last.error
    assert "block_cache_1" in last.error and "retried once" in last.error
    # The first failure came with 4 tokens out, the second after the resumed prefill's one.
    assert [e.index for e in events[:-1]] == [0, 1, 2, 3, 4]
    assert last.completion_tokens == 5
    assert [e.token_id for e in gateway.events("steady")] == reference(engine, PROMPTS[1],
                                                                         GREEDY)
    k = gateway.keys
    assert gateway.retained("doomed")
    assert gateway.client.zcard(k.leases(MODEL)) == 0 and gateway.client.zcard(
        k.queue(MODEL)) == 0
    assert service.metrics.device_failures.labels("failed")._value.get() == 1


def test_livez_fails_once_the_engine_loop_stops_going_round_and_readyz_while_draining(
        make_service: MakeService, gateway: FakeGateway) -> None:
    service = make_service(liveness_timeout_s=5.0)
    probes = service.probes()
    service.run_once()
    assert probes["/livez"]()[0] and probes["/readyz"]() == (True, f"serving {MODEL}: 0 running")
    service._loop_at -= 6.0  # what a loop stuck outside any step for 6 s looks like
    age = service.metrics.registry.get_sample_value(
        "npuserve_worker_engine_loop_age_seconds",
        {"model": MODEL, "backend": "torch", "device": "cpu"})
    assert age is not None and age >= 6.0
    ok, why = probes["/livez"]()
    assert not ok and "engine loop went round 6." in why and "--liveness-timeout" in why
    service.run_once()
    assert probes["/livez"]()[0]
    service.shutdown()
    assert probes["/readyz"]() == (False, "draining: claims no new requests")
    assert service._registration()["draining"] == "1"


def test_a_worker_checks_redis_before_it_loads_its_model(
        tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common.errors import UnavailableError
    from worker import service as service_module
    from worker.processes import free_port

    def never(*args: object, **kwargs: object) -> Engine:
        raise AssertionError("the model was loaded before Redis answered")

    monkeypatch.setattr(service_module, "REDIS_WAIT_S", 0.5)
    monkeypatch.setattr(Engine, "from_model_dir", never)
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    config = WorkerConfig(model_dir=str(tiny_qwen3), redis=RedisConfig(url=url))
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="is unreachable .*start redis-server there, or "
                       r"point --redis \(NPUSERVE_REDIS_URL\)") as info:
        WorkerService.from_config(config)
    assert time.monotonic() - started < 5
    assert "secret" not in str(info.value) and "\n" not in str(info.value)
