"""Exact resume through the whole stack: a request whose worker drains (SIGTERM) or dies
(SIGKILL, then its lease expires) mid-stream continues on another worker and the client sees
exactly the tokens and the text of an uninterrupted run.

Its own fleet: one gateway and two workers of model "resume" with heartbeats every 0.3 s and
leases of a minute: a killed worker's requests must go back when its registration expires
(about a second), not when their leases would. Each test interrupts whichever worker holds
the request, then starts a replacement.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.keys import Keys
from gateway.client import GenerationClient, StreamResult, collect
from preprocess.tokenizer import load_tokenizer
from protos import npuserve_pb2 as pb
from tests.serving.conftest import Fleet, Service, Stream, start_service, text_of, wait_until
from worker.processes import free_port

pytestmark = pytest.mark.timeout(300)
MODEL = "resume"
PROMPT = [1000, 2000, 3000, 4000, 5000]
MAX_TOKENS = 160
LEASE_MS = 60_000
GREEDY = pb.SamplingParameters(temperature=0)
SEEDED = pb.SamplingParameters(temperature=0.7, top_k=8, seed=1234, repetition_penalty=1.1,
                               presence_penalty=0.5, frequency_penalty=0.3)
"""top_k keeps the draw among a few candidates: the resumed worker recomputes the cache with
its prefill kernels, whose logits can differ from the decode steps' in the last bits, which
could move a draw only when it lands within that much of a boundary. Over a random model's
nearly flat 151k-token distribution such boundaries are everywhere."""


@dataclass
class ResumeFleet:
    fleet: Fleet
    tiny_qwen3: Path
    workers: dict[str, Service] = field(default_factory=dict)

    def start_worker(self) -> None:
        worker_id = f"resume-{uuid.uuid4().hex[:6]}"
        args = self.fleet.worker_args(self.tiny_qwen3, MODEL, "--worker-id", worker_id,
                                      "--max-num-seqs", "4", "--lease-ms", str(LEASE_MS),
                                      "--heartbeat", "0.3", "--drain-timeout", "0")
        self.workers[worker_id] = start_service(worker_id, args, self.fleet.log_dir)
        self.fleet.services.append(self.workers[worker_id])

    def wait_for_workers(self, n: int) -> None:
        def live() -> bool:
            try:
                with GenerationClient(self.fleet.gateway, timeout=2) as client:
                    return any(len(m.workers) >= n for m in client.list_models().models
                               if m.name == MODEL)
            except grpc.RpcError:  # the gateway may not listen yet
                return False

        wait_until(live, 120, f"{n} workers of {MODEL} never registered",
                   list(self.workers.values()))


@pytest.fixture(scope="module")
def resume_fleet(redis_server: str, tiny_qwen3: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResumeFleet]:
    fl = Fleet(redis_server, f"resume-{uuid.uuid4().hex[:8]}:", f"127.0.0.1:{free_port()}",
               "", 0, tmp_path_factory.mktemp("resume"))
    rf = ResumeFleet(fl, tiny_qwen3)
    try:
        fl.services.append(start_service("gateway", fl.gateway_args(fl.gateway), fl.log_dir))
        rf.start_worker()
        rf.start_worker()
        rf.wait_for_workers(2)
        yield rf
    finally:
        for service in fl.services:
            service.stop()


@pytest.fixture(scope="module")
def client(resume_fleet: ResumeFleet) -> Iterator[GenerationClient]:
    with GenerationClient(resume_fleet.fleet.gateway, timeout=120) as c:
        yield c


def generate(client: GenerationClient, request_id: str, sampling: pb.SamplingParameters,
             stop: list[str]) -> Any:
    return client.generate(PROMPT, model=MODEL, max_tokens=MAX_TOKENS, sampling=sampling,
                           ignore_eos=True, stop=stop, request_id=request_id)


def interrupt(rf: ResumeFleet, request_id: str, sig: signal.Signals, after: int) -> int:
    """Once `after` tokens of the request are published, send `sig` to the worker holding it;
    returns how many tokens that worker had published (the resume point). The other worker is
    paused meanwhile, so the point can be read before anyone resumes the request."""
    with rf.fleet.redis() as r:
        keys = Keys(rf.fleet.prefix)
        req, toks = keys.request(MODEL, request_id), keys.tokens(MODEL, request_id)
        deadline = time.monotonic() + 60
        while r.llen(toks) < after:
            assert time.monotonic() < deadline, "the request never got going"
            time.sleep(0.001)
        holder = r.hget(req, "worker")
        assert holder in rf.workers, f"unknown holder {holder!r}"
        others = [s for wid, s in rf.workers.items() if wid != holder]
        for other in others:
            other.proc.send_signal(signal.SIGSTOP)
        try:
            service = rf.workers.pop(holder)
            service.proc.send_signal(sig)
            service.proc.wait(60)
            return int(r.llen(toks))
        finally:
            for other in others:
                other.proc.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["drain", "kill"])
@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded-penalised"])
def test_a_request_handed_back_mid_stream_continues_exactly(
        resume_fleet: ResumeFleet, client: GenerationClient, tiny_qwen3: Path,
        sig: signal.Signals, sampling: pb.SamplingParameters) -> None:
    tokenizer = load_tokenizer(tiny_qwen3)
    whole = collect(generate(client, f"ref-{uuid.uuid4().hex}", sampling, []))
    assert len(whole.token_ids) == MAX_TOKENS
    stop = stop_string_near_the_end(whole)
    reference = collect(generate(client, f"ref-{uuid.uuid4().hex}", sampling, [stop]))
    assert reference.finish_reason == "stop" and len(reference.token_ids) < MAX_TOKENS
    assert reference.text == text_of(tokenizer, PROMPT, whole.token_ids, "length", [stop])

    request_id = f"cut-{uuid.uuid4().hex}"
    stream = Stream(generate(client, request_id, sampling, [stop]))
    resumed_at = interrupt(resume_fleet, request_id, sig, after=20)
    resume_fleet.start_worker()
    result: StreamResult = stream.finish(timeout=120)
    resume_fleet.wait_for_workers(2)

    assert stream.code is None, stream.details
    assert 20 <= resumed_at < len(reference.token_ids), "the interruption was not mid-stream"
    assert result.token_ids == reference.token_ids
    assert result.text == reference.text
    assert (result.finish_reason, result.completion_tokens) == (
        "stop", len(reference.token_ids))
    assert result.indices == sorted(set(result.indices))
    # the survivor re-queues a dead worker's request once its registration expires
    assert stream.longest_stall() < 15, f"stalled {stream.longest_stall():.1f}s"


def stop_string_near_the_end(whole: StreamResult) -> str:
    """Three characters first occurring around 80% into the text, whole characters only."""
    text = whole.text
    for start in range(int(len(text) * 0.8), len(text) - 3):
        candidate = text[start:start + 3]
        if "\ufffd" not in candidate and text.find(candidate) == start:
            return candidate
    raise AssertionError(f"no usable stop string in {text!r}")
