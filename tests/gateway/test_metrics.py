"""Prometheus metrics: exposed over HTTP with the probes, lint-clean, and counting what the
gateway and the fleet do."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client import REGISTRY, generate_latest

from common.protocol import ReplyEvent
from protos import npuserve_pb2 as pb
from tests.gateway.conftest import MODEL, StackFactory
from tests.promtool import check_metrics


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _get(url: str) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    return await asyncio.to_thread(get)


async def _until(check: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the metric did not move"
        await asyncio.sleep(0.05)


@pytest.mark.anyio
async def test_metrics_and_probes_are_served_on_the_metrics_port(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack(serve=False, metrics_port=0) as s:
        assert s.gateway._metrics_server is None  # port 0: disabled
    from worker.processes import free_port

    port = free_port()
    async with gateway_stack(serve=False, metrics_port=port) as s:
        base = f"http://127.0.0.1:{port}"
        status, body = await _get(f"{base}/metrics")
        assert status == 200 and "npuserve_gateway_streams_active" in body
        assert 'npuserve_build_info{component="gateway"' in body
        status, body = await _get(f"{base}/readyz")
        assert status == 503 and "NOT_SERVING" in body
        assert (await _get(f"{base}/livez"))[0] == 200
        await s.worker.register()
        await _until(lambda: s.gateway.core.serving)
        status, body = await _get(f"{base}/readyz")
        assert status == 200 and MODEL in body


@pytest.mark.anyio
async def test_the_exposition_passes_promtool(gateway_stack: StackFactory) -> None:
    async with gateway_stack():
        await _until(lambda: sample("npuserve_workers", model=MODEL, backend="torch") == 1)
        text = generate_latest(REGISTRY).decode()
    assert "_created" not in text
    check_metrics(text)


@pytest.mark.anyio
async def test_rpcs_and_rejections_are_counted_by_status_and_reason(
        gateway_stack: StackFactory) -> None:
    before = sample("npuserve_gateway_rpcs_total", method="Generate", code="INVALID_ARGUMENT")
    rejected = sample("npuserve_gateway_rejected_requests_total", model=MODEL,
                      reason="invalid_argument")
    unknown = sample("npuserve_gateway_rejected_requests_total", model="",
                     reason="not_found")
    async with gateway_stack() as s:
        for request in (pb.GenerateRequest(model=MODEL, text=""),
                        pb.GenerateRequest(model="no-such-model", text="hi")):
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in s.stub.Generate(request):
                    pass
    after = sample("npuserve_gateway_rpcs_total", method="Generate", code="INVALID_ARGUMENT")
    assert after == before + 1
    assert sample("npuserve_gateway_rejected_requests_total", model=MODEL,
                  reason="invalid_argument") == rejected + 1
    assert sample("npuserve_gateway_rejected_requests_total", model="",
                  reason="not_found") == unknown + 1
    assert sample("npuserve_gateway_streams_active") == 0


@pytest.mark.anyio
async def test_a_stream_moves_the_latency_length_and_fleet_metrics(
        gateway_stack: StackFactory, caplog: pytest.LogCaptureFixture) -> None:
    def count(name: str) -> float:
        return sample(name, model=MODEL)

    itl, ttft = (count("npuserve_gateway_inter_token_latency_seconds_count"),
                 count("npuserve_gateway_time_to_first_token_seconds_count"))
    prompts = count("npuserve_gateway_request_prompt_tokens_count")
    completions = count("npuserve_gateway_request_completion_tokens_sum")
    finished = sample("npuserve_gateway_requests_total", model=MODEL, finish_reason="length")
    async with gateway_stack() as s:
        call = s.stub.Generate(pb.GenerateRequest(model=MODEL, text="hello", request_id="r-m"))
        await _until(lambda: sample("npuserve_queue_depth", model=MODEL) == 1)
        assert sample("npuserve_queue_oldest_age_seconds", model=MODEL) >= 0
        assert sample("npuserve_workers_accepting", model=MODEL, backend="torch") == 1
        request = await s.worker.take()
        await s.worker.send(s.gateway_id, ReplyEvent(request.request_id, 0, 5, queue_ms=7))
        await asyncio.sleep(0.02)
        await s.worker.send(s.gateway_id, ReplyEvent(request.request_id, 1, 6))
        await s.worker.send(s.gateway_id, ReplyEvent(
            request.request_id, 2, 7, finish_reason="length", prompt_tokens=3,
            completion_tokens=3))
        with caplog.at_level("INFO", logger="gateway.service"):
            async for _ in call:
                pass
        await _until(lambda: sample("npuserve_queue_depth", model=MODEL) == 0)
    assert count("npuserve_gateway_time_to_first_token_seconds_count") == ttft + 1
    assert count("npuserve_gateway_inter_token_latency_seconds_count") == itl + 2
    assert count("npuserve_gateway_request_prompt_tokens_count") == prompts + 1
    assert count("npuserve_gateway_request_completion_tokens_sum") == completions + 3
    assert sample("npuserve_gateway_requests_total", model=MODEL,
                  finish_reason="length") == finished + 1
    [line] = [r for r in caplog.records if r.getMessage() == "request finished"]
    assert line.request_id == "r-m"  # type: ignore[attr-defined]
    assert line.npuserve_fields["completion_tokens"] == 3  # type: ignore[attr-defined]
    assert line.npuserve_fields["finish_reason"] == "length"  # type: ignore[attr-defined]
    assert line.npuserve_fields["queue_wait_ms"] == 7  # type: ignore[attr-defined]
