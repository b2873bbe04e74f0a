"""A worker whose model is split over two CPU ranks, through the whole stack: a gateway,
Redis and `npuserve worker --tensor-parallel 2` stream exactly the tokens one rank gives; when
a rank dies the worker stops at its next step, hands its requests back, and another worker
finishes them exactly."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import EngineConfig
from common.sampling_params import SamplingParams
from gateway.client import GenerationClient, collect, sampling
from tests.serving.conftest import Service, Stream, serving, start_service, wait_until
from worker.backends.torch_settings import TorchSettings
from worker.engine.engine import Engine
from worker.processes import free_port

pytestmark = pytest.mark.timeout(300)
MODEL = "tiny-tp"
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [50, 60, 70], [900, 12, 7, 7, 7, 300]]
TOKENS = 10


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.fixture(scope="module")
def reference(tiny_qwen3: Path) -> dict[int, list[int]]:
    engine = Engine.from_model_dir(tiny_qwen3, EngineConfig(max_num_seqs=4),
                                   settings=TorchSettings(kv_cache_gb=0.02, threads=1))
    done = engine.generate(PROMPTS, SamplingParams(max_tokens=TOKENS, temperature=0.0,
                                                   ignore_eos=True))
    return {i: c.token_ids for i, c in enumerate(done)}


@pytest.fixture
def stack(redis_server: str, tiny_qwen3: Path, tmp_path: Path
          ) -> Iterator[tuple[str, list[Service], list[str]]]:
    prefix, target = f"tp-{uuid.uuid4().hex[:8]}:", f"127.0.0.1:{free_port()}"
    common = ["--redis", redis_server, "--prefix", prefix]
    worker = ["worker", "--model", str(tiny_qwen3), "--name", MODEL, "--kv-cache-gb", "0.02",
              "--threads", "1", "--lease-ms", "3000", *common]
    services = [start_service("gateway", ["gateway", "--listen", target, *common], tmp_path),
                start_service("tp-worker", [*worker, "--tensor-parallel", "2",
                                            "--tp-timeout-s", "5"], tmp_path)]

    with serving(target, {MODEL: 1}, services, 120,
                 "the tensor-parallel worker never registered"):
        yield target, services, worker


def test_a_model_split_over_two_ranks_streams_the_tokens_of_one(
        stack: tuple[str, list[Service], list[str]], reference: dict[int, list[int]]) -> None:
    target, _, _ = stack
    with GenerationClient(target, timeout=120) as client:
        for i, prompt in enumerate(PROMPTS):
            result = collect(client.generate(prompt, model=MODEL, max_tokens=TOKENS,
                                              ignore_eos=True, sampling=sampling(temperature=0)))
            assert result.token_ids == reference[i]


@pytest.mark.parametrize(("how", "says"), [
    (signal.SIGKILL, "tensor-parallel rank 1 exited"),
    (signal.SIGSTOP, "Timed out")], ids=["dies", "hangs"])
def test_when_a_rank_dies_or_hangs_the_worker_hands_back_and_another_finishes_exactly(
        stack: tuple[str, list[Service], list[str]], reference: dict[int, list[int]],
        tmp_path: Path, how: signal.Signals, says: str) -> None:
    target, services, worker = stack
    tp = services[1]
    [follower] = children(tp.proc.pid)
    os.kill(follower, how)
    with GenerationClient(target, timeout=120) as client:
        stream = Stream(client.generate(PROMPTS[0], model=MODEL, max_tokens=TOKENS,
                                        ignore_eos=True, sampling=sampling(temperature=0)))
        wait_until(lambda: tp.proc.poll() is not None, 60, "the worker kept running")
        assert tp.proc.returncode != 0
        assert says in tp.log.read_text()
        services.append(start_service("rescue", worker, tmp_path))
        result = stream.finish(120)
    assert not Path(f"/proc/{follower}").exists(), "the worker left its rank behind"
    assert stream.code is None, stream.details
    assert result.token_ids == reference[0]
