"""A gateway that dies (SIGKILL) loses nothing and stops costing anything: its client resumes
the stream at another gateway and gets every token exactly once, the text identical to an
uninterrupted run (also after the request finished); requests nobody resumes are ended
within seconds of the gateway's registration expiring instead of generating for nobody, and
its reply stream is left to expire."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from common.keys import GATEWAY_TTL_S, REPLIES_TTL_S
from common.protocol import ORPHANED, decode_events
from gateway.client import GenerationClient, StreamResult, collect
from gateway.output import OutputProcessor
from preprocess.tokenizer import load_tokenizer
from protos import npuserve_pb2 as pb
from tests.serving.conftest import (
    Fleet,
    Service,
    Stream,
    one_of_each,
    served,
    start_service,
    wait_until,
)
from tests.serving.test_resume import stop_string_near_the_end
from worker.processes import free_port

pytestmark = pytest.mark.timeout(300)
MODEL = "orphans"
DOOMED = "gw-doomed"
PROMPT = [1000, 2000, 3000, 4000, 5000]


@pytest.fixture(scope="module")
def orphans_fleet(redis_server: str, tiny_qwen3: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One gateway that stays, and one worker running one request at a time."""
    with one_of_each(redis_server, tiny_qwen3, MODEL, tmp_path_factory.mktemp("orphans"),
                     "--max-num-seqs", "1", "--heartbeat", "0.5", "--no-cpu-kernels",
                     "--worker-id", "orphans-w") as fl:
        yield fl


def start_doomed(fl: Fleet, gateway_id: str) -> tuple[Service, str]:
    """A second gateway, to be killed; returns it and its address."""
    target = f"127.0.0.1:{free_port()}"
    service = start_service(gateway_id, fl.gateway_args(target, "--gateway-id", gateway_id),
                            fl.log_dir)
    fl.services.append(service)
    wait_until(served(target, {MODEL: 1}), 60, f"{gateway_id} did not come up", fl.services)
    return service, target


def kill(fl: Fleet, service: Service) -> float:
    service.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    service.proc.wait(10)
    fl.services.remove(service)
    return killed


def test_a_stream_resumes_at_another_gateway_exactly(orphans_fleet: Fleet,
                                                     tiny_qwen3: Path) -> None:
    fl = orphans_fleet
    tokenizer = load_tokenizer(tiny_qwen3)
    greedy = {"model": MODEL, "max_tokens": 300, "ignore_eos": True,
              "sampling": pb.SamplingParameters(temperature=0)}
    with GenerationClient(fl.gateway, timeout=120) as survivor:
        whole = collect(survivor.generate(PROMPT, **greedy))
        stop = stop_string_near_the_end(whole)
        reference = collect(survivor.generate(PROMPT, stop=[stop], **greedy))
        assert reference.finish_reason == "stop"
        doomed, target = start_doomed(fl, "gw-doomed-resume")
        received = StreamResult()
        with GenerationClient(target, timeout=120) as client:
            stream = client.generate(PROMPT, stop=[stop], request_id="resumed-1", **greedy)
            for message in stream:
                received.add(message)
                if len(received.token_ids) >= 40:
                    break
            kill(fl, doomed)
            with pytest.raises(grpc.RpcError):  # what was in flight, then the broken stream
                for message in stream:
                    received.add(message)
        assert 40 <= len(received.token_ids) < len(reference.token_ids)
        rest = collect(survivor.resume("resumed-1", len(received.token_ids)))
        joined = received.token_ids + rest.token_ids
        assert joined == reference.token_ids, "tokens lost or repeated"
        assert received.text + rest.text == reference.text
        assert rest.indices[0] == len(received.token_ids)
        assert (rest.finish_reason, rest.completion_tokens) == (
            "stop", len(reference.token_ids))
        # finished, it can still be read again from any point, for the retention
        again = collect(survivor.resume("resumed-1", 10))
        output = OutputProcessor(tokenizer, PROMPT, [stop])
        prefix = "".join(output.add(t) for t in reference.token_ids[:10])
        assert again.token_ids == reference.token_ids[10:]
        assert again.text == reference.text[len(prefix):]
        with pytest.raises(grpc.RpcError) as info:
            collect(survivor.resume("never-sent", 0))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            collect(survivor.resume("resumed-1", 10_000))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ask for at most" in (info.value.details() or "")


