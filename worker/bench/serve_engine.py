"""`npuserve bench serve --compare-engine`: the requests a stack level finished, run again
through the engine in this process, the way the stack's worker runs them.

Same model directory, backend and settings, the same EngineConfig the worker builds from its
defaults with the same max batch, the same prompt ids (the gateway's tokens) and output
lengths, and the same load: a closed-loop level keeps as many requests in the engine as the
stack had streams (the next one joins when one finishes), an open-loop level adds each
request at the offset the stack sent it. Each step's tokens are stamped when the step
returns, so the engine's ITL is its step time as a request sees it; what the stack adds on
top is Redis, the gateway and gRPC.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.bench.serve_load import OnDone, frozen_heap
from worker.bench.serve_stats import LevelRun, RequestRecord

if TYPE_CHECKING:
    from common.config import WorkerConfig
    from worker.engine.engine import Engine


@dataclass(frozen=True, slots=True)
class Replay:
    """What the engine runs for one level, in the order the stack sent it."""

    prompts: list[list[int]]
    output_lens: list[int]
    offsets: list[float]
    """Seconds from the level's first request at which the stack sent each one."""


def load_engine(config: WorkerConfig) -> Engine:
    """The engine a worker with `config` builds, in this process."""
    from worker.engine.engine import Engine

    return Engine.from_model_dir(config.model_dir, config.engine, backend=config.backend,
                                 settings=config.backend_settings)


def warm_up(engine: Engine, prompt: Sequence[int]) -> None:
    """One short request, so lazy initialisation is not charged to the first level (the
    load generator sends the stack one too)."""
    from common.sampling_params import SamplingParams

    engine.generate([list(prompt[:16])], SamplingParams(max_tokens=4, temperature=0.0,
                                                        ignore_eos=True))


def replay(engine: Engine, work: Replay, label: str, value: float, hard_cap_s: float,
           on_done: OnDone | None = None) -> LevelRun:
    """Run `work` closed-loop ("concurrency") or at its offsets ("rate")."""
    with frozen_heap():
        return _replay(engine, work, label, value, hard_cap_s, on_done)


def _replay(engine: Engine, work: Replay, label: str, value: float, hard_cap_s: float,
            on_done: OnDone | None) -> LevelRun:
    from common.sampling_params import SamplingParams

    n = len(work.prompts)
    records = [RequestRecord(i, 0.0, prompt_tokens=len(p)) for i, p in enumerate(work.prompts)]
    owner: dict[str, RequestRecord] = {}
    clock = time.perf_counter
    start = clock()
    added = 0

    def add() -> None:
        nonlocal added
        record = records[added]
        record.sent = clock()
        params = SamplingParams(max_tokens=work.output_lens[added], temperature=0.0,
                                ignore_eos=True)
        owner[engine.add_request(work.prompts[added], params)] = record
        added += 1

    closed = label == "concurrency"
    if closed:
        while added < min(int(value), n):
            add()
    while added < n or engine.has_unfinished():
        now = clock()
        if now - start > hard_cap_s:
            for request_id, record in owner.items():
                record.unfinished = engine.abort(request_id)  # False: it had finished
            break
        if not closed:
            while added < n and start + work.offsets[added] <= now:
                add()
            if not engine.has_unfinished():
                time.sleep(max(0.0, start + work.offsets[added] - clock()))
                continue
        events = engine.step()
        now = clock()
        for event in events:
            record = owner[event.request_id]
            record.message(now, 1)
            if event.finish_reason is not None:
                if on_done is not None:
                    on_done(record)
                if closed and added < n:
                    add()
    sent_until = max((r.sent for r in records[:added]), default=None)
    return LevelRun(label, value, records[:added], clock() - start, sent_until)
