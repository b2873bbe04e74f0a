"""A gateway that dies (SIGKILL) stops costing anything: within seconds of its registration
expiring, the worker ends its running request and drops its queued one instead of generating
for nobody, its reply stream is left to expire, and another gateway serves as before."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.keys import GATEWAY_TTL_S, REPLIES_TTL_S
from common.protocol import decode_events
from gateway.client import GenerationClient, collect
from protos import npuserve_pb2 as pb
from tests.serving.conftest import Fleet, Stream, served, start_service, wait_until
from worker.processes import free_port

pytestmark = pytest.mark.timeout(300)
MODEL = "orphans"
DOOMED = "gw-doomed"


@pytest.fixture(scope="module")
def two_gateways(redis_server: str, tiny_qwen3: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, str]]:
    fl = Fleet(redis_server, f"orphans-{uuid.uuid4().hex[:8]}:", f"127.0.0.1:{free_port()}",
               "", 0, tmp_path_factory.mktemp("orphans"))
    doomed = f"127.0.0.1:{free_port()}"
    try:
        fl.services.append(start_service("gateway", fl.gateway_args(fl.gateway), fl.log_dir))
        fl.services.append(start_service("doomed", fl.gateway_args(
            doomed, "--gateway-id", DOOMED), fl.log_dir))
        fl.services.append(start_service("worker", fl.worker_args(
            tiny_qwen3, MODEL, "--max-num-seqs", "1", "--heartbeat", "0.5",
            "--no-cpu-kernels", "--worker-id", "orphans-w"), fl.log_dir))
        for target in (fl.gateway, doomed):
            wait_until(served(target, {MODEL: 1}), 150, "the fleet did not come up",
                       fl.services)
        yield fl, doomed
    finally:
        for service in fl.services:
            service.stop()


def test_a_dead_gateways_requests_stop_within_seconds(two_gateways: tuple[Fleet, str]) -> None:
    fl, doomed = two_gateways
    with GenerationClient(doomed, timeout=120) as client:
        running = Stream(client.stub.Generate(pb.GenerateRequest(
            model=MODEL, token_ids=pb.TokenIds(ids=[5, 6, 7]), max_tokens=2000,
            ignore_eos=True, request_id="orphan-running"), timeout=120))
        running.wait_first_token()
        queued = Stream(client.stub.Generate(pb.GenerateRequest(
            model=MODEL, token_ids=pb.TokenIds(ids=[8, 9]), max_tokens=2000,
            ignore_eos=True, request_id="orphan-queued"), timeout=120))
        with fl.redis() as r:
            wait_until(lambda: r.exists(f"{fl.prefix}req:orphan-queued") == 1, 10,
                       "the second request was never queued", fl.services)
        gateway = next(s for s in fl.services if s.name == "doomed")
        gateway.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        gateway.proc.wait(10)
        fl.services.remove(gateway)
    p = fl.prefix
    with fl.redis() as r:
        wait_until(lambda: not r.exists(f"{p}req:orphan-running", f"{p}req:orphan-queued"),
                   GATEWAY_TTL_S + 10, "the dead gateway's requests were not dropped",
                   fl.services)
        dropped_after = time.monotonic() - killed
        finals = {e.request_id: e for _, f in r.xrange(f"{p}replies:{DOOMED}")
                  for e in decode_events(f["e"]) if e.finish_reason}
        assert finals["orphan-running"].finish_reason == "error", "it ended on its own"
        assert finals["orphan-running"].code.name == "UNAVAILABLE"
        assert finals["orphan-queued"].index == -1  # dropped before it ran
        assert 0 < r.ttl(f"{p}replies:{DOOMED}") <= REPLIES_TTL_S
        wait_until(lambda: r.hget(f"{p}worker:orphans-w", "running") == "0", 5,
                   "the worker still reports a running request", fl.services)
    print(f"the dead gateway's requests were dropped {dropped_after:.1f}s after its SIGKILL")
    assert dropped_after < GATEWAY_TTL_S + 5
    running.finish(10)
    queued.finish(10)
    assert running.code is not None and queued.code is not None  # their gateway is gone
    with GenerationClient(fl.gateway, timeout=60) as other:
        result = collect(other.stub.Generate(pb.GenerateRequest(
            model=MODEL, token_ids=pb.TokenIds(ids=[1, 2]), max_tokens=5, ignore_eos=True,
            sampling=pb.SamplingParameters(temperature=0))))
    assert result.finish_reason == "length" and len(result.token_ids) == 5