def test_a_dead_gateways_requests_stop_within_seconds_and_go_on_when_resumed(
        orphans_fleet: Fleet) -> None:
    """Nobody resumed them in time: both are stopped (orphaned) soon after the gateway's
    registration expires. A client that comes back later still gets each exactly: a resume
    queues the request again from the tokens it had made."""
    fl = orphans_fleet
    greedy = {"model": MODEL, "ignore_eos": True,
              "sampling": pb.SamplingParameters(temperature=0)}
    gateway, doomed = start_doomed(fl, DOOMED)
    with GenerationClient(doomed, timeout=120) as client:
        running = Stream(client.stub.Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[5, 6, 7]), max_tokens=2000,
            request_id="orphan-running", **greedy), timeout=120))
        running.wait_first_token()
        queued = Stream(client.stub.Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[8, 9]), max_tokens=12, request_id="orphan-queued",
            **greedy), timeout=120))
        with fl.redis() as r:
            wait_until(lambda: r.exists(f"{fl.prefix}req:{{{MODEL}}}:orphan-queued") == 1, 10,
                       "the second request was never queued", fl.services)
        killed = kill(fl, gateway)
    p = fl.prefix
    with fl.redis() as r:
        wait_until(lambda: all(r.hexists(f"{p}req:{{{MODEL}}}:{rid}", "final")
                               for rid in ("orphan-running", "orphan-queued")),
                   GATEWAY_TTL_S + 10, "the dead gateway's requests were not dropped",
                   fl.services)
        dropped_after = time.monotonic() - killed
        finals = {e.request_id: e for _, f in r.xrange(f"{p}replies:{{{DOOMED}}}")
                  for e in decode_events(f["e"]) if e.finish_reason}
        assert finals["orphan-running"].finish_reason == ORPHANED, "it ended on its own"
        assert finals["orphan-running"].code.name == "UNAVAILABLE"
        assert finals["orphan-queued"].index == -1  # dropped before it ran
        assert 0 < r.ttl(f"{p}replies:{{{DOOMED}}}") <= REPLIES_TTL_S
        wait_until(lambda: r.hget(f"{p}worker:orphans-w", "running") == "0", 5,
                   "the worker still reports a running request", fl.services)
        made = r.llen(f"{p}toks:{{{MODEL}}}:orphan-running")
    print(f"the dead gateway's requests were dropped {dropped_after:.1f}s after its SIGKILL")
    assert dropped_after < GATEWAY_TTL_S + 5
    received = running.finish(10).token_ids
    queued.finish(10)
    assert running.code is not None and queued.code is not None  # their gateway is gone
    assert 0 < len(received) <= made < 2000
    with GenerationClient(fl.gateway, timeout=120) as other:
        rest = collect(other.resume("orphan-queued", 0))
        assert (rest.finish_reason, rest.indices) == ("length", list(range(12)))
        reference = collect(other.generate([8, 9], max_tokens=12, **greedy))
        assert rest.token_ids == reference.token_ids
        # the running one goes on from where its client's stream broke
        call = other.stub.Resume(pb.ResumeRequest(request_id="orphan-running",
                                                  next_index=len(received)), timeout=120)
        more = StreamResult()
        for message in call:
            more.add(message)
            if len(more.token_ids) >= made - len(received) + 20:
                break
        call.cancel()
        assert more.indices[0] == len(received)
        reference = collect(other.generate([5, 6, 7], max_tokens=len(received) + len(
            more.token_ids), **greedy))
        assert received + more.token_ids == reference.token_ids, "tokens lost or changed"


def test_a_gateway_frozen_past_its_registration_goes_on_streaming(orphans_fleet: Fleet
                                                                  ) -> None:
    """A gateway stalls (SIGSTOP) until its registration expires: the worker stops its
    running request as orphaned. Thawed, the gateway queues the request again once its
    registration is back, and the same stream goes on exactly, without an error."""
    fl = orphans_fleet
    greedy = {"model": MODEL, "ignore_eos": True,
              "sampling": pb.SamplingParameters(temperature=0)}
    gateway, target = start_doomed(fl, "gw-frozen")
    key = f"{fl.prefix}req:{{{MODEL}}}:frozen"
    with GenerationClient(target, timeout=120) as client, fl.redis() as r:
        call = client.stub.Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[4, 3, 2]), max_tokens=2000, request_id="frozen",
            **greedy), timeout=120)
        stream = Stream(call)
        stream.wait_first_token()
        gateway.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: ORPHANED in (r.hget(key, "final") or ""), GATEWAY_TTL_S + 10,
                       "the frozen gateway's request was not stopped", fl.services)
            made = r.llen(f"{fl.prefix}toks:{{{MODEL}}}:frozen")
        finally:
            gateway.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: len(stream.result.token_ids) >= made + 20, 60,
                   "the stream did not go on after the thaw", fl.services)
        call.cancel()
        stream.finish(10)
        received = stream.result
    assert received.indices == list(range(len(received.token_ids)))
    assert stream.code == grpc.StatusCode.CANCELLED, (stream.code, stream.details)
    assert "stopped it as orphaned" in gateway.log.read_text()
    with GenerationClient(fl.gateway, timeout=120) as other:
        reference = collect(other.generate([4, 3, 2], max_tokens=len(received.token_ids),
                                           **greedy))
    assert received.token_ids == reference.token_ids, "tokens lost or changed"
