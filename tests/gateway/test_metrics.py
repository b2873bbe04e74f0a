"""Prometheus metrics: exposed over HTTP, and counting what the gateway does."""

from __future__ import annotations

import socket
import urllib.request

import grpc
import pytest
from prometheus_client import REGISTRY

from gateway.metrics import serve_metrics
from protos import npuserve_pb2 as pb
from tests.gateway.conftest import MODEL, StackFactory


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_are_served_over_http_on_the_metrics_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve_metrics(port, host="127.0.0.1")
    assert server is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            body = reply.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert "npuserve_gateway_streams_active" in body
    assert "npuserve_gateway_rpcs_total" in body


@pytest.mark.anyio
async def test_rpcs_are_counted_by_method_and_status(gateway_stack: StackFactory) -> None:
    before = sample("npuserve_gateway_rpcs_total", method="Generate", code="INVALID_ARGUMENT")
    async with gateway_stack() as s:
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in s.stub.Generate(pb.GenerateRequest(model=MODEL, text="")):
                pass
    after = sample("npuserve_gateway_rpcs_total", method="Generate", code="INVALID_ARGUMENT")
    assert after == before + 1
    assert sample("npuserve_gateway_streams_active") == 0
