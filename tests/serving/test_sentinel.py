"""Redis high availability: a gateway and a worker on a `redis+sentinel://` URL ride out a
SIGKILLed master. Sentinels (down after 1 s) promote the replica; both processes reconnect
to it without a restart, and the greedy streams running across the failover arrive with no
token lost, duplicated or changed against an uninterrupted run (the client's part is what
`npuserve chaos` does: resume a broken stream, send again one that never got in).

Three times: a master killed while its replica is in sync; one killed half a second after
its replica fell behind (the replication link cut while the replica is paused: writes the
master acknowledged never reach the replica, which is what asynchronous replication can
lose); and one that stalls past the sentinels' patience and then answers again, still a
master in its own eyes until they demote it.
Measured and printed: the longest gap in any stream, the time from the kill until a new
request succeeds, and the token counts.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from protos import npuserve_pb2 as pb
from tests.redis_servers import SentinelGroup, start_sentinel_group
from tests.serving.conftest import Fleet, one_of_each
from worker.resumable_load import Client, Outcome, run_one, tally

pytestmark = pytest.mark.timeout(180)
MODEL = "ha"
MAX_TOKENS = 40
STREAMS = 5
PROMPTS = [[100 + 7 * i + j for j in range(4 + i)] for i in range(6)]


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    group = start_sentinel_group(tmp_path_factory.mktemp("sentinel"), "npuserve-ha")
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture(scope="module")
def ha_fleet(sentinels: SentinelGroup, tiny_qwen3: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with one_of_each(sentinels.url, tiny_qwen3, MODEL, tmp_path_factory.mktemp("ha"),
                     "--max-num-seqs", "3") as fl:
        yield fl


@pytest.fixture(scope="module")
def reference(ha_fleet: Fleet) -> list[list[int]]:
    """Each prompt's greedy completion on the calm stack."""
    client = Client(ha_fleet.gateway)
    try:
        return [greedy(client, p, MAX_TOKENS) for p in PROMPTS]
    finally:
        client.close()


def greedy(client: Client, prompt: list[int], max_tokens: int, timeout: float = 60
           ) -> list[int]:
    stream = client.stub.Generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt), model=MODEL, max_tokens=max_tokens,
        ignore_eos=True, sampling=pb.SamplingParameters(temperature=0)), timeout=timeout)
    return [t for m in stream for t in m.token_ids]


def fail_over(fl: Fleet, group: SentinelGroup, reference: list[list[int]],
              fault: Callable[[], float]) -> dict[str, Any]:
    """Keep STREAMS greedy streams going, run `fault` once tokens flow (it returns when the
    master stopped answering), go on until a new request succeeds and a few seconds more;
    return the figures."""
    client = Client(fl.gateway, timeout=30)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop_at = [time.monotonic() + 60.0]
    counter = iter(range(1 << 20))

    def load() -> None:
        while time.monotonic() < stop_at[0]:
            n = next(counter)
            outcome = Outcome(f"ha-{uuid.uuid4().hex[:6]}-{n}", n % len(PROMPTS))
            with lock:
                outcomes.append(outcome)
            run_one([client, client], outcome, PROMPTS[outcome.prompt], 0, MAX_TOKENS,
                    time.monotonic() + 60, MODEL)

    def logs() -> str:
        return group.tails() + "\n" + "\n".join(s.tail() for s in fl.services)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(STREAMS)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while sum(len(o.tokens) for o in outcomes) < 2 * MAX_TOKENS:
            assert time.monotonic() < deadline, f"no tokens flowed before the fault\n{logs()}"
            time.sleep(0.05)
        killed = fault()
        recovered = None
        while recovered is None and time.monotonic() < killed + 30:
            try:
                greedy(client, PROMPTS[0], 2, timeout=5)
                recovered = time.monotonic() - killed
            except grpc.RpcError:
                time.sleep(0.1)
        stop_at[0] = time.monotonic() + 3.0  # a few more requests after the failover
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads), f"a stream never ended\n{logs()}"
    finally:
        stop_at[0] = 0
        client.close()
    assert recovered is not None, f"no request succeeded within 30 s of the kill\n{logs()}"
    figures = tally(outcomes, reference)
    figures["recovered_s"] = round(recovered, 2)
    figures["longest_gap_s"] = round(max(
        (o.stall() for o in outcomes if o.arrivals and o.arrivals[-1] > killed), default=0), 2)
    print(f"failover: a new request succeeded {figures['recovered_s']}s after the master "
          f"stopped answering; longest gap in a stream {figures['longest_gap_s']}s; {figures}")
    assert all(s.proc.poll() is None for s in fl.services), f"a process died\n{logs()}"
    assert group.master_port() == group.replica.port, "the replica was not promoted"
    assert figures["errors"] == 0, [o.error for o in outcomes if o.error]
    return figures


def test_a_master_killed_mid_stream_fails_over_without_losing_a_token(
        ha_fleet: Fleet, sentinels: SentinelGroup, reference: list[list[int]]) -> None:
    def kill() -> float:
        sentinels.master.kill()
        return time.monotonic()

    figures = fail_over(ha_fleet, sentinels, reference, kill)
    assert (figures["lost"], figures["duplicated"], figures["mismatched"]) == (0, 0, 0), \
        figures


def test_writes_the_replica_never_got_are_published_again(
        ha_fleet: Fleet, sentinels: SentinelGroup, reference: list[list[int]]) -> None:
    sentinels.replace_replica()

    def replica_falls_behind_then_master_dies() -> float:
        sentinels.replica.pause()  # so it cannot reconnect and catch up from the backlog
        try:
            with redis.Redis(port=sentinels.master.port) as master:
                master.client_kill_filter(_type="replica")
            time.sleep(0.5)  # the steps of half a second reach the master only
            sentinels.master.kill()
            return time.monotonic()
        finally:
            sentinels.replica.pause(False)

    figures = fail_over(ha_fleet, sentinels, reference, replica_falls_behind_then_master_dies)
    assert (figures["lost"], figures["duplicated"], figures["mismatched"]) == (0, 0, 0), \
        figures


def test_a_master_that_stalls_and_comes_back_is_left_for_the_promoted_replica(
        ha_fleet: Fleet, sentinels: SentinelGroup, reference: list[list[int]]) -> None:
    """The master stops answering (SIGSTOP) past down-after-milliseconds, the sentinels
    promote the replica, and the old master answers again still believing itself master
    until the sentinels demote it (up to ten seconds): gateways and workers ask the
    sentinels every heartbeat, so they move to the new master instead of writing to the
    old one what its demotion then erases."""
    sentinels.replace_replica()
    old = sentinels.master

    def master_stalls_then_answers_again() -> float:
        old.pause()
        stalled = time.monotonic()
        try:
            deadline = time.monotonic() + 20
            while sentinels.master_port() == old.port:
                assert time.monotonic() < deadline, "the sentinels never promoted the replica"
                time.sleep(0.1)
        finally:
            old.pause(False)
        return stalled

    figures = fail_over(ha_fleet, sentinels, reference, master_stalls_then_answers_again)
    assert (figures["lost"], figures["duplicated"], figures["mismatched"]) == (0, 0, 0), \
        figures
