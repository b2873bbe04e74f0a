"""npuserve on a real Redis Cluster of three masters started on loopback: every script and
transaction stays in one slot (a model's queue and requests, a gateway's stream, an API
key's counters), two models land on different shards and both serve exactly, Cancel and
Resume find a request by id alone, and a worker SIGKILLed mid-stream is reaped and its
request finished by the other worker, token for token."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from common.keys import Keys
from gateway.client import GenerationClient, collect, sampling
from tests.redis_servers import RedisProcess, start_redis
from tests.serving.conftest import Fleet, Service, Stream, served, start_service, wait_until
from worker.processes import free_port

pytestmark = pytest.mark.timeout(300)
PROMPT = [1000, 2000, 3000, 4000, 5000]
GREEDY = sampling(temperature=0)


@dataclass
class Cluster:
    nodes: list[RedisProcess]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.nodes[0].port, decode_responses=True)

    def node_of(self, client: RedisCluster, key: str) -> int:
        """The port of the master serving `key`'s slot."""
        return int(client.get_node_from_key(key).port)


def start_cluster(workdir: Path, masters: int = 3) -> Cluster:
    """Masters with cluster mode on, joined by `redis-cli --cluster create`; waits for
    cluster_state:ok on every node."""
    nodes = [start_redis(f"cluster-{i}", workdir / f"node{i}", "--cluster-enabled", "yes",
                         "--cluster-config-file", "nodes.conf", "--cluster-node-timeout",
                         "2000", "--cluster-port", str(free_port()))
             for i in range(masters)]
    cluster = Cluster(nodes)
    try:
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False)
        assert created.returncode == 0, created.stdout + created.stderr

        def ready() -> bool:
            for node in nodes:
                with redis.Redis(port=node.port, decode_responses=True) as r:
                    if r.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                        return False
            return True

        wait_until(ready, 30, "the cluster did not reach cluster_state:ok")
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return cluster


def models_on_different_shards(cluster: Cluster, keys: Keys) -> tuple[str, str]:
    """Two model names whose queues are served by different masters."""
    with cluster.client() as c:
        first = "alpha"
        home = cluster.node_of(c, keys.queue(first))
        for i in range(1000):
            name = f"beta{i}"
            if cluster.node_of(c, keys.queue(name)) != home:
                return first, name
    raise AssertionError("no model name landed on another shard")


@dataclass
class ClusterFleet:
    cluster: Cluster
    fleet: Fleet
    models: tuple[str, str]
    workers: dict[str, Service]


@pytest.fixture(scope="module")
def cluster_fleet(tiny_qwen3: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[ClusterFleet]:
    workdir = tmp_path_factory.mktemp("cluster")
    cluster = start_cluster(workdir)
    prefix = f"cl-{uuid.uuid4().hex[:6]}:"
    fl = Fleet(cluster.url, prefix, f"127.0.0.1:{free_port()}", "", 0, workdir)
    models = models_on_different_shards(cluster, Keys(prefix))
    workers: dict[str, Service] = {}
    try:
        fl.services.append(start_service("gateway", fl.gateway_args(fl.gateway), workdir))
        for name, model in (("a1", models[0]), ("a2", models[0]), ("b1", models[1])):
            workers[name] = start_service(name, fl.worker_args(
                tiny_qwen3, model, "--worker-id", name, "--max-num-seqs", "4",
                "--heartbeat", "0.3", "--lease-ms", "60000", "--no-cpu-kernels"), workdir)
            fl.services.append(workers[name])
        wait_until(served(fl.gateway, {models[0]: 2, models[1]: 1}), 150,
                   "the cluster fleet did not come up", fl.services)
        yield ClusterFleet(cluster, fl, models, workers)
    finally:
        for service in fl.services:
            service.stop()
        for node in cluster.nodes:
            node.stop()


@pytest.fixture(scope="module")
def client(cluster_fleet: ClusterFleet) -> Iterator[GenerationClient]:
    with GenerationClient(cluster_fleet.fleet.gateway, timeout=120) as c:
        yield c


def test_each_multi_key_group_shares_one_slot() -> None:
    k = Keys()
    model, rid = "qwen", "acme/r-1"
    group = [k.queue(model), k.leases(model), k.wake(model),
             *k.request_keys(model, rid)]
    assert len({key_slot(key.encode()) for key in group}) == 1
    assert key_slot(k.gateway("gw").encode()) == key_slot(k.replies("gw").encode())
    assert len({key_slot(key.encode()) for key in (
        k.key_streams("web"), k.key_tokens("web", 7), k.key_tokens("web", 8))}) == 1
    assert key_slot(k.queue("qwen").encode()) != key_slot(k.queue("llama").encode())


def test_two_models_on_two_shards_serve_exactly(cluster_fleet: ClusterFleet,
                                                client: GenerationClient) -> None:
    first, second = cluster_fleet.models
    results = {model: collect(client.generate(PROMPT, model=model, max_tokens=12,
                                              ignore_eos=True, sampling=GREEDY))
               for model in (first, second)}
    # the same checkpoint under two names: the same greedy tokens, whichever shard
    assert results[first].token_ids == results[second].token_ids
    assert len(results[first].token_ids) == 12
    keys = Keys(cluster_fleet.fleet.prefix)
    with cluster_fleet.cluster.client() as c:
        assert cluster_fleet.cluster.node_of(c, keys.queue(first)) != (
            cluster_fleet.cluster.node_of(c, keys.queue(second)))


def test_cancel_and_resume_find_a_request_by_id(cluster_fleet: ClusterFleet,
                                                client: GenerationClient) -> None:
    model = cluster_fleet.models[1]
    whole = collect(client.generate(PROMPT, model=model, max_tokens=30, ignore_eos=True,
                                    sampling=GREEDY, request_id="finished-1"))
    tail = collect(client.resume("finished-1", 10))
    assert tail.token_ids == whole.token_ids[10:] and tail.finish_reason == "length"
    long = Stream(client.generate(PROMPT, model=model, max_tokens=2000, ignore_eos=True,
                                  sampling=GREEDY, request_id="long-1"))
    long.wait_first_token()
    assert client.cancel("long-1") is True
    assert long.finish().finish_reason == "cancelled"


def test_a_killed_workers_request_is_finished_exactly_by_another(
        cluster_fleet: ClusterFleet, client: GenerationClient) -> None:
    model = cluster_fleet.models[0]
    reference = collect(client.generate(PROMPT, model=model, max_tokens=150, ignore_eos=True,
                                        sampling=GREEDY))
    keys = Keys(cluster_fleet.fleet.prefix)
    stream = Stream(client.generate(PROMPT, model=model, max_tokens=150, ignore_eos=True,
                                    sampling=GREEDY, request_id="cut-1"))
    with cluster_fleet.cluster.client() as c:
        wait_until(lambda: c.llen(keys.tokens(model, "cut-1")) >= 20, 60,
                   "the request never got going")
        holder = c.hget(keys.request(model, "cut-1"), "worker")
    assert holder in ("a1", "a2")
    killed_at = time.monotonic()
    cluster_fleet.workers[holder].proc.send_signal(signal.SIGKILL)
    result = stream.finish(120)
    assert result.token_ids == reference.token_ids
    assert result.indices == sorted(set(result.indices))  # none twice
    assert stream.longest_stall() < 15, "reaped by registration, not after a 60 s lease"
    assert time.monotonic() - killed_at < 60
