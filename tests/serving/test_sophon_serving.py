"""The whole stack on the BM1684X simulator (make test-bm1684x): a gateway, Redis and a worker
with the sophon backend (a pool of two slots) serve four concurrent streams, each getting
exactly the tokens the bmodel gives it alone, and refuse what does not fit SEQLEN; a second
worker with the top-1 head on chip serves greedy requests and refuses sampling ones."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.client import GenerationClient, StreamResult, collect, sampling
from tests.serving.conftest import Service, serving, start_service
from tests.worker.conftest import compiled_tiny, greedy_alone
from worker.backends.sophon.simulator import SimulatorRuntime
from worker.checkpoints.tpu_toolchain import require_toolchain
from worker.processes import free_port

pytestmark = [pytest.mark.bm1684x, pytest.mark.timeout(600)]
MODEL, CHIP_MODEL, SEQLEN = "tiny-bm", "tiny-bm-chip", 64
PROMPTS = [[5, 77, 301, 12], [999, 400, 8], [64, 123, 7, 512, 42], [11, 22, 33, 44, 55, 66]]


@pytest.fixture(scope="module")
def stack(redis_server: str, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("sophon-stack")
    toolchain = require_toolchain()
    _, bmodel, manifest = compiled_tiny("qwen2", seqlen=SEQLEN, quant="bf16")
    _, chip, _ = compiled_tiny("qwen2", seqlen=SEQLEN, quant="bf16", sample_on_host=False)
    prefix, target = f"bm-{uuid.uuid4().hex[:8]}:", f"127.0.0.1:{free_port()}"
    common = ["--redis", redis_server, "--prefix", prefix]
    sophon = ["--backend", "sophon", "--sophon-device", "sim", "--tpu-mlir-venv",
              str(toolchain.venv), *common]
    services: list[Service] = [
        start_service("gateway", ["gateway", "--listen", target, *common], tmp),
        start_service("worker", ["worker", "--model", str(bmodel), "--name", MODEL,
                                 "--pool-size", "2", *sophon], tmp),
        start_service("chip-worker", ["worker", "--model", str(chip), "--name", CHIP_MODEL,
                                      "--pool-size", "1", *sophon], tmp)]

    with serving(target, {MODEL: 1, CHIP_MODEL: 1}, services, 180,
                 "the sophon workers never registered"):
        yield target, bmodel, manifest


def test_four_streams_share_two_slots_and_each_gets_its_tokens_alone(
        stack: tuple[str, Path, dict[str, Any]]) -> None:
    target, bmodel_dir, manifest = stack
    with GenerationClient(target, timeout=300) as client:
        def one(prompt: list[int]) -> StreamResult:
            return collect(client.generate(prompt, model=MODEL, max_tokens=6, ignore_eos=True,
                                           sampling=sampling(temperature=0)))

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, PROMPTS))
    runtime = SimulatorRuntime(bmodel_dir / manifest["bmodel"], require_toolchain())
    try:
        for prompt, result in zip(PROMPTS, results, strict=True):
            assert result.token_ids == greedy_alone(runtime, manifest, prompt, 6)
            assert (result.finish_reason, result.completion_tokens) == ("length", 6)
    finally:
        runtime.close()


def test_a_request_longer_than_seqlen_is_refused_naming_the_limit(
        stack: tuple[str, Path, dict[str, Any]]) -> None:
    target, _, _ = stack
    with GenerationClient(target, timeout=30) as client, pytest.raises(grpc.RpcError) as info:
        collect(client.generate([5] * 60, model=MODEL, max_tokens=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "64 tokens" in (info.value.details() or "")


def test_a_worker_whose_chip_picks_the_token_serves_greedy_and_refuses_sampling(
        stack: tuple[str, Path, dict[str, Any]]) -> None:
    target, bmodel_dir, manifest = stack
    with GenerationClient(target, timeout=300) as client:
        greedy = collect(client.generate(PROMPTS[0], model=CHIP_MODEL, max_tokens=4,
                                         ignore_eos=True, sampling=sampling(temperature=0)))
        with pytest.raises(grpc.RpcError) as info:
            collect(client.generate(PROMPTS[0], model=CHIP_MODEL, max_tokens=4,
                                    sampling=sampling(temperature=0.8)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in (info.value.details() or "")
    runtime = SimulatorRuntime(bmodel_dir / manifest["bmodel"], require_toolchain())
    try:
        assert greedy.token_ids == greedy_alone(runtime, manifest, PROMPTS[0], 4)
    finally:
        runtime.close()
