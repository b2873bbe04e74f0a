"""A worker's liveness does not depend on how long its steps take: leases and registration
are renewed from their own thread through a step many times longer than the registration's
lifetime; a slow step is logged and counted; a step past --step-timeout-s hands everything
back and ends the process; a drain does not start a step it cannot finish in time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pytest

from common.protocol import ORPHANED
from common.sampling_params import SamplingParams
from tests.worker.conftest import FakeGateway
from worker.backends.base import SequenceChunk, StepResult
from worker.engine.engine import Engine
from worker.liveness import now_ms
from worker.redis_queue import RedisQueue

if TYPE_CHECKING:
    from tests.worker.conftest import MakeService

MODEL = "tiny"
PROMPT = [1, 2, 3, 4]
SHORT = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)
FAST = {"heartbeat_s": 0.2, "lease_ms": 1500}
"""Beats every 0.2 s: the registration lives 1 s and a lease 1.5 s unless renewed."""


@pytest.fixture
def slow_steps(engine: Engine, monkeypatch: pytest.MonkeyPatch
               ) -> Callable[[float, int], threading.Event]:
    """`(seconds, count)`: the next `count` steps each take `seconds` longer; the returned
    event is set while the first of them runs."""
    def arm(seconds: float, count: int) -> threading.Event:
        real = engine.backend.execute
        inside = threading.Event()
        left = [count]

        def execute(chunks: Sequence[SequenceChunk]) -> StepResult:
            if left[0] > 0:
                left[0] -= 1
                inside.set()
                time.sleep(seconds)
            return real(chunks)

        monkeypatch.setattr(engine.backend, "execute", execute)
        return inside

    return arm


def test_a_step_longer_than_the_registration_and_the_lease_keeps_the_worker_alive(
        make_service: MakeService, gateway: FakeGateway, engine: Engine,
        slow_steps: Callable[[float, int], threading.Event]) -> None:
    # beats every 0.5 s: the registration lives 2 s and a lease 3 s unless renewed
    service = make_service(step_warn_s=1.0, heartbeat_s=0.5, lease_ms=3000)
    peer = RedisQueue(gateway.client, gateway.keys, MODEL, "w2", lease_ms=3000)
    expected = engine.generate([PROMPT], SHORT)[0].token_ids
    gateway.enqueue("r", PROMPT, SHORT)
    inside = slow_steps(6.0, 1)  # 3x the registration's lifetime, 2x the lease
    done = threading.Event()
    c, k = gateway.client, gateway.keys
    samples: list[bool] = []
    ages: list[int] = []

    def alive() -> bool:
        reg = c.hgetall(k.worker("w1"))
        ages.append(int(reg.get("step_age_ms", "0")))
        lease = c.zscore(k.leases(MODEL), "r")
        reaped = peer.reap(now_ms())  # what any other worker does every beat
        return bool(reg) and lease is not None and lease > now_ms() and reaped == 0

    def observe() -> None:  # while the slow step runs (the request then finishes)
        inside.wait(10)
        while service.watchdog.age_s() > 0 and not done.is_set():
            samples.append(alive())
            time.sleep(0.05)

    observer = threading.Thread(target=observe)
    observer.start()
    try:
        deadline = time.monotonic() + 30
        while not gateway.finished("r"):
            assert time.monotonic() < deadline
            service.run_once()
    finally:
        done.set()
        observer.join()
    assert len(samples) >= 20 and all(samples), (
        f"the registration or the lease lapsed in {samples.count(False)} of {len(samples)}")
    assert max(ages) >= 4000, "the registration reports the step in progress"
    assert [e.token_id for e in gateway.events("r")] == expected
    assert service.metrics.slow_steps._value.get() == 1


def test_a_step_past_the_timeout_hands_everything_back_and_exits(
        make_service: MakeService, gateway: FakeGateway,
        slow_steps: Callable[[float, int], threading.Event]) -> None:
    service = make_service(step_timeout_s=0.5, **FAST)
    exited = threading.Event()
    statuses: list[int] = []
    service.exit = lambda status: (statuses.append(status), exited.set())
    gateway.enqueue("r", PROMPT, LONG)
    service.run_once()  # claimed, prefilled
    slow_steps(2.0, 1)
    stepping = threading.Thread(target=service.run_once)
    stepping.start()
    try:
        assert exited.wait(5), "the watchdog never fired"
        c, k = gateway.client, gateway.keys
        assert statuses == [3]
        assert c.zrange(k.queue(MODEL), 0, -1) == ["r"]  # handed back, to resume elsewhere
        assert not c.exists(k.worker("w1"))
    finally:
        stepping.join()
        service.liveness.stop()


def test_a_drain_starts_no_step_it_cannot_finish_in_time(
        make_service: MakeService, gateway: FakeGateway,
        slow_steps: Callable[[float, int], threading.Event]) -> None:
    service = make_service(drain_s=1.0, **FAST)
    gateway.enqueue("r", PROMPT, LONG)
    service.run_once()
    slow_steps(0.7, 100)
    service.run_once()  # one 0.7 s step: the drain now knows a step's length
    start = time.monotonic()
    service.shutdown(drain=True)
    took = time.monotonic() - start
    assert took < 1.0, f"the drain took {took:.2f}s of its 1.0s"
    assert gateway.client.zrange(gateway.keys.queue(MODEL), 0, -1) == ["r"]


def test_the_requests_of_a_dead_gateway_are_dropped_running_and_queued(
        make_service: MakeService, gateway: FakeGateway, engine: Engine, redis_url: str
) -> None:
    """Once a gateway's registration expires nobody reads its stream: its running request
    ends within a beat, its queued one is never run; another gateway's request is served."""
    service = make_service(capacity=1, **FAST)
    gateway.enqueue("running", PROMPT, LONG)
    service.run_once()
    assert service.active_ids == ["running"]
    gateway.enqueue("queued", PROMPT, LONG)
    gateway.client.delete(gateway.keys.gateway("gw1"))  # gw1's registration expired
    deadline = time.monotonic() + 5
    while service.active_ids:
        assert time.monotonic() < deadline, "the orphaned request kept running"
        service.run_once()
    service.settle()
    last = gateway.events("running")[-1]
    assert (last.finish_reason, last.code.name) == (ORPHANED, "UNAVAILABLE")
    assert "stopped heartbeating" in last.error
    other = FakeGateway(redis_url, gateway_id="gw2")
    other.enqueue("alive", PROMPT, SHORT)
    deadline = time.monotonic() + 30
    while not other.finished("alive"):
        assert time.monotonic() < deadline
        service.run_once()
    assert gateway.finished("queued") and [e.index for e in gateway.events("queued")] == [-1]
    assert gateway.retained("running") and gateway.retained("queued")
    assert not engine.has_unfinished()
    other.client.close()



def test_a_worker_that_claims_back_its_own_running_request_keeps_running_it(
        make_service: MakeService, gateway: FakeGateway, engine: Engine) -> None:
    """Its registration lapsed (a Redis outage) and a reap put its request back in the
    queue: the worker claims it again while still running it, and simply goes on."""
    service = make_service(**FAST)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = engine.generate([PROMPT], params)[0].token_ids
    gateway.enqueue("r", PROMPT, params)
    service.run_once()
    service.run_once()
    service.liveness.stop()  # as if its beats stalled
    gateway.client.delete(gateway.keys.worker("w1"))
    peer = RedisQueue(gateway.client, gateway.keys, MODEL, "w2", lease_ms=1500)
    assert peer.reap(now_ms()) == 1
    deadline = time.monotonic() + 30
    while not gateway.finished("r"):
        assert time.monotonic() < deadline
        service.run_once()
    events = gateway.events("r")
    assert [e.token_id for e in events] == expected and events[-1].finish_reason == "length"
