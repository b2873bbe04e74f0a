"""The load generator of `npuserve bench serve`: greedy streams with EOS ignored against a
gateway, over the generated stubs with grpc.aio.

One event loop carries every stream, so hundreds of streams cost no threads: a closed-loop
level keeps `concurrency` requests in flight (each slot sends its next request when its last
one ends), an open-loop level sends requests at seeded Poisson arrival times whatever is
still running. A level stops sending after `duration_s` (or `max_requests`), waits for what is
in flight, and at `hard_cap_s` cancels what is left (counted as unfinished). No torch, no
engine and no gateway code here (the worker layer may not import the gateway).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from worker.bench.serve_stats import LevelRun, RequestRecord
from worker.bench.serve_workload import LoadRequest, Workload, poisson_arrivals

OnDone = Callable[[RequestRecord], None]
"""Called as each request ends (finished, failed or cut), e.g. to move a progress bar."""


@dataclass(frozen=True, slots=True)
class LoadPlan:
    target: str
    """The gateway's host:port."""
    model: str = ""
    """The model to ask for; empty: the gateway's only model."""
    duration_s: float = 30.0
    """Seconds a level keeps sending new requests."""
    hard_cap_s: float = 90.0
    """Seconds after which a level cancels the requests still streaming."""
    max_requests: int | None = None
    """Requests a level sends at most (None: as many as the duration allows)."""
    request_timeout_s: float = 600.0
    """The gRPC deadline of each request."""
    seed: int = 0
    channels: int = 1
    """gRPC connections the streams are spread over."""


def generate_request(req: LoadRequest, model: str) -> Any:
    from protos import npuserve_pb2 as pb

    return pb.GenerateRequest(model=model, text=req.prompt, max_tokens=req.output_len,
                              ignore_eos=True, sampling=pb.SamplingParameters(temperature=0))


async def stream_one(stub: Any, request: Any, record: RequestRecord, timeout: float) -> None:
    """Send one Generate and time its messages into `record`."""
    import grpc

    clock = time.perf_counter
    record.sent = clock()
    call = stub.Generate(request, timeout=timeout)
    try:
        async for message in call:
            if message.token_ids:
                record.message(clock(), len(message.token_ids))
            if message.finish_reason:
                record.prompt_tokens = message.usage.prompt_tokens
                record.queue_wait_s = message.timings.queue_wait_ms / 1e3
                record.gateway_ttft_s = message.timings.time_to_first_token_ms / 1e3
    except grpc.aio.AioRpcError as exc:
        record.error = exc.code().name
    except asyncio.CancelledError:
        record.unfinished = True
        call.cancel()
        raise


async def run_level(plan: LoadPlan, workload: Workload, level: int, label: str, value: float,
                    on_done: OnDone | None = None) -> LevelRun:
    """One level: `label` "concurrency" (value: streams in flight) or "rate" (value:
    requests per second, Poisson)."""
    with frozen_heap():
        return await _level(plan, workload, level, label, value, on_done)


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Within: what exists now (the imports, earlier levels' records, an engine) is left out
    of garbage collections; a full one walking it would stall every stream at once."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def _level(plan: LoadPlan, workload: Workload, level: int, label: str, value: float,
                 on_done: OnDone | None) -> LevelRun:
    import grpc

    from protos import npuserve_pb2_grpc

    records: list[RequestRecord] = []
    numbers = itertools.count()
    sent_until = 0.0
    # a local subchannel pool per channel: each is a connection of its own
    channels = [grpc.aio.insecure_channel(plan.target,
                                          options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(max(1, plan.channels))]
    stubs = [npuserve_pb2_grpc.GenerationStub(c) for c in channels]
    try:
        start = time.perf_counter()
        stop_sending = start + plan.duration_s

        async def send(number: int) -> None:
            nonlocal sent_until
            req = workload.request(level, number)
            record = RequestRecord(number, time.perf_counter())
            sent_until = record.sent
            records.append(record)
            try:
                await stream_one(stubs[number % len(stubs)], generate_request(req, plan.model),
                                 record, plan.request_timeout_s)
            finally:
                if on_done is not None:
                    on_done(record)

        def more() -> int | None:
            number = next(numbers)
            if plan.max_requests is not None and number >= plan.max_requests:
                return None
            return number

        async def slot() -> None:
            while time.perf_counter() < stop_sending and (number := more()) is not None:
                await send(number)

        async def arrivals() -> None:
            running: set[asyncio.Task[None]] = set()
            try:
                for at in poisson_arrivals(value, plan.duration_s, plan.seed * 1000 + level):
                    if (number := more()) is None:
                        break
                    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
                    task = asyncio.create_task(send(number))
                    running.add(task)
                    task.add_done_callback(running.discard)
                await asyncio.gather(*running)
            finally:
                for task in running:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)

        if label == "concurrency":
            tasks = [asyncio.create_task(slot()) for _ in range(int(value))]
        elif label == "rate":
            tasks = [asyncio.create_task(arrivals())]
        else:
            raise ValueError(f"a level is 'concurrency' or 'rate', not {label!r}")
        _, pending = await asyncio.wait(tasks, timeout=plan.hard_cap_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
    finally:
        for channel in channels:
            await channel.close()
    records.sort(key=lambda r: r.index)
    return LevelRun(label, value, records, wall, sent_until or None)


class Tokenizer:
    """The gateway's Tokenize, blocking: prompt lengths for calibration and the prompt ids
    the engine comparison replays."""

    def __init__(self, target: str, model: str = "") -> None:
        import grpc

        from protos import npuserve_pb2_grpc

        self.model = model
        self._channel = grpc.insecure_channel(target)
        self._stub = npuserve_pb2_grpc.GenerationStub(self._channel)

    def ids(self, text: str) -> list[int]:
        from protos import npuserve_pb2 as pb

        reply = self._stub.Tokenize(pb.TokenizeRequest(model=self.model, text=text), timeout=30)
        return list(reply.token_ids)

    def count(self, text: str) -> int:
        return len(self.ids(text))

    def served(self) -> list[dict[str, Any]]:
        """The models with live workers: name, and each worker's backend, device and
        capacity."""
        from protos import npuserve_pb2 as pb

        reply = self._stub.ListModels(pb.ListModelsRequest(), timeout=10)
        return [{"name": m.name, "workers": [
            {"backend": w.backend, "device": w.device, "capacity": w.capacity}
            for w in m.workers]} for m in reply.models if m.workers]

    def close(self) -> None:
        self._channel.close()
