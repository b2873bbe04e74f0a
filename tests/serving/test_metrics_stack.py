"""Metrics, probes and logs of a real running stack (a gateway and a worker, as processes):
the values move as requests go through, both expositions pass promtool, the probes answer,
and a draining worker stops counting as accepting."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.client import GenerationClient, collect
from tests.promtool import check_metrics
from tests.serving.conftest import Fleet, one_of_each, scrape, wait_until
from worker.processes import free_port

MODEL = "tiny-metrics"


@pytest.fixture(scope="module")
def stack(redis_server: str, tiny_qwen3: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[Fleet, int, int]]:
    gateway_port, worker_port = free_port(), free_port()
    with one_of_each(redis_server, tiny_qwen3, MODEL, tmp_path_factory.mktemp("metrics"),
                     "--metrics-port", str(worker_port), "--drain-timeout", "30",
                     gateway_flags=("--metrics-port", str(gateway_port))) as fleet:
        yield fleet, gateway_port, worker_port


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_values_move_as_requests_go_through(stack: tuple[Fleet, int, int]) -> None:
    fleet, gw, wk = stack
    model = {"model": MODEL}
    wait_until(lambda: scrape(gw, "npuserve_workers_accepting", **model) == 1, 10,
               "the gateway never counted the worker", fleet.services)
    ttft = scrape(gw, "npuserve_gateway_time_to_first_token_seconds_count", **model)
    itl = scrape(gw, "npuserve_gateway_inter_token_latency_seconds_count", **model)
    prefill = scrape(wk, "npuserve_worker_step_seconds_count", phase="prefill", **model)
    decode = scrape(wk, "npuserve_worker_step_seconds_count", phase="decode", **model)
    tokens = scrape(wk, "npuserve_worker_generated_tokens_total", **model)
    with GenerationClient(fleet.gateway, timeout=60) as client:
        for i in range(3):
            result = collect(client.generate(f"count to {i}", model=MODEL, max_tokens=8,
                                             ignore_eos=True))
            assert result.completion_tokens == 8
    assert scrape(gw, "npuserve_gateway_time_to_first_token_seconds_count", **model) == ttft + 3
    assert scrape(gw, "npuserve_gateway_inter_token_latency_seconds_count", **model) == itl + 21
    assert scrape(gw, "npuserve_gateway_request_completion_tokens_sum", **model) >= 24
    assert scrape(gw, "npuserve_gateway_requests_total", finish_reason="length", **model) >= 3
    assert scrape(wk, "npuserve_worker_generated_tokens_total", **model) == tokens + 24
    assert scrape(wk, "npuserve_worker_step_seconds_count", phase="prefill", **model) > prefill
    assert scrape(wk, "npuserve_worker_step_seconds_count", phase="decode", **model) > decode
    assert scrape(wk, "npuserve_worker_batch_size_count", **model) > 0
    assert scrape(wk, "npuserve_worker_kv_blocks_capacity", **model) > 0
    assert 0 <= scrape(wk, "npuserve_worker_kv_cache_usage_ratio", **model) <= 1
    assert scrape(wk, "npuserve_worker_heartbeat_age_seconds", **model) < 10
    assert scrape(wk, "process_resident_memory_bytes") > 0
    # the fleet gauges are read each health beat: one may have seen a request still queued
    wait_until(lambda: scrape(gw, "npuserve_queue_depth", **model) == 0, 10,
               "the queue depth never came back to 0", fleet.services)
    assert scrape(gw, "npuserve_worker_slots", **model) >= 1
    for port in (gw, wk):
        status, text = _get(port, "/metrics")
        assert status == 200
        check_metrics(text)


def test_the_per_request_log_line_names_the_request(stack: tuple[Fleet, int, int]) -> None:
    fleet, _, _ = stack
    with GenerationClient(fleet.gateway, timeout=60) as client:
        collect(client.generate("hello", model=MODEL, max_tokens=4, ignore_eos=True,
                                request_id="logged-1"))
    gateway_log = next(s for s in fleet.services if s.name == "gateway").log

    def logged() -> bool:
        return any("[logged-1] request finished" in line
                   for line in gateway_log.read_text().splitlines())

    wait_until(logged, 5, "no per-request line", fleet.services)
    line = next(x for x in gateway_log.read_text().splitlines() if "[logged-1] request" in x)
    for part in (f"model={MODEL}", "prompt_tokens=", "completion_tokens=4", "queue_wait_ms=",
                 "ttft_ms=", "total_ms=", "finish_reason=length"):
        assert part in line, line


def test_probes_and_a_draining_worker(stack: tuple[Fleet, int, int]) -> None:
    fleet, gw, wk = stack
    assert _get(wk, "/livez")[0] == 200
    assert _get(wk, "/readyz") == (200, f"serving {MODEL}: 0 running\n")
    wait_until(lambda: _get(gw, "/readyz")[0] == 200, 5, "the gateway never got ready",
               fleet.services)
    worker = next(s for s in fleet.services if s.name == "worker")
    with GenerationClient(fleet.gateway, timeout=60) as client:
        stream = client.generate("a long one", model=MODEL, max_tokens=2000, ignore_eos=True)
        next(stream)  # running: the drain waits for it
        worker.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _get(wk, "/readyz")[0] == 503, 5, "the worker stayed ready",
                   fleet.services)
        assert "draining" in _get(wk, "/readyz")[1]
        wait_until(lambda: _get(gw, "/readyz")[0] == 503, 10,
                   "the gateway stayed ready with its only worker draining", fleet.services)
        assert scrape(gw, "npuserve_workers_accepting", model=MODEL) == 0
        assert scrape(gw, "npuserve_workers", model=MODEL) == 1
        for _ in stream:  # the drain lets it finish
            pass
    worker.proc.wait(timeout=40)
    others = [s for s in fleet.services if s is not worker]
    wait_until(lambda: scrape(gw, "npuserve_workers", model=MODEL) == 0, 15,
               "the gone worker still counted", others)
    assert _get(gw, "/readyz")[0] == 503


def test_json_logs_are_one_object_per_line(redis_server: str, tmp_path: Path) -> None:
    from tests.serving.conftest import start_service

    port = free_port()
    service = start_service("gateway-json", [
        "--log-format", "json", "gateway", "--listen", f"127.0.0.1:{port}", "--redis",
        redis_server, "--prefix", f"json-{port}:"], tmp_path)
    try:
        wait_until(lambda: "listening" in service.log.read_text(), 30, "no start line",
                   [service])
    finally:
        service.stop()
    deadline = time.monotonic() + 5
    while "stopped" not in service.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [json.loads(x) for x in service.log.read_text().splitlines() if x.strip()]
    assert lines and all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)
    assert any("listening" in line["msg"] for line in lines)
